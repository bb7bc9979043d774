"""Readers that make tensors instead of reading them, so every writer can stream from them."""

from __future__ import annotations

import torch

from ..model.llama import ModelConfig, Transformer, init_parameter
from .base import CheckpointReader, unit_order
from .hf import hf_config_from_model
from .tensors import DTYPES, TORCH_NAMES, TensorInfo


class CastReader(CheckpointReader):
    """Another reader's tensors, floating-point ones cast to `dtype`."""

    def __init__(self, inner: CheckpointReader, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype
        self.path, self.format, self.config = inner.path, inner.format, inner.config
        self.hf_config = dict(inner.hf_config, torch_dtype=TORCH_NAMES[dtype])
        self.hf_config.pop("dtype", None)

    def names(self):
        return self.inner.names()

    def info(self, name):
        i = self.inner.info(name)
        if not DTYPES[i.dtype][1].is_floating_point:
            return i
        size = torch.empty((), dtype=self.dtype).element_size()
        return TensorInfo(name, i.shape, TORCH_NAMES[self.dtype], size * (i.nbytes // DTYPES[i.dtype][1].itemsize))

    def read_into(self, name, out, verify=True):
        for where, piece in self.inner.read_pieces(name, verify):  # the cast and one piece, not two tensors
            out[where].copy_(piece)

    def assets(self):
        return self.inner.assets()

    def close(self):
        self.inner.close()


class InitReader(CheckpointReader):
    """A freshly initialised model (seeded, layout-independent), made one tensor at a time."""

    def __init__(self, cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32,
                 assets: dict[str, bytes] | None = None):
        self.path, self.format, self.config = f"<init seed={seed}>", "init", cfg
        self.seed, self.dtype, self._assets = seed, dtype, assets or {}
        self.hf_config = hf_config_from_model(cfg, TORCH_NAMES[dtype])
        model = Transformer(cfg, device="meta")
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._names = sorted(self._shapes, key=unit_order)

    def names(self):
        return self._names

    def info(self, name):
        shape = self._shapes[name]
        n = 1
        for s in shape:
            n *= s
        return TensorInfo(name, shape, TORCH_NAMES[self.dtype], n * self.dtype.itemsize)

    def read_into(self, name, out, verify=True):
        out.copy_(init_parameter(name, self._shapes[name], self.config.n_layers, self.seed, self.dtype))

    def assets(self):
        return dict(self._assets)


class DenseReader(CheckpointReader):
    """A compressed checkpoint seen as the dense model it computes.

    Quantized tensors are dequantized to their logical dtype, a factor pair
    `X.a.weight`, `X.b.weight` becomes `X.weight` = b @ a (and `X.b.bias`
    becomes `X.bias`); pruned tensors are ordinary ones. Pruned per-layer
    shapes stay in the config, so the result is still a format-2 checkpoint
    unless `uniform_hf` folds equal shapes into HF's own fields.
    """

    def __init__(self, inner: CheckpointReader):
        from .hf import model_config_from_hf

        self.inner, self.path, self.format = inner, inner.path, inner.format
        hf = dict(inner.hf_config)
        ours = dict(hf.get("hpc_llama") or {})
        self._factored = set(ours.pop("lowrank", None) or {})
        ours["compression"] = list(ours.get("compression", [])) + [{"method": "dequantize"}]
        ours["lowrank"] = {}
        hf["hpc_llama"] = ours
        self.hf_config, self.config = hf, model_config_from_hf(hf)
        self._source = {}
        for n in inner.names():
            prefix, _, leaf = n.rpartition(".")
            owner = prefix.rpartition(".")[0]
            if owner in self._factored and prefix.endswith((".a", ".b")):
                if n.endswith(".a.weight"):
                    self._source[f"{owner}.weight"] = ("product", owner)
                elif leaf == "bias":
                    self._source[f"{owner}.bias"] = ("copy", n)
                continue
            self._source[n] = ("copy", n)
        self._names = sorted(self._source, key=unit_order)

    def names(self):
        return self._names

    def info(self, name):
        kind, src = self._source[name]
        if kind == "product":
            a, b = self.inner.info(f"{src}.a.weight"), self.inner.info(f"{src}.b.weight")
            shape, dtype = (b.logical_shape[0], a.logical_shape[1]), a.logical_dtype
        else:
            i = self.inner.info(src)
            shape, dtype = i.logical_shape, i.logical_dtype
        n = 1
        for s in shape:
            n *= s
        return TensorInfo(name, tuple(shape), dtype, n * DTYPES[dtype][1].itemsize)

    def _dense(self, name, verify):
        from ..model.quantized import SCHEMES, dequantize

        i = self.inner.info(name)
        t = self.inner.read(name, verify)
        if i.scheme in SCHEMES:
            t = dequantize(t, {r: self.inner.read_part(name, r, verify) for r in i.parts}, i.attrs)
        return t

    def read_into(self, name, out, verify=True):
        kind, src = self._source[name]
        if kind == "product":
            a, b = self._dense(f"{src}.a.weight", verify), self._dense(f"{src}.b.weight", verify)
            out.copy_((b.double() @ a.double()).to(out.dtype))
        else:
            out.copy_(self._dense(src, verify))

    def assets(self):
        return self.inner.assets()

    def close(self):
        self.inner.close()


def uniform_hf(reader: CheckpointReader) -> dict:
    """The HF config.json of a dense checkpoint: per-layer shapes folded into HF's fields when every layer
    has the same; a model whose layers differ has no HF form and is refused."""
    from ..errors import HpcLlamaError

    hf = dict(reader.hf_config)
    ours = hf.pop("hpc_llama", None) or {}
    cfg = reader.config
    if ours.get("lowrank"):
        raise HpcLlamaError(f"{reader.path}: projections stored as low-rank factors have no HF form; "
                            f"give --dequantize to multiply them back")
    shapes = {cfg.layer_shape(i) for i in range(cfg.n_layers)}
    if len(shapes) > 1:
        raise HpcLlamaError(f"{reader.path}: structured pruning left layers of different shapes "
                            f"({len(shapes)} kinds), which an HF Llama config cannot describe")
    heads, ffn = shapes.pop()
    hf.update(num_attention_heads=heads, intermediate_size=ffn, head_dim=cfg.head_dim)
    return hf
