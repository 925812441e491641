"""Every YAML in configs/ loads; misspelled keys and impossible combinations fail naming key and file;
the CLI's --dry-run prints the resolved config."""
import subprocess
import sys
from pathlib import Path

import pytest

from sct import train
from sct.config import ConfigError, load
from sct.experiment import TrainConfig

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
