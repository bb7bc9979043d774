"""Numeric collectives on numpy buffers (counts first, then Gatherv/Allgatherv)."""

from __future__ import annotations

import numpy as np


def allgather_array(comm, local: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D array, on every rank, in rank order."""
    if comm is None or comm.Get_size() == 1:
        return [local]
    from mpi4py import MPI

    local = np.ascontiguousarray(local)
    counts = np.array(comm.allgather(local.size), dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=local.dtype)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Allgatherv(local, [out, counts, displs, MPI._typedict[local.dtype.char]])
    return np.split(out, np.cumsum(counts)[:-1])


def gather_array(comm, local: np.ndarray, root: int = 0) -> list[np.ndarray] | None:
    """Every rank's 1-D array on `root` (None elsewhere), in rank order."""
    if comm is None or comm.Get_size() == 1:
        return [local]
    from mpi4py import MPI

    local = np.ascontiguousarray(local)
    counts = comm.gather(local.size, root=root)
    if comm.Get_rank() == root:
        counts = np.array(counts, dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=local.dtype)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        comm.Gatherv(local, [out, counts, displs, MPI._typedict[local.dtype.char]], root=root)
        return np.split(out, np.cumsum(counts)[:-1])
    comm.Gatherv(local, None, root=root)
    return None
