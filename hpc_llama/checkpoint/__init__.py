"""Checkpoints: open any supported format, and build a rank's model slice from it.

Formats: the hpc_llama HDF5 file (`.h5`), a directory of HDF5 shards with
`index.json`, and an HF model directory (config.json + safetensors). Each is
read tensor by tensor, so a rank touches only the bytes of the parts it owns.
"""

from __future__ import annotations

import os

import torch

from ..errors import HpcLlamaError
from ..model import Transformer
from .base import CheckpointReader
from .h5 import INDEX, H5Checkpoint
from .hf import HFCheckpoint
from .tensors import DTYPES

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_checkpoint(path: str) -> CheckpointReader:
    """Open a checkpoint of any supported format for reading."""
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
    if path.endswith(".safetensors"):
        raise HpcLlamaError(f"{path}: a lone .safetensors file has no model config; give its HF directory")
    raise HpcLlamaError(f"{path}: not a checkpoint (neither HDF5 nor a model directory)")


def source_name(reader: CheckpointReader, name: str) -> str:
    """The stored tensor that fills parameter `name` (a tied head reads the embedding)."""
    if name == "output.weight" and reader.config.tie_embeddings and not reader.has(name):
        return "tok_embeddings.weight"
    return name


def slice_sources(reader: CheckpointReader, layers=None, embed: bool = True, head: bool = True) -> list[str]:
    """The stored tensors a slice reads, each once."""
    with torch.device("meta"):
        model = Transformer(reader.config, layers, embed, head)
    return sorted({source_name(reader, n) for n, _ in model.named_parameters()})


def load_slice(reader: CheckpointReader, layers=None, embed: bool = True, head: bool = True,
               device="cpu", dtype: torch.dtype | None = None, verify: bool = True) -> Transformer:
    """Build the model slice owning `layers` (global ids; None = all), the embedding and/or the
    head, on `device`, and fill it from the checkpoint. Nothing outside the slice is read.

    The slice is built on the meta device and only its own parameters are
    materialised; `dtype` None keeps the stored dtype.
    """
    cfg = reader.config
    with torch.device("meta"):
        model = Transformer(cfg, layers, embed, head)
    names = dict(model.named_parameters())
    infos = {n: reader.info(source_name(reader, n)) for n in names}
    if dtype is None:
        dtype = {i.dtype for i in infos.values()}
        dtype = torch.float32 if len(dtype) != 1 else torch_dtype(dtype.pop())
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    for name, param in model.named_parameters():
        info = infos[name]
        if tuple(param.shape) != info.shape:
            raise HpcLlamaError(f"{reader.path}: tensor {info.name} has shape {list(info.shape)} "
                                f"but the model config says {list(param.shape)}")
        with torch.no_grad():
            if param.device.type == "cpu" and torch_dtype(info.dtype) == param.dtype:
                reader.read_into(info.name, param.data, verify)  # straight into place, no copy
            else:
                param.copy_(reader.read(info.name, verify))
    return model.eval()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HpcLlamaError(f"unsupported tensor dtype {name}")
    return DTYPES[name][1]
