"""Every YAML in configs/ loads; misspelled keys and impossible combinations fail naming key and file;
the CLI's --dry-run prints the resolved config. The ImageNet-512 configs (s3:// shards, a teacher file that is
not here) load and --dry-run offline: an unreachable S3 endpoint is set so that any storage access would fail."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sct import train
from sct.config import ConfigError, load
from sct.experiment import TrainConfig, build_objective

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo_cpu.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load(TrainConfig, path)
    assert cfg.run.total_steps > 0


def test_misspelled_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("configs/demo_cpu.yaml").read_text().replace("tangent_warmup_steps", "tangent_warmpu_steps"))
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, bad)
    msg = str(err.value)
    assert str(bad) in msg and "objective.tangent_warmpu_steps" in msg and "did you mean 'tangent_warmup_steps'" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.precond.name=edm_consistency", "model.precond.name"),  # sCT needs TrigFlow
        ("model.backbone.label_dim=3", "model.backbone.label_dim"),
        ("run.grad_accum=7", "run.grad_accum"),
        ("objective.name=scd", "objective.teacher"),
        ("sampling.method=ode", "sampling.method"),
    ],
)
def test_impossible_combinations_fail_at_startup(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(TrainConfig, "configs/demo_cpu.yaml", [override])


def test_cli_reports_config_errors(capsys):
    assert train.main(["--config", "configs/demo_cpu.yaml", "optimizer.lrr=1"]) == 2
    assert "optimizer.lrr" in capsys.readouterr().err


def test_dry_run_prints_resolved_config():
    out = subprocess.run([sys.executable, "-m", "sct.train", "--config", "configs/demo_cpu.yaml", "--dry-run", "run.total_steps=7"],
                         capture_output=True, text=True, check=True).stdout
    assert "total_steps: 7" in out and "backbone parameters:" in out
    assert load(TrainConfig, "configs/demo_cpu.yaml", ["run.total_steps=7"]).run.total_steps == 7


OFFLINE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "none", "AWS_SECRET_ACCESS_KEY": "none",
           "AWS_EC2_METADATA_DISABLED": "true"}  # port 9 refuses connections: reading the bucket would fail the run


def backbone_parameters(out: str) -> int:
    return int(re.search(r"# backbone parameters: ([\d,]+)", out).group(1).replace(",", ""))


def test_scm_xl_512_dry_run_reads_neither_the_bucket_nor_the_teacher():
    cfg = load(TrainConfig, "configs/sCM_xl_512.yaml")
    assert cfg.data.url.startswith("s3://") and cfg.objective.name == "scd" and not Path(cfg.objective.teacher).exists()
    done = subprocess.run([sys.executable, "-m", "sct.train", "--config", "configs/sCM_xl_512.yaml", "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preset: edm2-xl" in done.stdout and "precision: bf16" in done.stdout
    assert 1.0e9 <= backbone_parameters(done.stdout) <= 1.25e9  # EDM2-XL: 1119.4M published (sCM Table 4)
    with pytest.raises(ConfigError, match="objective.teacher: teacher snapshot not found"):
        build_objective(cfg)  # the one place the teacher file is opened, when a run starts


XXL_NAMED, XL_NAMED = "the sCM paper's '1.5B' model: configs/sCM_xxl_512.yaml", "the sCM paper's XL (1.1B)"


@pytest.mark.parametrize(("path", "low", "high", "named"), [("configs/sCM_xxl_512.yaml", 1.4e9, 1.7e9, XXL_NAMED),  # XXL: 1523.4M published
                                                            ("configs/sCT_xl_512.yaml", 1.0e9, 1.25e9, XL_NAMED),
                                                            ("configs/diffusion_xl_512.yaml", 1.0e9, 1.25e9, XL_NAMED),
                                                            ("configs/diffusion_xxl_512.yaml", 1.4e9, 1.7e9, XXL_NAMED)])
def test_other_512_configs_dry_run_offline(path, low, high, named, capsys, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    assert train.main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert low <= backbone_parameters(out) <= high and named in out
    assert re.search(r"# activations per GPU, estimated: [\d.]+ GiB at micro-batch \d+ ", out)


@pytest.mark.parametrize(("override", "key"), [("data.shape=[4,32,32]", "model.backbone"),
                                               ("data.num_classes=10", "model.backbone.label_dim")])
def test_declared_shard_shape_and_classes_are_checked_against_the_model(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(TrainConfig, "configs/sCM_xl_512.yaml", [override])


@pytest.mark.parametrize(("size", "lr", "images", "ema"), [("xl", 0.0070, 1280 << 20, 0.020), ("xxl", 0.0065, 896 << 20, 0.015)])
def test_diffusion_512_teachers_follow_edm2_and_feed_the_student_configs(size, lr, images, ema):
    """EDM2's edm2-img512-{xl,xxl} presets; the header's post-hoc EMA command writes the file the sCM config reads."""
    path = Path(f"configs/diffusion_{size}_512.yaml")
    cfg = load(TrainConfig, path)
    assert cfg.objective.name == "diffusion" and cfg.objective.label_dropout > 0 and cfg.model.backbone.dropout == 0.1
    assert cfg.optimizer.lr == lr and cfg.run.batch_size == 2048 and cfg.run.total_steps * 2048 == images
    assert (cfg.optimizer.decay, cfg.optimizer.decay_start, tuple(cfg.optimizer.betas)) == ("inverse_sqrt", 70000, (0.9, 0.99))
    assert (cfg.objective.p_mean, cfg.objective.p_std) == (-0.4, 1.0)
    assert cfg.ema.posthoc.sigma_rels == (0.05, 0.10) and cfg.ema.std == ema
    command = re.search(r"python -m sct.posthoc_ema --run (\S+) --sigma-rel (\S+) --out (\S+)", path.read_text())
    assert command.group(1) == cfg.run.dir and float(command.group(2)) == ema
    student = load(TrainConfig, f"configs/sCM_{size}_512.yaml")
    assert student.objective.teacher == student.model.init_from == command.group(3)
    assert student.objective.guidance_max == 2.0 and student.model.backbone.guidance_embedding and student.sampling.guidance == 1.2
    assert student.model.backbone.dropout_max_resolution == 16 and student.ema.posthoc.sigma_rels


def test_512_configs_no_longer_list_these_as_inexpressible():
    for name in ("sCM_xl_512", "sCM_xxl_512", "sCT_xl_512"):
        text = Path(f"configs/{name}.yaml").read_text()
        assert "ours: every resolution" not in text and "No post-hoc EMA" not in text and "distilled at this one value" not in text
    assert load(TrainConfig, "configs/sCT_xl_512.yaml").model.backbone.dropout_max_resolution == 16
