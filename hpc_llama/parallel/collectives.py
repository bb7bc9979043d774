"""The messages hpc_llama sends between ranks itself, over MPI.

- numeric gathers: counts first, then Gatherv/Allgatherv on numpy buffers;
- a tensor stream to one rank (an export or a compressed model arriving at
  rank 0, one tensor in memory at a time): a small pickled header per item,
  then each tensor's raw bytes with Send -- no tensor is ever pickled;
- a hand-off of activations from one rank to the next (compression's
  calibration runs the original model rank after rank).

Two other paths move activations, and stay theirs: DeepSpeed's pipeline
engine (scoring, training) and generation's ring of stages, which uses
torch.distributed because its hidden states live on the device (NCCL moves
them GPU to GPU, and isend overlaps the hand-off with the next group's work).
"""

from __future__ import annotations

import numpy as np

# One tag per kind of point-to-point message, so two kinds between the same
# pair of ranks never match each other's receives.
STREAM_HEADER, STREAM_DATA, HANDOFF = 21, 22, 23


def allgather_array(comm, local: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D array, on every rank, in rank order."""
    if comm.Get_size() == 1:
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
    if comm.Get_size() == 1:
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


def send_tensors(comm, dest: int, items) -> None:
    """Stream `items`, each (key, [tensors], meta), to rank `dest`; `recv_tensors` there yields them.

    `meta` is small picklable metadata (a dict of attributes, say); the
    tensors travel as raw bytes in their own dtype (bf16 too).
    """
    from ..checkpoint.tensors import TORCH_NAMES, numpy_view

    for key, tensors, meta in items:
        tensors = [t.detach().contiguous() for t in tensors]
        comm.send((key, [(TORCH_NAMES[t.dtype], tuple(t.shape)) for t in tensors], meta), dest=dest,
                  tag=STREAM_HEADER)
        for t in tensors:
            comm.Send(np.ascontiguousarray(numpy_view(t)), dest=dest, tag=STREAM_DATA)
    comm.send(None, dest=dest, tag=STREAM_HEADER)


def recv_tensors(comm, source: int):
    """The items of one `send_tensors` stream from rank `source`, each (key, [tensors], meta), as they arrive."""
    import torch

    from ..checkpoint.tensors import DTYPES, numpy_view

    while (header := comm.recv(source=source, tag=STREAM_HEADER)) is not None:
        key, specs, meta = header
        tensors = []
        for dtype, shape in specs:
            t = torch.empty(shape, dtype=DTYPES[dtype][1])
            comm.Recv(numpy_view(t), source=source, tag=STREAM_DATA)
            tensors.append(t)
        yield key, tensors, meta


def send_activations(comm, dest: int, h) -> None:
    """Hidden states (as fp32) to the next rank of a chain; the receiver knows their shape."""
    comm.Send(np.ascontiguousarray(h.detach().float().numpy()), dest=dest, tag=HANDOFF)


def recv_activations(comm, source: int, shape):
    import torch

    buf = np.empty(shape, np.float32)
    comm.Recv(buf, source=source, tag=HANDOFF)
    return torch.from_numpy(buf)
