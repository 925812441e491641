"""The sbatch script for a training run, rendered from a checked `infra.request.Request` plus SLURM options.

    files = render(req, opts, out_dir)     # {"job.sbatch": ..., "train.yaml": ...}; written by infra.launch

What the script does, in order (docs/launch.md walks through it):
- `#SBATCH`: nodes, tasks per node (one launcher per node; one task per rank with `--launcher srun`),
  GPUs per node, CPUs per task, partition, account, time, `--exclusive`, `--requeue`,
  `--signal=B:USR1@<s>` (the batch shell gets SIGUSR1 <s> seconds before the time limit) and an
  appended log `slurm-<jobid>.out` next to the script, so a requeued run adds to the same log;
- credentials by name only: when data.url is on S3 it stops with exit 2 unless AWS_ACCESS_KEY_ID and
  AWS_SECRET_ACCESS_KEY are set where `sbatch` ran (sbatch and srun pass the environment on);
  `--env NAME=VALUE` settings (NCCL_*, ...) are exported literally;
- MASTER_ADDR = the NodeAddr of the first node (`scontrol show hostnames` + `scontrol show node`),
  MASTER_PORT = 20000 + job id % 20000 (the same rule `sct.dist.launcher` applies under srun alone);
- one `srun` step running `python -m sct.supervise -- <launcher>` on each node: torchrun with the
  c10d rendezvous (default), the deepspeed launcher with a generated hostfile (`--no_ssh`, node rank =
  SLURM_NODEID), or `sct.train` itself as each task (`--launcher srun`);
- SIGUSR1 / SIGTERM to the batch shell are passed to the step; the step's status 75 (preempted and
  checkpointed) makes the script call `scontrol requeue $SLURM_JOB_ID`; the requeued job runs the same
  command, which resumes from the newest complete checkpoint in run.dir.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from infra.request import S3_REQUIRED, Request


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # HH:MM:SS or D-HH:MM:SS
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: one step + one checkpoint, with slack
    exclusive: bool = False
    cpus_per_task: int | None = None
    python: str = "python3"  # the interpreter (with sct importable) on the compute nodes
    workdir: str = "."  # cd here before launching (the repo, or anywhere when sct is installed)


def _q(value) -> str:
    return shlex.quote(str(value))


def _launch_cmd(req: Request, opts: SlurmOptions, out: str) -> list[str]:
    """The srun line (as shell words; $VARS expand in the batch shell or, in single quotes, per task)."""
    py, per_node = _q(opts.python), req.procs_per_node
    sup = f"{py} -m sct.supervise --"
    if req.launcher == "srun":
        return [f"srun --ntasks-per-node={per_node} --kill-on-bad-exit=0 {sup} {py} -m sct.train --config \"$CONFIG\""]
    if req.launcher == "torchrun":
        return [(f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 {sup} {py} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" "
                 f"--nproc-per-node={per_node} --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" "
                 f"--rdzv-id=\"$SLURM_JOB_ID\" -m sct.train --config \"$CONFIG\"")]
    # deepspeed: the runner on each node, without ssh, from a hostfile of the allocation's nodes
    return [f"HOSTFILE={_q(out)}/hostfile-$SLURM_JOB_ID",
            f"scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots={per_node}/' > \"$HOSTFILE\"",
            "export HOSTFILE",
            (f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c 'exec {sup} {py} -m deepspeed.launcher.runner "
             f"--hostfile \"$HOSTFILE\" --no_ssh --node_rank=\"$SLURM_NODEID\" --master_addr=\"$MASTER_ADDR\" "
             f"--master_port=\"$MASTER_PORT\" --module sct.train --config \"$CONFIG\"'")]


def render(req: Request, opts: SlurmOptions, out_dir: Path) -> dict[str, str]:
    out = str(Path(out_dir).resolve())
    sb = [f"--job-name={req.name}", f"--nodes={req.nodes}",
          f"--ntasks-per-node={req.procs_per_node if req.launcher == 'srun' else 1}"]
    if req.gpus_per_node:
        sb.append(f"--gpus-per-node={req.gpus_per_node}")
    for flag, value in (("cpus-per-task", opts.cpus_per_task), ("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value is not None:
            sb.append(f"--{flag}={value}")
    if opts.exclusive:
        sb.append("--exclusive")
    sb += ["--requeue", f"--signal=B:USR1@{opts.signal_seconds}", "--open-mode=append", f"--output={out}/slurm-%j.out"]
    lines = ["#!/bin/bash",
             f"# sct training job `{req.name}`, rendered by `python -m infra.launch slurm` from {Path(req.config_file).name}",
             "# (docs/launch.md). Submit: sbatch job.sbatch. Exit status 75 = preempted and checkpointed:",
             "# the job requeues itself and the same command resumes from the newest checkpoint in run.dir.",
             *(f"#SBATCH {s}" for s in sb),
             "set -uo pipefail",
             f"cd {_q(opts.workdir)}",
             f"export CONFIG={_q(out)}/train.yaml",
             'echo "sct: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"']
    if req.pass_env:
        lines += [f"for v in {' '.join(S3_REQUIRED)}; do  # credentials by name: sbatch and srun pass the submitting environment on",
                  '  [ -n "${!v:-}" ] || { echo "sct: $v is not set in the environment sbatch was called from" >&2; exit 2; }',
                  "done"]
    lines += [f"export {name}={_q(value)}" for name, value in req.env.items()]
    lines += ['HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "MASTER_ADDR=$(scontrol show node \"$HEAD\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
              'export MASTER_ADDR=${MASTER_ADDR:-$HEAD}',
              "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
              *_launch_cmd(req, opts, out)]
    lines[-1] += " &"
    lines += ["STEP=$!",
              "forward() { echo \"sct: batch shell got SIG$1: passing it to the job step\"; kill -\"$1\" \"$STEP\" 2>/dev/null; }",
              "trap 'forward USR1' USR1",
              "trap 'forward TERM' TERM",
              'while kill -0 "$STEP" 2>/dev/null; do wait "$STEP"; done  # a trapped signal interrupts wait: wait again',
              'wait "$STEP"; rc=$?',
              'if [ "$rc" -eq 75 ]; then',
              '  echo "sct: preempted and checkpointed (exit 75): requeueing job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              'echo "sct: job step exited $rc"',
              'exit "$rc"']
    return {"job.sbatch": "\n".join(lines) + "\n", "train.yaml": req.train_yaml}
