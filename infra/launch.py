"""Render (or submit) a training run for a SLURM cluster or Kubernetes from one sct config.

    python -m infra.launch slurm --config X.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        run.dir=/shared/runs/x --out launch/x            # writes launch/x/job.sbatch + train.yaml
    python -m infra.launch k8s --config X.yaml --nodes 4 --gpus-per-node 8 --pvc sct-runs \\
        run.dir=/runs/x --out launch/x                    # trainjob.yaml, pytorchjob.yaml, job.yaml
    ... --submit      # instead of --out: SLURM writes into <run.dir>/launch and runs sbatch;
                      # k8s runs `kubectl apply -f` on the --kind chosen (default trainjob)

key=value arguments override the training config (as for `python -m sct.train`); the resolved config
is what the job runs. An impossible request (batch vs ranks, a relative run.dir, node-local data for
several nodes, a credential passed as --env) exits 2 with one line on stderr (infra.request).
Docs: docs/launch.md. Tests: `pytest tests/unit/test_infra_render.py tests/integration/test_k8s_manifests.py`,
`pytest -m slurm tests/integration/test_slurm.py`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from infra import k8s, slurm
from infra.image import DEFAULT_IMAGE
from infra.request import RequestError, build
from sct.config import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the sct training config (YAML)")
    p.add_argument("--name", default="sct", help="job name (k8s: a DNS label)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks")
    p.add_argument("--procs-per-node", type=int, default=0, help="ranks per node (default: GPUs per node, or 1 on CPU)")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed", "srun"), default="torchrun",
                   help="torchrun (c10d rendezvous), the deepspeed launcher, or srun alone (SLURM only)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a plain setting for every rank, e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--shared-mount", action="append", default=[], metavar="PATH", help="a filesystem every node mounts (run.dir must be under one)")
    p.add_argument("--allow-local-data", action="store_true", help="a local data.url exists on every node")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the rendered files into this folder")
    g.add_argument("--submit", action="store_true", help="render and submit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def parser(target: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m infra.launch {target}", description=__doc__.split("\n")[0])
    _common(p)
    if target == "slurm":
        p.add_argument("--partition")
        p.add_argument("--account")
        p.add_argument("--time", help="time limit, e.g. 24:00:00")
        p.add_argument("--signal-seconds", type=int, default=300, help="SIGUSR1 this long before the time limit")
        p.add_argument("--exclusive", action="store_true")
        p.add_argument("--cpus-per-task", type=int)
        p.add_argument("--python", default="python3", help="the interpreter on the compute nodes")
        p.add_argument("--workdir", default=str(Path.cwd()), help="cd here on the nodes (default: this folder)")
        return p
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--namespace", default="default")
    p.add_argument("--pvc", default="sct-runs", help="PersistentVolumeClaim holding run.dir")
    p.add_argument("--pvc-mount", default="/runs", help="where the claim is mounted (run.dir must be under it)")
    p.add_argument("--s3-secret", default="sct-s3", help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ optional token, endpoint, region)")
    p.add_argument("--grace-seconds", type=int, default=600, help="terminationGracePeriodSeconds: longer than one step + one checkpoint")
    p.add_argument("--shm", default="16Gi", help="size of the /dev/shm memory volume")
    p.add_argument("--cpu", default=None, help="CPU request per pod, e.g. 32")
    p.add_argument("--memory", default=None, help="memory request per pod, e.g. 256Gi")
    p.add_argument("--backoff-limit", type=int, default=20, help="failures (other than exit 75 / disruption) before the job fails")
    p.add_argument("--kind", choices=k8s.KINDS, default="trainjob", help="what --submit applies")
    return p


def _write(files: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("slurm", "k8s"):
        print("usage: python -m infra.launch slurm|k8s --config FILE [options] [key=value ...] (--out DIR | --submit)", file=sys.stderr)
        return 2
    args = parser(argv[0]).parse_intermixed_args(argv[1:])
    args.target = argv[0]
    try:
        if args.target == "k8s":
            if args.launcher == "srun":
                raise RequestError("--launcher srun is for SLURM; on k8s use torchrun or deepspeed")
            args.shared_mount = [*args.shared_mount, args.pvc_mount]
        req = build(args)
        out = args.out or Path(req.cfg.run.dir) / "launch"
        if args.target == "slurm":
            opts = slurm.SlurmOptions(partition=args.partition, account=args.account, time=args.time, signal_seconds=args.signal_seconds,
                                      exclusive=args.exclusive, cpus_per_task=args.cpus_per_task, python=args.python, workdir=args.workdir)
            files = slurm.render(req, opts, out)
        else:
            opts = k8s.K8sOptions(image=args.image, namespace=args.namespace, pvc=args.pvc, pvc_mount=args.pvc_mount, s3_secret=args.s3_secret,
                                  grace_seconds=args.grace_seconds, shm=args.shm, cpu=args.cpu, memory=args.memory, backoff_limit=args.backoff_limit)
            files = k8s.render(req, opts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RequestError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2
    _write(files, out)
    print(f"wrote {', '.join(sorted(files))} to {out}")
    if not args.submit:
        return 0
    if args.target == "slurm":
        cmd = ["sbatch", str(out / "job.sbatch")]
    else:
        cmd = ["kubectl", "apply", "-f", str(out / f"{args.kind}.yaml")]
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
