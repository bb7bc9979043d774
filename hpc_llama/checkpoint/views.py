"""Readers that make tensors instead of reading them, so every writer can stream from them."""

from __future__ import annotations

import torch

from ..model import ModelConfig, Transformer, init_parameter
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
        out.copy_(self.inner.read(name, verify))

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
