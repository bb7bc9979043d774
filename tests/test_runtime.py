"""The launcher environment read into a RankInfo: table tests over real variable sets."""

import pytest

from hpc_llama.errors import HpcLlamaError
from hpc_llama.parallel.ranks import _launcher, check_slurm_world, choose_device, describe_rank, local_rank_from_env

MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "5"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURMD_NODENAME": "n2", "PMI_RANK": "3", "PMI_FD": "7"}
# mpirun inside an sbatch script: Slurm's batch variables are present but
# hydra launched the ranks, so its own variables win.
MPICH_IN_SBATCH = {**SRUN, **MPICH}


@pytest.mark.parametrize("env, launcher, local", [
    ({}, "python", None),
    (MPICH, "mpich", 1),
    (OMPI, "openmpi", 1),
    (SRUN, "srun", 1),
    (MPICH_IN_SBATCH, "mpich", 1),
    ({"SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}, "python", None),  # a batch shell, not a task
])
def test_launcher_and_local_rank(env, launcher, local):
    assert _launcher(env) == launcher
    assert local_rank_from_env(env, launcher) == local


@pytest.mark.parametrize("local, count, force, device", [
    (0, 0, None, "cpu"), (3, 0, None, "cpu"), (1, 4, None, "cuda:1"), (1, 4, "cpu", "cpu"),
])
def test_choose_device(local, count, force, device):
    assert choose_device(local, count, force) == device


def test_more_ranks_than_gpus_is_an_error():
    with pytest.raises(HpcLlamaError, match="only 2 GPUs"):
        choose_device(2, 2)


def test_srun_world_size_mismatch_is_refused():
    check_slurm_world(4, SRUN)
    check_slurm_world(1, MPICH)
    with pytest.raises(HpcLlamaError, match="--mpi plugin"):
        check_slurm_world(1, SRUN)


def test_plain_python_is_a_world_of_one():
    info = describe_rank(comm=None, environ={}, cuda_count=0)
    assert (info.rank, info.world_size, info.local_rank, info.device, info.launcher) == (0, 1, 0, "cpu", "python")
