"""The `eval:` section: domain FD of the EMA model at a cadence during training, in metrics.jsonl and eval.png,
and config errors naming the eval key at start-up."""
import json

from sct import train

TINY = ["--config", "configs/demo_cpu.yaml", "model.backbone.model_channels=8", "run.batch_size=8", "run.total_steps=4",
        "run.log_every=2", "run.sample_every=1000", "run.snapshot_every=1000", "run.checkpoint_every=1000", "sampling.num=10",
        "data.dataset=fashion_mnist"]


def test_domain_fd_during_training(tmp_path, domain_classifier):
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.dir={run_dir}", "eval.every=2", "eval.num=20", "eval.batch=10", "eval.steps=[1, 2]",
            "eval.metrics=[fid]", "eval.feature_extractor=fmnist", f"eval.domain_classifier={domain_classifier}",
            f"eval.cache={tmp_path / 'cache'}"]
    assert train.main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/fmnist_fid_1step"] > 0 and r["eval/fmnist_fid_2step"] > 0
    assert (run_dir / "eval.png").stat().st_size > 1000
    assert len(list((tmp_path / "cache").glob("sct-ref-*.json"))) == 1  # the reference is computed once


def test_eval_config_errors_name_the_key(tmp_path, capsys):
    base = [*TINY, f"run.dir={tmp_path / 'run'}", "eval.every=2"]
    assert train.main([*base, "eval.feature_extractor=fmnist"]) == 2
    assert "eval.domain_classifier" in capsys.readouterr().err
    assert train.main([*base, "eval.feature_extractor=fmnist", f"eval.domain_classifier={tmp_path / 'no.safetensors'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.domain_classifier" in err and "not found" in err
    assert train.main([*base, "eval.feature_extractor=inception"]) == 2
    assert "eval.inception_weights" in capsys.readouterr().err
    assert train.main(["--config", "configs/toy_sct.yaml", f"run.dir={tmp_path / 'toy'}", "eval.every=2",
                       "eval.domain_classifier=x.safetensors"]) == 2
    assert "eval.every: evaluation measures images" in capsys.readouterr().err
