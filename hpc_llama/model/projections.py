"""The linear projections of the model and their inference-only forms: nn.Linear that skips its
init on the meta device, and for forward passes only, projections that read the same input
computed as one matmul (`Fused`) and weights prepacked for oneDNN on the CPU (`pack_weight`).

Pure torch, as the rest of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PACK_MIN_ROWS = 3
"""From this many input rows on, a weight prepacked for oneDNN multiplies faster on the CPU than the
plain one (measured on bench-100m's shapes: 1.6x at 8 rows, 1.25x at 512; at 1-2 rows the plain
matrix-vector path is faster, so decoding one sequence keeps it)."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (out, in) in oneDNN's blocked layout for CPU matmuls, or None where there is no such path
    (another device or dtype, a torch without oneDNN)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
    except (AttributeError, RuntimeError):  # an op torch's compiler uses, not a promised API: fall back
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None):
    """x W^T + b, through the prepacked weight when there is one and enough rows to gain from it."""
    if packed is not None and x.numel() >= PACK_MIN_ROWS * x.shape[-1]:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that skips its random init on the meta device, where it would only cost time
    (the first torch.nn.init call on a meta tensor imports torch._dynamo: about a second):
    a slice built there is filled from a checkpoint or by `init_weights` anyway.

    For inference on the CPU it may also hold its weight prepacked (`pack`)."""

    packed: tuple[torch.Tensor, torch.Tensor, int] | None = None
    """(the prepacked weight, the parameter it was packed from, that parameter's version then)."""

    def reset_parameters(self):
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def pack(self) -> bool:
        packed = pack_weight(self.weight)
        self.packed = None if packed is None else (packed, self.weight, self.weight._version)
        return packed is not None

    def forward(self, x):
        packed = self.packed
        # Only while the packed copy stands for the parameter as it is (an in-place change since packing
        # bumps its version), and never where gradients are wanted.
        if (packed is not None and packed[1] is self.weight and packed[2] == self.weight._version
                and not torch.is_grad_enabled()):
            return linear(x, self.weight, self.bias, packed[0])
        return F.linear(x, self.weight, self.bias)


FUSED_GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w1", "feed_forward.w3"))
"""The projections `fuse_projections` computes as one (they read the same input), in their stacking order."""


@dataclass
class Fused:
    """Projections that read the same input computed as one: their weights stacked by rows."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sources: tuple
    """The (module, weight) pairs it stands for."""
    packed: torch.Tensor | None = None
    """The stacked weight prepacked for oneDNN (CPU inference), if packed."""
    versions: tuple[int, ...] = ()
    """The weights' versions when packed: an in-place change since makes the packed copy stale."""

    def usable(self, modules) -> bool:
        # Only while it still stands for the modules' own parameters (a parameter or module replaced
        # after fusing, e.g. by an adapter, or moved to another device, falls back to the separate
        # matmuls), and not where gradients are wanted: the parameters, not the fused view, are what
        # training updates.
        if torch.is_grad_enabled() or modules[0].weight.data_ptr() != self.weight.data_ptr():
            return False
        return all(m is module and m.weight is weight for (module, weight), m in zip(self.sources, modules))

    def pack(self) -> bool:
        self.packed = pack_weight(self.weight)
        self.versions = tuple(w._version for _, w in self.sources)
        return self.packed is not None

    def __call__(self, x):
        packed = self.packed
        if packed is not None and any(w._version != v for (_, w), v in zip(self.sources, self.versions)):
            packed = None  # a weight changed in place since packing: the views hold its new values
        return linear(x, self.weight, self.bias, packed)


def fuse(modules: list[nn.Module]) -> Fused | None:
    """One weight (and bias) for projections that read the same input, so a step runs one matmul
    instead of several, or None where it cannot (an adapter, a quantized or factorised projection,
    weights on different devices or dtypes).

    Weights stacked by rows are one tensor already when they lie side by side in memory (a
    slice loaded so); otherwise they are copied into one and each parameter becomes a view of
    its rows, so the memory stays the same and an in-place change of one shows in the other.
    """
    if not all(type(m) is Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if (len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta"
            or len({b is None for b in biases}) != 1):
        return None
    weight = _stacked(weights)
    bias = None if biases[0] is None else _stacked(biases)
    if weight is None or (biases[0] is not None and bias is None):
        with torch.no_grad():
            weight, bias = torch.cat(weights), None if biases[0] is None else torch.cat(biases)
        rows = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[rows:rows + n], requires_grad=m.weight.requires_grad)
            if bias is not None:
                m.bias = nn.Parameter(bias[rows:rows + n], requires_grad=m.bias.requires_grad)
            rows += n
    return Fused(weight.detach(), None if bias is None else bias.detach(), tuple((m, m.weight) for m in modules))


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the parts are consecutive rows of, as a view, or None if they are not side by side."""
    first = parts[0]
    if not all(p.is_contiguous() for p in parts) or len({p.untyped_storage().data_ptr() for p in parts}) != 1:
        return None
    at = first.data_ptr()
    for p in parts:
        if p.data_ptr() != at:
            return None
        at += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride()).detach()
