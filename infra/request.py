"""A launch request: the training config (with its key=value overrides) plus the cluster options, checked
before anything is rendered, so an impossible request fails here with one line instead of on the cluster.

    req = build(args)            # argparse namespace from infra.launch; raises RequestError
    req.world_size, req.train_yaml, req.pass_env

Checks (each a `RequestError` naming the option or config key; `python -m infra.launch` exits 2):
- run.batch_size divisible by ranks (nodes x procs per node) x run.grad_accum; more than one rank
  needs dist.engine: deepspeed;
- run.dir absolute, and under a declared shared mount (`--shared-mount`, the PVC's mount on k8s)
  when one is declared: checkpoints from every rank go into one folder every node must see;
- a shard dataset (data.url) that is a local or relative path: relative is refused always (each node
  and pod has its own working directory), an absolute one for more than one node unless it is under
  a shared mount or `--allow-local-data` says every node has it;
- `--env NAME=VALUE` is for plain settings (NCCL_*, TORCH_*): a name that looks like a credential is
  refused; credentials reach jobs by name only (the submitting environment on SLURM, a Secret on k8s).

Tests: `pytest tests/unit/test_infra_render.py`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipelines.stream import ShardDataConfig
from sct.config import load, to_yaml
from sct.experiment import TrainConfig

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
S3_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY|PRIVATE|API_KEY", re.IGNORECASE)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RequestError(ValueError):
    """An impossible launch request; str() is one line naming the option or key."""


@dataclass
class Request:
    cfg: TrainConfig
    config_file: str
    name: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    launcher: str  # torchrun | deepspeed | srun
    env: dict[str, str] = field(default_factory=dict)  # plain settings written into the job
    shared_mounts: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def train_yaml(self) -> str:
        """The resolved training config: what every rank (and every requeued job) loads."""
        return to_yaml(self.cfg)

    @property
    def uses_s3(self) -> bool:
        return isinstance(self.cfg.data, ShardDataConfig) and self.cfg.data.url.startswith("s3://")

    @property
    def pass_env(self) -> tuple[str, ...]:
        """Names (never values) of the credentials and endpoint the job takes from its environment."""
        return S3_ENV if self.uses_s3 else ()


def _under(path: str, mounts: tuple[str, ...]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents for m in mounts)


def _parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(name):
            raise RequestError(f"--env {item!r}: expected NAME=VALUE")
        if SECRET_NAME.search(name):
            raise RequestError(f"--env {name}: looks like a credential; it is never written into a job: "
                               "export it where you submit (SLURM) or put it in the Secret (k8s)")
        out[name] = value
    return out


def build(args) -> Request:
    """Load the config with overrides and check the request; raises RequestError (or ConfigError)."""
    cfg = load(TrainConfig, args.config, args.overrides)
    if args.nodes < 1:
        raise RequestError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise RequestError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    procs = args.procs_per_node or max(args.gpus_per_node, 1)
    if args.gpus_per_node and procs != args.gpus_per_node:
        raise RequestError(f"--procs-per-node {procs} with --gpus-per-node {args.gpus_per_node}: one rank per GPU")
    mounts = tuple(args.shared_mount)
    req = Request(cfg=cfg, config_file=str(args.config), name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  procs_per_node=procs, launcher=args.launcher, env=_parse_env(args.env), shared_mounts=mounts)
    run = cfg.run
    if run.batch_size % (req.world_size * run.grad_accum):
        raise RequestError(f"run.batch_size {run.batch_size} is not divisible by {req.world_size} ranks "
                           f"({args.nodes} nodes x {procs} per node) x run.grad_accum {run.grad_accum}")
    if req.world_size > 1 and cfg.dist.engine != "deepspeed":
        raise RequestError(f"dist.engine: torch runs one process; {req.world_size} ranks need dist.engine=deepspeed")
    if not PurePosixPath(run.dir).is_absolute():
        raise RequestError(f"run.dir {run.dir!r} is relative: give an absolute path on a filesystem every node mounts "
                           "(the requeued job resumes from it)")
    if mounts and not _under(run.dir, mounts):
        raise RequestError(f"run.dir {run.dir} is not under a shared mount ({', '.join(mounts)})")
    if isinstance(cfg.data, ShardDataConfig) and ("://" not in cfg.data.url or cfg.data.url.startswith("file://")):
        url = cfg.data.url.removeprefix("file://")
        if not PurePosixPath(url).is_absolute():
            raise RequestError(f"data.url {url!r} is a relative path: every node has its own working directory; "
                               "use s3://... or an absolute path on a shared mount")
        if args.nodes > 1 and not _under(url, mounts) and not args.allow_local_data:
            raise RequestError(f"data.url {url} is a local path and the job has {args.nodes} nodes: use s3://..., "
                               "a path under --shared-mount, or --allow-local-data if every node has a copy")
    return req

