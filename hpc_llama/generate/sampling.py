"""Choosing the next token, and deciding when a sequence is done. Plain torch, no distribution.

Each sequence samples from its own generator, seeded by (seed, its index in
the input), so its completion does not depend on which replica or batch row
produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Why a sequence stopped.
EOS, STOP, LENGTH, CONTEXT = "eos", "stop", "length", "context"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0: greedy (argmax); otherwise logits are divided by this before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    seed: int = 0
    """Seed of every sequence's own generator (mixed with its index)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")


def sequence_generator(seed: int, index: int) -> torch.Generator:
    from ..model.llama import _stable_hash

    return torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(str(index))) % (1 << 63))


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (vocab,), by inverse-CDF sampling with one uniform draw."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.double() / cfg.temperature
    order = torch.sort(scores, descending=True, stable=True).indices
    scores = scores[order]
    if cfg.top_k:
        scores = scores[:cfg.top_k]
        order = order[:cfg.top_k]
    probs = torch.softmax(scores, dim=0)
    if cfg.top_p < 1:
        keep = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(cfg.top_p, dtype=probs.dtype))) + 1
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    u = torch.rand((), generator=generator, dtype=torch.float64)
    i = int(torch.searchsorted(torch.cumsum(probs, 0), u, right=True))
    return int(order[min(i, len(order) - 1)])


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
