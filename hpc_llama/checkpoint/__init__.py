"""Checkpoints: open any supported format for reading (`slices.load_slice` builds a rank's part of the model).

Formats: the hpc_llama HDF5 file (`.h5`, h5.py), a directory of HDF5 shards
with `index.json` (h5.py), an HF model directory (config.json + safetensors,
hf.py), and llama.cpp's GGUF (gguf.py, read only). Each is read tensor by
tensor, so a rank touches only the bytes of the parts it owns.
"""

from __future__ import annotations

import os

from ..errors import HpcLlamaError
from .base import CheckpointReader
from .h5 import INDEX, H5Checkpoint
from .hf import HFCheckpoint

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_checkpoint(path: str) -> CheckpointReader:
    """Open a checkpoint of any supported format for reading (`smollm2-135m`: the embedded model)."""
    from ..embedded import resolve

    path = resolve(path)
    if not os.path.exists(path):
        raise HpcLlamaError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, INDEX)):
            return H5Checkpoint(path)
        if os.path.isfile(os.path.join(path, "config.json")):
            return HFCheckpoint(path)
        if any(f.endswith(".safetensors") for f in os.listdir(path)):
            raise HpcLlamaError(f"{path}: HF model directory without config.json")
        raise HpcLlamaError(f"{path}: not a checkpoint directory (no {INDEX} or config.json)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == HDF5_SIGNATURE:
        return H5Checkpoint(path)
    if magic[:4] == b"GGUF":
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.endswith(".safetensors"):
        raise HpcLlamaError(f"{path}: a lone .safetensors file has no model config; give its HF directory")
    raise HpcLlamaError(f"{path}: not a checkpoint (neither HDF5, GGUF nor a model directory)")

