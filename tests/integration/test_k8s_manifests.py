"""Every rendered manifest validates offline: core objects with the real `kubernetes-validate --strict`
CLI for Kubernetes 1.33 (a WARN counts as a failure), Kubeflow objects against the kubeflow-trainer-api /
kubeflow-training models and their pod/Job templates as core objects (infra.k8s.validate); and the
validators reject a manifest with an unknown field. No API server can run here (ENVIRONMENT.md)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra import launch
from infra.k8s import validate

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "torchrun-gpu-s3": ["--nodes", "2", "--gpus-per-node", "8", "--cpu", "32", "--memory", "256Gi", "--env", "NCCL_DEBUG=WARN",
                        "run.batch_size=64", "data={name: shards, url: 's3://bucket/latents', shape: [1, 16, 16], num_classes: 10}"],
    "deepspeed-cpu": ["--nodes", "3", "--launcher", "deepspeed", "run.batch_size=48"],
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, args in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        assert launch.main(["k8s", "--config", str(ROOT / "configs/demo_cpu.yaml"), *args, "run.dir=/runs/demo", "dist.engine=deepspeed",
                            "--out", str(folder)]) == 0
        out[name] = folder
    return out


def cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", validate.KUBERNETES, str(path)],
                          capture_output=True, text=True, check=False)


def core_view(docs: list[dict]) -> list[dict]:
    """The core objects of a file: Kubeflow objects replaced by the pod templates and Jobs they carry."""
    out = []
    for d in docs:
        if d["kind"] == "PyTorchJob":
            out += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": r["template"]}
                    for role, r in d["spec"]["pytorchReplicaSpecs"].items()]
        elif d["kind"] == "TrainingRuntime":
            out += [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]}, "spec": rj["template"]["spec"]}
                    for rj in d["spec"]["template"]["spec"]["replicatedJobs"]]
        elif d["kind"] != "TrainJob":
            out.append(d)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["job", "pytorchjob", "trainjob"])
def test_rendered_manifests_validate(rendered, case, kind, tmp_path):
    path = rendered[case] / f"{kind}.yaml"
    assert validate.validate_file(path) == []
    docs = list(yaml.safe_load_all(path.read_text()))
    view = tmp_path / "core.yaml"
    view.write_text(yaml.safe_dump_all(core_view(docs)))
    res = cli(view)
    assert res.returncode == 0 and "WARN" not in res.stdout and "ERROR" not in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("passed") == len(core_view(docs))


def _set(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def test_validators_reject_unknown_fields(rendered, tmp_path):
    folder = rendered["torchrun-gpu-s3"]
    _, _, job = yaml.safe_load_all((folder / "job.yaml").read_text())
    bad_job = _set(job, ["spec", "template", "spec", "containers", 0, "bogusField"], 1)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad_job))
    res = cli(tmp_path / "bad.yaml")
    assert res.returncode != 0 and "ERROR" in res.stdout and "bogusField" in res.stdout, res.stdout
    assert any("bogusField" in e for e in validate.validate_doc(bad_job))

    _, pytorchjob = yaml.safe_load_all((folder / "pytorchjob.yaml").read_text())
    for path in (["spec", "pytorchReplicaSpecs", "Master", "bogusField"], ["spec", "runPolicy", "bogusField"],
                 ["spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "containers", 0, "bogusField"]):
        errors = validate.validate_doc(_set(pytorchjob, path, 1))
        assert errors and all("bogusField" in e for e in errors), (path, errors)

    _, runtime, trainjob = yaml.safe_load_all((folder / "trainjob.yaml").read_text())
    assert any("bogusField" in e for e in validate.validate_doc(_set(trainjob, ["spec", "trainer", "bogusField"], 1)))
    assert validate.validate_doc(_set(trainjob, ["spec", "trainer", "numNodes"], "two"))  # a type error, found by the model
    rj = ["spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "bogusField"]
    assert any("bogusField" in e for e in validate.validate_doc(_set(runtime, rj, 1)))
    unknown_kind = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate.validate_doc(unknown_kind)  # no schema: an error, not kubernetes-validate's WARN
