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

CHUNK = 256 << 10
"""Bytes per pread. Each piece is hashed right after it is read, while it is still in the reading core's own
cache: hashing it later, or on another core, costs more than the hashing itself (docs/performance.md)."""

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
    """How to rebuild the logical tensor when it is stored compressed (`scheme`, ...; docs/checkpoint.md)."""
    parts: dict = field(default_factory=dict)
    """role -> TensorInfo of a companion dataset (a quantized tensor's scale and offset)."""
    disk_bytes: int | None = None
    """Bytes the tensor and its parts take in the file, where a filter makes that differ from nbytes."""

    @property
    def scheme(self) -> str:
        return self.attrs.get("scheme", "none")

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape the model computes with (a packed tensor's stored shape differs)."""
        return tuple(self.attrs.get("logical_shape", self.shape))

    @property
    def logical_dtype(self) -> str:
        return self.attrs.get("logical_dtype", self.dtype)

    @property
    def stored_bytes(self) -> int:
        """Bytes in the file: the tensor and its parts, after any filter."""
        if self.disk_bytes is not None:
            return self.disk_bytes
        return self.nbytes + sum(p.stored_bytes for p in self.parts.values())


def checksum(data) -> str:
    return xxhash.xxh3_64(np.ascontiguousarray(data).view(np.uint8)).hexdigest()


def new_hasher():
    return xxhash.xxh3_64()


def empty_for(info: TensorInfo) -> torch.Tensor:
    """An uninitialised CPU tensor for `info`'s bytes.

    Allocated by numpy, which asks the kernel for transparent huge pages on
    large arrays: first-touching the memory while reading it in is then
    about twice as fast as with torch's own allocator.
    """
    if info.dtype not in DTYPES:
        raise HpcLlamaError(f"tensor {info.name} has unsupported dtype {info.dtype}")
    np_dtype, dtype = DTYPES[info.dtype]
    t = torch.from_numpy(np.empty(info.shape, np_dtype))
    return t.view(dtype) if t.dtype != dtype else t


def carve(infos: list[TensorInfo], align: int = 64) -> list[torch.Tensor]:
    """Uninitialised CPU tensors for several infos, carved out of one allocation.

    One large numpy allocation is backed by transparent huge pages, so
    filling it faults in 2 MiB at a time instead of 4 KiB: loading a slice
    this way is close to the speed of a plain read of its bytes. Each tensor
    starts on an `align`-byte boundary.
    """
    offsets, total = [], 0
    for info in infos:
        if info.dtype not in DTYPES:
            raise HpcLlamaError(f"tensor {info.name} has unsupported dtype {info.dtype}")
        offsets.append(total)
        total += -(-info.nbytes // align) * align
    arena = np.empty(total + align, np.uint8)
    start = -arena.ctypes.data % align
    # Views of one torch tensor share one storage, so tensors laid out side by side can be used as
    # one (the fused projections of model.llama) without a copy.
    block = torch.from_numpy(arena)
    out = []
    for info, off in zip(infos, offsets):
        out.append(block[start + off:start + off + info.nbytes].view(DTYPES[info.dtype][1]).view(info.shape))
    return out


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's own bytes as a writable numpy array (bf16 as uint16), no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def read_exact(fd: int, offset: int, out: np.ndarray, hasher=None) -> None:
    """Fill `out` with the bytes at `offset`, feeding each CHUNK to `hasher` as soon as it is read."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buf):
        piece = buf[done:done + CHUNK]
        n = os.preadv(fd, [piece], offset + done)
        if n <= 0:
            raise HpcLlamaError(f"unexpected end of file at byte {offset + done}")
        if hasher is not None:
            hasher.update(piece[:n])
        done += n
