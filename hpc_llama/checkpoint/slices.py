"""A rank's model slice, built from any checkpoint: only the tensors of the layers it owns are read.

The slice is the same `Transformer` with parts missing (layers keyed by their
global number, embedding and head optional), built on the meta device; only
its own parameters are materialised, straight from the file.
"""

from __future__ import annotations

import time

import torch

from ..errors import HpcLlamaError
from ..model.llama import Transformer
from ..model.projections import FUSED_GROUPS
from ..model.quantized import SCHEMES as QUANT_SCHEMES
from ..procstats import bytes_read
from .base import CheckpointReader
from .tensors import DTYPES, carve, empty_for


def source_name(reader: CheckpointReader, name: str) -> str:
    """The stored tensor that fills parameter `name` (a tied head reads the embedding)."""
    if name == "output.weight" and reader.config.tie_embeddings and not reader.has(name):
        return "tok_embeddings.weight"
    return name


def check_structure(reader: CheckpointReader) -> None:
    """Every parameter the config implies is stored, with the shape the config implies; nothing else is."""
    shapes = {n: tuple(p.shape) for n, p in Transformer(reader.config, device="meta").named_parameters()}
    stored = set(reader.names())
    for name, shape in shapes.items():
        src = source_name(reader, name)
        if src not in stored:
            raise HpcLlamaError(f"{reader.path}: tensor {src} is missing")
        info = reader.info(src)
        if info.logical_shape != shape:
            raise HpcLlamaError(f"{reader.path}: tensor {src} has shape {list(info.logical_shape)} "
                                f"but the model config says {list(shape)}")
    extra = stored - set(shapes) - {"output.weight"}
    if extra:
        raise HpcLlamaError(f"{reader.path}: tensor {sorted(extra)[0]} is not part of the configured model")


def slice_sources(reader: CheckpointReader, layers=None, embed: bool = True, head: bool = True) -> list[str]:
    """The stored tensors a slice reads, each once."""
    model = Transformer(reader.config, layers, embed, head, device="meta")
    return sorted({source_name(reader, n) for n, _ in model.named_parameters()})


def load_slice(reader: CheckpointReader, layers=None, embed: bool = True, head: bool = True,
               device="cpu", dtype: torch.dtype | None = None, verify: bool = True,
               stats: dict | None = None) -> Transformer:
    """Build the model slice owning `layers` (global ids; None = all), the embedding and/or the
    head, on `device`, and fill it from the checkpoint. Nothing outside the slice is read.

    The slice is built on the meta device and only its own parameters are
    materialised; `dtype` None keeps the stored dtype. `stats`, when given,
    receives the bytes this process read (Linux) and the seconds it took.
    """
    t0 = time.perf_counter()
    cfg = reader.config
    model = Transformer(cfg, layers, embed, head, device="meta")
    read_before = bytes_read()  # after building the module, whose first use may import (and read) code
    params = dict(model.named_parameters())
    infos = {n: reader.info(source_name(reader, n)) for n in params}
    if dtype is None:
        stored = {i.logical_dtype for i in infos.values()}
        dtype = torch_dtype(stored.pop()) if len(stored) == 1 else torch.float32
    for name, param in params.items():
        info = infos[name]
        if tuple(param.shape) != info.logical_shape:
            raise HpcLlamaError(f"{reader.path}: tensor {info.name} has shape {list(info.logical_shape)} "
                                f"but the model config says {list(param.shape)}")
    packed = {n: i for n, i in infos.items() if i.scheme in QUANT_SCHEMES}
    dense = {n: i for n, i in infos.items() if n not in packed}
    in_place = torch.device(device).type == "cpu" and all(torch_dtype(i.dtype) == dtype for i in dense.values())
    # On the CPU in the stored dtype, tensors are read straight into their
    # final place (one huge-page backed block); otherwise each is staged
    # through its own buffer, so a GPU load never holds the slice twice.
    # Read in file order, so storage sees one forward sweep and its readahead works.
    order = sorted(dense.items(), key=lambda kv: (kv[1].path, kv[1].offset or 0))
    places = {}
    if in_place:  # laid out so each fused group's weights (and biases) are side by side: fusing copies nothing
        layout = placement(list(dense))
        places = dict(zip(layout, carve([dense[n] for n in layout])))
    modules = dict(model.named_modules())
    for name, info in order:
        place = places.get(name)
        t = place if place is not None else empty_for(info)
        reader.read_into(info.name, t, verify)
        if place is None:
            t = t.to(device=device, dtype=dtype)
        _set_parameter(modules, name, t)
    for name, info in sorted(packed.items()):
        _set_packed(model, name, reader, info, device, dtype, verify)
    model.tie_weights()
    if stats is not None:
        stats["bytes_read"] = None if read_before is None else bytes_read() - read_before
        stats["seconds"] = round(time.perf_counter() - t0, 3)
    return model.eval()


def placement(names: list[str]) -> list[str]:
    """The order parameters are laid out in memory: the model's, except that the members of each group
    `fuse_projections` makes (q/k/v, gate/up) come side by side, weights then biases, at the first one's place."""
    present, done, out = set(names), set(), []
    for name in names:
        if name in done:
            continue
        prefix, _, leaf = name.rpartition(".")
        members = [name]
        for group in FUSED_GROUPS:
            for path in group:
                if prefix.endswith("." + path):
                    base = prefix[:-len(path)]
                    members = [f"{base}{p}.{kind}" for kind in ("weight", "bias") for p in group]
                    members = [m for m in members if m in present and m not in done]
        out += members
        done.update(members)
    return out


def _set_packed(model: Transformer, name: str, reader: CheckpointReader, info, device, dtype, verify) -> None:
    """Put a quantized weight in place: its Linear becomes a QuantizedLinear that keeps it packed."""
    from ..model.quantized import QuantizedEmbedding, QuantizedLinear

    data = reader.read(info.name, verify).to(device)
    parts = {role: reader.read_part(info.name, role, verify).to(device) for role in info.parts}
    path = name.rsplit(".", 1)[0]
    old = model.get_submodule(path)
    bias = getattr(old, "bias", None)
    bias = None if bias is None else bias.detach()
    table = QuantizedLinear(data, parts, info.attrs, bias)
    if path == "tok_embeddings":
        model.tok_embeddings = QuantizedEmbedding(table, dtype)
        if model.output is not None and model.cfg.tie_embeddings:
            model.output = table  # the tied head computes with the same packed table
        return
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, table)


def _set_parameter(modules: dict[str, torch.nn.Module], name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = modules[path]
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HpcLlamaError(f"unsupported tensor dtype {name}")
    return DTYPES[name][1]
