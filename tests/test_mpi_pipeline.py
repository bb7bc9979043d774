"""Real multi-rank runs: `mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests`.

Each rank loads only its own slice from the .h5, DeepSpeed's pipeline engine
runs forward-only on CPU/gloo, and the last stage's logits equal the
single-process model. Without mpirun these tests are skipped by pytest-mpi
(the serial run covers the same code through the subprocess tests).
"""

import os

import pytest

from helpers.models import make_hf_model

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mpi4py import MPI

    from hpc_llama.parallel.ranks import describe_rank, start_distributed

    comm = MPI.COMM_WORLD
    info = describe_rank(comm)
    start_distributed(info, comm, timeout_s=120)
    # Rank 0 writes the checkpoint; every rank reads its own slice of it.
    path = comm.bcast(str(tmp_path_factory.mktemp("mpi")) if info.rank == 0 else None)
    ckpt = os.path.join(path, "m.h5")
    if info.rank == 0:
        from hpc_llama.checkpoint import open_checkpoint
        from hpc_llama.checkpoint.h5 import write_checkpoint

        make_hf_model("llama3").save_pretrained(os.path.join(path, "hf"))
        with open_checkpoint(os.path.join(path, "hf")) as r:
            write_checkpoint(ckpt, r)
    comm.Barrier()
    return comm, info, ckpt


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_pipeline_forward_equals_single_process(world, pp):
    from hpc_llama.checkpoint import open_checkpoint

    from helpers.pipeline_forward import check_forward

    comm, info, ckpt = world
    if info.world_size % pp:
        pytest.skip(f"{pp} stages do not divide {info.world_size} ranks")
    result = check_forward(open_checkpoint(ckpt), info, pp)
    # This rank's module holds its own layers and nothing else.
    assert result["layers"] == result["expected_layers"]
    # The last stage compared its outputs with the whole model; the others have no outputs to compare.
    if result["stage"] == pp - 1:
        assert result["max_abs"] is not None and result["max_abs"] <= 1e-5, result
    else:
        assert result["max_abs"] is None, result
    comm.Barrier()
