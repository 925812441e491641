"""`python -m sct.export`: the standalone sampler folder reproduces sct's in-process sampling bitwise (CPU, fp32),
its loader runs with sct unimportable, and the CLIs fail clearly (exit 2) on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from snapshot_factory import DIT, MLP, UNET, make_snapshot

from sct.config import from_dict
from sct.experiment import load_snapshot_model
from sct.export import export, load_export
from sct.export import main as export_main
from sct.sample import main as sample_main
from sct.samplers import SamplingConfig, generate, seeded_noise

SEEDS = range(7, 19)


def _in_process(snapshot: Path, steps: int, classes: list[int], seeds=SEEDS) -> torch.Tensor:
    net, stored = load_snapshot_model(snapshot)
    cfg = from_dict(SamplingConfig, stored["sampling"])
    k = stored["model"]["backbone"]["label_dim"]
    labels = torch.nn.functional.one_hot(torch.tensor(classes), k).float() if k else None
    return generate(net, cfg, steps, tuple(stored["shape"]), seeds, labels)


@pytest.mark.parametrize("backbone,objective,guidance", [
    (UNET, "sct", 1.0), (DIT, "scd", 1.0), (MLP, "ict", 1.0), ({**UNET, "guidance_embedding": True}, "scd", 2.5),
], ids=["unet-trigflow", "dit-trigflow", "mlp-edm", "unet-guidance-input"])
def test_exported_sampler_equals_in_process_sampling_bitwise(tmp_path, backbone, objective, guidance):
    snap = make_snapshot(tmp_path / "s.safetensors", backbone, objective, mids=[1.0] if objective != "ict" else [2.0], steps=[1, 2],
                         guidance=guidance)
    out = export(snap, tmp_path / "export", steps=2)
    sampler = load_export(out)
    classes = [i % 10 for i in range(len(SEEDS))]
    for steps in (1, 2):
        expected = _in_process(snap, steps, classes)
        got = sampler.sample(SEEDS, classes, steps)
        assert expected.std() > 0.05
        assert torch.equal(got, expected), f"{steps}-step: max |diff| {(got - expected).abs().max()}"
    spec = json.loads((out / "sampler.json").read_text())
    assert spec["mids"]["2"] == ([1.0] if objective != "ict" else [2.0]) and spec["mids"]["1"] == []


def test_loader_imports_nothing_from_sct_and_unpickles_nothing(tmp_path):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    out = export(snap, tmp_path / "export", steps=2)
    expected = _in_process(snap, 2, [3] * 4, seeds=[7, 8, 9, 10])
    torch.save(expected, tmp_path / "expected.pt")  # read back by this test, not by the loader
    script = """
import importlib.abc, pickle, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sct" or name.startswith("sct."):
            raise ImportError("sct is blocked in this test")
sys.meta_path.insert(0, Block())
def no_unpickling(*a, **k):
    raise AssertionError("the loader unpickled something")
pickle.load = pickle.loads = no_unpickling
pickle.Unpickler = None
import sampler
import torch
torch.set_num_threads(1)  # as the parent test process: CPU kernels may split sums differently across threads
s = sampler.load(".")
x = s.sample([7, 8, 9, 10], [3, 3, 3, 3], 2)
assert "sct" not in sys.modules and not any(m.startswith("sct.") for m in sys.modules)
sys.stdout.buffer.write(x.numpy().tobytes())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(out)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=out, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    got = torch.frombuffer(bytearray(proc.stdout), dtype=torch.float32).reshape(expected.shape)
    assert torch.equal(got, expected)


def test_bf16_export_halves_the_weights_and_stays_close(tmp_path):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    full, half = export(snap, tmp_path / "fp32"), export(snap, tmp_path / "bf16", dtype="bf16")
    assert {v.dtype for v in load_file(half / "weights.safetensors").values()} <= {torch.bfloat16, torch.float64}
    assert (half / "weights.safetensors").stat().st_size < 0.6 * (full / "weights.safetensors").stat().st_size
    a, b = load_export(full).sample(SEEDS, [1] * 12, 2), load_export(half).sample(SEEDS, [1] * 12, 2)
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_torch_export_program_matches_bitwise(tmp_path):
    snap = make_snapshot(tmp_path / "s.safetensors", MLP, "ict")
    out = export(snap, tmp_path / "export", steps=2, with_program=True)
    program = torch.export.load(out / "sampler.pt2").module()
    noise = torch.stack(seeded_noise(SEEDS, (2,), 2))
    assert torch.equal(program(noise), _in_process(snap, 2, []))


def test_sample_cli_from_an_export(tmp_path):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    export(snap, tmp_path / "export", steps=2)
    assert sample_main(["--export", str(tmp_path / "export"), "--num", "20", "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    saved = torch.load(tmp_path / "a" / "samples.pt")
    classes = [(i // 10) % 10 for i in range(20)]
    assert torch.equal(saved["samples"], _in_process(snap, 2, classes, seeds=range(20)))
    assert (tmp_path / "a" / "samples_2step.png").is_file()


def _status(main, argv) -> int:
    """Exit status of a CLI main: its return value, or the code of the SystemExit argparse raises (p.error)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_clis_fail_clearly(tmp_path, capsys):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    teacher = make_snapshot(tmp_path / "t.safetensors", UNET, "diffusion")
    cases = [
        (["--snapshot", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")], "snapshot not found"),
        (["--snapshot", str(snap), "--out", str(tmp_path / "o"), "--steps", "0"], "--steps must be between 1"),
        (["--snapshot", str(teacher), "--out", str(tmp_path / "o")], "diffusion (ODE) snapshot"),
    ]
    for argv, message in cases:
        assert export_main(argv) == 2
        assert message in capsys.readouterr().err
    export(snap, tmp_path / "export", steps=2)
    assert sample_main(["--export", str(tmp_path / "export"), "--steps", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be between 1 and 2" in capsys.readouterr().err
    assert sample_main(["--export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "sampler.py is missing" in capsys.readouterr().err
    assert _status(sample_main, ["--snapshot", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "snapshot not found" in capsys.readouterr().err
    assert _status(sample_main, ["--snapshot", str(snap), "--steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a snapshot")
    assert _status(sample_main, ["--snapshot", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a readable sct snapshot" in capsys.readouterr().err
