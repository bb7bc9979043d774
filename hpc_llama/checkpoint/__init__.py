"""Checkpoints: open any supported format for reading (`slices.load_slice` builds a rank's part of the model).

Formats: the hpc_llama HDF5 file (`.h5`, h5.py), a directory of HDF5 shards
with `index.json` (h5.py), an HF model directory (config.json + safetensors,
hf.py), and llama.cpp's GGUF (gguf.py, read only). Each is read tensor by
tensor, so a rank touches only the bytes of the parts it owns.

Model files come from strangers, so every reader holds them to this before
anything is allocated from what they claim: every file an index names is a
plain name inside the model directory (`base.file_inside`); every tensor's
claimed size is held by its file (`nbytes` of a TensorInfo is backed by bytes
on disk, up to deflate's or dequantization's known expansion); the config's
values are in range (`ModelConfig.__post_init__`) and its layer count is the
file's (`base.check_layers`); and `load_slice` compares every shape the config
implies with the stored one before it allocates. A malformed file is one
HpcLlamaError naming the file and what is wrong, never a raw exception.
"""

from __future__ import annotations

import os

from ..errors import HpcLlamaError
from .base import CheckpointReader, check_layers
from .h5 import INDEX, H5Checkpoint
from .hf import HFCheckpoint

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_checkpoint(path: str) -> CheckpointReader:
    """Open a checkpoint of any supported format for reading (`smollm2-135m`: the embedded model)."""
    reader = _open(path)
    try:
        check_layers(reader)
    except BaseException:
        reader.close()
        raise
    return reader


def _open(path: str) -> CheckpointReader:
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
    if not os.path.isfile(path):
        raise HpcLlamaError(f"{path}: not a regular file or directory")
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

