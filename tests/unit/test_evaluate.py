"""`python -m sct.evaluate`: FID/KID/IS/PR through torch-fidelity offline from local weights files, a recorded protocol,
cached reference statistics with provenance, results independent of the world size, and clear errors.

The Inception weights here are RANDOMLY INITIALISED and saved to a local file (no real weights can be obtained
offline): the metric values mean nothing; the tests exercise the path (loading, features, caching, protocol)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from snapshot_factory import UNET, make_snapshot
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

import sct.reference
from pipelines.arrays import FASHION_MNIST_DIR
from sct.evaluate import main
from sct.export import export

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with random He-initialised convolutions (so features are not ~0), as a .pth file."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # construct without the real weights
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / "inception_random.pth")
    return folder / "inception_random.pth"


def _args(tmp_path, snap, *extra):
    return ["--snapshot", str(snap), "--num", "12", "--batch", "12", "--reference", "array:fashion_mnist:test",
            "--cache", str(tmp_path / "cache"), *extra]


def _check_fashion_mnist():
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")


def test_inception_metrics_offline_with_protocol_and_cached_reference(tmp_path, inception_weights, monkeypatch):
    _check_fashion_mnist()
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    argv = _args(tmp_path, snap, "--metrics", "kid,isc,prc", "--inception-weights", str(inception_weights))
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert set(first["metrics"]) >= {"kernel_inception_distance_mean", "inception_score_mean", "precision", "recall"}
    assert all(v == v for v in first["metrics"].values())  # finite numbers (meaningless: random weights)
    proto = first["protocol"]
    assert proto["num_samples"] == 12 and proto["seeds"] == [0, 11] and proto["steps"] == 2 and proto["guidance"] == 1.0
    assert proto["feature_extractor"] == "inception-v3-compat" and len(proto["reference_stats_sha256"]) == 64
    provenance = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("sct-ref-*.json")]
    assert len(provenance) == 1 and provenance[0]["reference"] == "array:fashion_mnist:test" and provenance[0]["num"] == 12
    assert provenance[0]["stats_sha256"] == proto["reference_stats_sha256"]

    def no_reload(*args, **kwargs):
        raise AssertionError("the cached reference was read again")

    monkeypatch.setattr(sct.reference, "load_reference", no_reload)
    assert main([*argv, "--out", str(tmp_path / "b.json")]) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["metrics"] == first["metrics"]
    assert second["protocol"]["reference_stats_sha256"] == proto["reference_stats_sha256"]


@pytest.mark.slow
def test_inception_fid_end_to_end_offline(tmp_path, inception_weights):
    """FID on Inception's 2048-d features: torch-fidelity's eigvals of a 2048x2048 matrix takes ~30 s on 2 cores."""
    _check_fashion_mnist()
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    assert main([*_args(tmp_path, snap, "--metrics", "fid", "--inception-weights", str(inception_weights)), "--out", str(tmp_path / "f.json")]) == 0
    fid = json.loads((tmp_path / "f.json").read_text())["metrics"]["frechet_inception_distance"]
    assert fid > 0 and fid == fid


def test_domain_fd_does_not_depend_on_world_size_or_on_export(tmp_path, domain_classifier):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    export(snap, tmp_path / "export", steps=2)
    common = ["--num-samples", "12", "--batch", "5", "--reference", "array:fashion_mnist:test", "--metrics", "fid,kid",
              "--feature-extractor", "fmnist", "--domain-classifier", str(domain_classifier), "--cache", str(tmp_path / "cache")]
    assert main(["--snapshot", str(snap), *common, "--out", str(tmp_path / "one.json")]) == 0
    assert main(["--export", str(tmp_path / "export"), *common, "--out", str(tmp_path / "export.json")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sct.evaluate",
                           "--snapshot", str(snap), *common, "--out", str(tmp_path / "two.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two, exp = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two", "export"))
    assert two["protocol"]["world_size"] == 2 and one["protocol"]["world_size"] == 1
    assert one["metrics"] == two["metrics"] == exp["metrics"]
    assert one["metrics"]["frechet_inception_distance"] > 0


def test_clear_errors(tmp_path, capsys, domain_classifier):
    snap = make_snapshot(tmp_path / "s.safetensors", UNET)
    small = make_snapshot(tmp_path / "small.safetensors", {**UNET, "img_resolution": 8})
    export(snap, tmp_path / "export", steps=2)
    fm = ["--feature-extractor", "fmnist", "--domain-classifier", str(domain_classifier), "--metrics", "fid"]
    cases = [
        (_args(tmp_path, snap), "--inception-weights / eval.inception_weights is not set"),
        (_args(tmp_path, snap, "--inception-weights", str(tmp_path / "nope.pth")), "file not found"),
        (_args(tmp_path, snap, "--feature-extractor", "fmnist"), "--domain-classifier / eval.domain_classifier is not set"),
        (_args(tmp_path, tmp_path / "missing.safetensors", *fm), "snapshot not found"),
        (["--export", str(tmp_path / "export"), "--steps", "3", *_args(tmp_path, snap, *fm)[2:]], "--steps must be between 1 and 2"),
        (_args(tmp_path, small, *fm), "has images of shape [3, 16, 16], the model generates [3, 8, 8]"),
        (_args(tmp_path, snap, *fm[:-1], "fid,bogus"), "--metrics"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_domain_fd_of_a_diffusion_teacher_through_its_ode(tmp_path, domain_classifier):
    """The reproduction's teacher row: --steps are ODE intervals, --guidance the ODE's CFG scale, both in the protocol."""
    teacher = make_snapshot(tmp_path / "t.safetensors", UNET, "diffusion")
    common = ["--snapshot", str(teacher), "--num-samples", "10", "--batch", "10", "--metrics", "fid", "--feature-extractor", "fmnist",
              "--domain-classifier", str(domain_classifier), "--cache", str(tmp_path / "cache"), "--steps", "3"]
    assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    assert main([*common, "--guidance", "2.0", "--out", str(tmp_path / "guided.json")]) == 0
    plain, guided = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "guided"))
    assert plain["protocol"]["method"] == "ode" and plain["protocol"]["steps"] == 3 and guided["protocol"]["guidance"] == 2.0
    assert plain["metrics"]["frechet_inception_distance"] != guided["metrics"]["frechet_inception_distance"]
