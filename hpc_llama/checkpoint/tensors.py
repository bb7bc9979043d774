"""Tensor bookkeeping shared by every checkpoint format: dtypes, checksums, exact reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from ..errors import HpcLlamaError

# dtype name -> (numpy dtype the bytes are stored as, torch dtype). bfloat16 has
# no numpy type: its bytes travel as uint16 and are reinterpreted, never converted.
DTYPES = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float64": (np.float64, torch.float64),
    "int64": (np.int64, torch.int64),
    "int32": (np.int32, torch.int32),
    "int16": (np.int16, torch.int16),
    "int8": (np.int8, torch.int8),
    "uint8": (np.uint8, torch.uint8),
}
TORCH_NAMES = {t: name for name, (_, t) in DTYPES.items()}

CHUNK = 4 << 20  # read and hash in pieces that stay in cache between the two


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are and what they should hash to."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    path: str = ""
    offset: int | None = None
    """Byte offset of contiguous, unfiltered data in `path`; None when the format must decode it."""
    checksum: str | None = None
    """xxh3-64 of the raw bytes as a hex string."""
    attrs: dict = field(default_factory=dict)


def checksum(data) -> str:
    return xxhash.xxh3_64(np.ascontiguousarray(data).view(np.uint8)).hexdigest()


def new_hasher():
    return xxhash.xxh3_64()


def empty_for(info: TensorInfo, device="cpu") -> torch.Tensor:
    if info.dtype not in DTYPES:
        raise HpcLlamaError(f"tensor {info.name} has unsupported dtype {info.dtype}")
    return torch.empty(info.shape, dtype=DTYPES[info.dtype][1], device=device)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's own bytes as a writable numpy array (bf16 as uint16), no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def read_exact(fd: int, offset: int, out: np.ndarray, hasher=None) -> None:
    """Fill `out` with the bytes at `offset`, hashing each piece while it is still in cache."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + CHUNK]], offset + done)
        if n <= 0:
            raise HpcLlamaError(f"unexpected end of file at byte {offset + done}")
        if hasher is not None:
            hasher.update(buf[done:done + n])
        done += n
