"""Low-rank adapters (LoRA) on a model's linear projections, in plain torch.

`add_lora` replaces chosen `Linear` modules by `LoRALinear`, which keeps the
original weight (frozen) under the same name and adds `lora_a` (r, in) and
`lora_b` (out, r): y = x W^T + (alpha / r) (x A^T) B^T. B starts at zero, so
an adapted model starts out equal to its base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .projections import Linear

ATTENTION = ("wq", "wk", "wv", "wo")


class LoRALinear(Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, in the base weight's dtype (computed in fp32)."""
        w = self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())
        return w.to(self.weight.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=ATTENTION, seed: int = 0) -> list[str]:
    """Put adapters on every Linear named in `targets`; freeze everything else. Returns adapted module names.

    Each adapter's A is drawn from a generator seeded by (seed, module name),
    so every layout starts from the same adapters.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            wrapped = LoRALinear(module, rank, alpha)
            g = torch.Generator().manual_seed(hash_name(seed, name))
            with torch.no_grad():
                bound = 1 / math.sqrt(module.in_features)
                wrapped.lora_a.copy_((torch.rand(wrapped.lora_a.shape, generator=g) * 2 - 1) * bound)
            setattr(parent, leaf, wrapped)
            adapted.append(name)
    return adapted


def hash_name(seed: int, name: str) -> int:
    from .llama import _stable_hash

    return (seed * 1_000_003 + _stable_hash(name)) % (1 << 63)

