"""sct.dist.launcher: ranks from torchrun/deepspeed variables and from srun's, host lists as
`scontrol show hostnames` writes them (compared with the real scontrol in tests/integration/test_slurm.py)."""
import pytest

from sct.dist import launcher
from sct.dist.launcher import Launch, expand_hostlist, export, from_env

SRUN = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456"}


def test_torchrun_and_deepspeed_variables_win():
    env = {**SRUN, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert from_env(env) == Launch("torch", 5, 16, 2, "h0", 29500)


def test_srun_alone_forms_one_job_from_slurm_variables():
    got = from_env(SRUN)
    assert got == Launch("srun", 3, 8, 1, "gpu07", launcher.PORT_BASE + 123456 % launcher.PORT_SPAN)
    assert from_env({**SRUN, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "31000"}).master_addr == "10.0.0.7"  # exported by infra/slurm


def test_batch_shell_without_a_step_is_one_process():
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}  # sbatch's shell: SLURM_PROCID=0, SLURM_NTASKS=N, no step
    assert from_env(batch) == Launch("single")
    assert launcher.world_size(batch) == 1


def test_export_writes_torch_env_and_keeps_what_is_set():
    env = {"MASTER_PORT": "1234"}
    export(from_env(SRUN), env)
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "1234"}


@pytest.mark.parametrize("hostlist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("rack1-[1-2]-ib", ["rack1-1-ib", "rack1-2-ib"]),
])
def test_hostlist_expansion(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]"])
def test_bad_hostlists_name_the_problem(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)
