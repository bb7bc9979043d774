"""One rank raises while the others wait in a collective: every rank must end promptly.

    mpirun -n 4 python tests/helpers/raise_on_rank.py 2
"""

import sys
import time


def job(argv):
    import torch
    import torch.distributed as dist

    from hpc_llama.parallel.ranks import describe_rank, start_distributed, world_comm

    comm = world_comm()
    info = describe_rank(comm)
    start_distributed(info, comm, timeout_s=600)
    if info.rank == int(argv[0]):
        time.sleep(1)
        raise RuntimeError("deliberate failure")
    dist.all_reduce(torch.ones(1))  # blocks: the failing rank never joins
    time.sleep(600)


if __name__ == "__main__":
    from hpc_llama.parallel.ranks import run_guarded

    sys.exit(run_guarded(job, sys.argv[1:]))
