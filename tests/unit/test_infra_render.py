"""`python -m infra.launch`: impossible requests exit 2 with one line; the sbatch script and the manifests
say what docs/launch.md says they do; no secret value from the environment lands in a rendered file.
(The script runs for real in tests/integration/test_slurm.py; manifests are validated in
tests/integration/test_k8s_manifests.py.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra import launch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ["--config", str(ROOT / "configs/demo_cpu.yaml")]
PLANTED = "planted-secret-value-91b2e7"
SHARDS = ["data={name: shards, url: 's3://bucket/latents', shape: [1, 16, 16], num_classes: 10}"]


def run(args, tmp_path, capsys) -> tuple[int, str]:
    rc = launch.main([*args, "--out", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("target", ["slurm", "k8s"])
@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--gpus-per-node", "8", "run.dir=/runs/x", "dist.engine=deepspeed", "run.batch_size=40"], "run.batch_size 40 is not divisible by 16 ranks"),
    (["--nodes", "2", "run.dir=/runs/x", "run.batch_size=48", "run.grad_accum=16"], "run.batch_size 48 is not divisible by 2 ranks (2 nodes x 1 per node) x run.grad_accum 16"),
    (["--nodes", "2", "run.dir=/runs/x"], "2 ranks need dist.engine=deepspeed"),
    (["run.dir=runs/x"], "run.dir 'runs/x' is relative"),
    (["--shared-mount", "/lustre", "run.dir=/tmp/x"], "run.dir /tmp/x is not under a shared mount (/lustre"),
    (["run.dir=/runs/x", "data={name: shards, url: 'shards/x', shape: [1, 16, 16], num_classes: 10}"], "data.url 'shards/x' is a relative path"),
    (["--nodes", "2", "run.dir=/runs/x", "dist.engine=deepspeed", "data={name: shards, url: '/data/x', shape: [1, 16, 16], num_classes: 10}"],
     "data.url /data/x is a local path and the job has 2 nodes"),
    (["run.dir=/runs/x", "--env", "AWS_SECRET_ACCESS_KEY=abc"], "--env AWS_SECRET_ACCESS_KEY: looks like a credential"),
])
def test_impossible_requests_exit_2_with_one_line(target, args, message, tmp_path, capsys):
    rc, err = run([target, *DEMO, *args], tmp_path, capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_config_errors_exit_2_as_sct_train_does(tmp_path, capsys):
    rc, err = run(["slurm", *DEMO, "run.dir=/runs/x", "run.bogus=1"], tmp_path, capsys)
    assert rc == 2 and err.startswith("config error: ") and "run.bogus" in err and err.count("\n") == 1


def test_local_data_is_allowed_when_declared_shared_or_opted_in(tmp_path, capsys):
    base = ["slurm", *DEMO, "--nodes", "2", "run.dir=/lustre/runs/x", "dist.engine=deepspeed"]
    data = "data={name: shards, url: '/lustre/data/x', shape: [1, 16, 16], num_classes: 10}"
    assert run([*base, "--shared-mount", "/lustre", data], tmp_path, capsys)[0] == 0
    assert run([*base, "--allow-local-data", data.replace("/lustre/data", "/scratch/data")], tmp_path, capsys)[0] == 0


def test_sbatch_script(tmp_path, capsys):
    args = ["slurm", *DEMO, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--time", "24:00:00",
            "--signal-seconds", "240", "--exclusive", "--env", "NCCL_SOCKET_IFNAME=ib0", "run.dir=/lustre/runs/x", "dist.engine=deepspeed",
            "run.batch_size=64", *SHARDS]
    assert run(args, tmp_path, capsys)[0] == 0
    script = (tmp_path / "out" / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --time=24:00:00", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@240", "export NCCL_SOCKET_IFNAME=ib0", 'scontrol requeue "$SLURM_JOB_ID"',
                 "--rdzv-backend=c10d", "--nproc-per-node=8", "-m sct.supervise --", "for v in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY"):
        assert line in script, line
    trained = yaml.safe_load((tmp_path / "out" / "train.yaml").read_text())
    assert trained["run"]["dir"] == "/lustre/runs/x" and trained["data"]["url"] == "s3://bucket/latents"
    res = subprocess.run(["bash", "-n", str(tmp_path / "out" / "job.sbatch")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("launcher, words", [("srun", ["#SBATCH --ntasks-per-node=8", "srun --ntasks-per-node=8"]),
                                              ("deepspeed", ["slots=8", "--no_ssh", '--node_rank="$SLURM_NODEID"'])])
def test_sbatch_script_other_launchers(launcher, words, tmp_path, capsys):
    args = ["slurm", *DEMO, "--nodes", "2", "--gpus-per-node", "8", "--launcher", launcher, "run.dir=/runs/x", "dist.engine=deepspeed", "run.batch_size=64"]
    assert run(args, tmp_path, capsys)[0] == 0
    script = (tmp_path / "out" / "job.sbatch").read_text()
    assert all(w in script for w in words), script


def test_manifests_reference_the_secret_and_carry_the_pod_settings(tmp_path, capsys):
    args = ["k8s", *DEMO, "--nodes", "2", "--gpus-per-node", "4", "--grace-seconds", "900", "--s3-secret", "my-s3",
            "run.dir=/runs/x", "dist.engine=deepspeed", *SHARDS]
    assert run(args, tmp_path, capsys)[0] == 0
    docs = {p.stem: list(yaml.safe_load_all(p.read_text())) for p in (tmp_path / "out").glob("*.yaml")}
    assert sorted(docs) == ["job", "pytorchjob", "trainjob"]
    job = docs["job"][2]["spec"]
    pod = job["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "sct:0.1.0" and c["command"][:4] == ["python3", "-m", "sct.supervise", "--"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "my-s3", "key": "AWS_SECRET_ACCESS_KEY"}}}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and pod["terminationGracePeriodSeconds"] == 900
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "sct-runs"}} in pod["volumes"]
    assert job["completionMode"] == "Indexed" and job["completions"] == 2 and pod["subdomain"] == "sct"
    assert job["podFailurePolicy"]["rules"][0] == {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}}
    master = docs["pytorchjob"][1]["spec"]["pytorchReplicaSpecs"]["Master"]
    assert master["restartPolicy"] == "OnFailure" and master["template"]["spec"]["containers"][0]["name"] == "pytorch"
    runtime, trainjob = docs["trainjob"][1], docs["trainjob"][2]
    assert trainjob["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["action"] == "RestartJobSetAndIgnoreMaxRestarts"


def test_no_secret_value_in_rendered_files_or_output(tmp_path):
    """A planted credential in the environment of `python -m infra.launch` reaches no file and no output."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": PLANTED, "AWS_SECRET_ACCESS_KEY": PLANTED,
           "AWS_SESSION_TOKEN": PLANTED, "NCCL_SOCKET_IFNAME": "ib0"}
    for target in ("slurm", "k8s"):
        out = tmp_path / target
        res = subprocess.run([sys.executable, "-m", "infra.launch", target, *DEMO, "--nodes", "2", "run.dir=/runs/x", "dist.engine=deepspeed",
                              *SHARDS, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
        assert PLANTED not in res.stdout + res.stderr
        files = list(out.iterdir())
        assert files and all(PLANTED not in f.read_text() for f in files)
        assert any("AWS_SECRET_ACCESS_KEY" in f.read_text() for f in files)  # referenced by name
