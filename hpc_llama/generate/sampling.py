"""Choosing the next token, and deciding when a sequence is done. Plain torch, no distribution.

Each sequence samples from its own generator, seeded by (seed, its index in
the input), so its completion does not depend on which replica or batch row
produced it. The settings (temperature, top_k, top_p, seed, stops,
max_new_tokens) are the job's `GenerateConfig`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Finish(enum.StrEnum):
    """Why a sequence stopped (the record's finish_reason)."""

    EOS = "eos"
    """The model produced an end-of-sequence token (it is kept in `tokens`)."""
    STOP = "stop"
    """A stop string appeared; the completion is cut before it."""
    LENGTH = "length"
    """max_new_tokens were generated."""
    CONTEXT = "context"
    """The next token would not fit in the context."""


@dataclass(frozen=True)
class Prompt:
    index: int
    """The prompt's place in the input (its record's index)."""
    id: object
    tokens: tuple[int, ...]


@dataclass
class Sequence:
    """A prompt being completed: its own sampler and the tokens so far."""

    prompt: Prompt
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)


def sequence_generator(seed: int, index: int) -> torch.Generator:
    from ..model.llama import _stable_hash

    return torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(str(index))) % (1 << 63))


def start_sequence(prompt: Prompt, cfg) -> Sequence:
    return Sequence(prompt, sequence_generator(cfg.seed, prompt.index) if cfg.temperature > 0 else None)


def next_token(logits: torch.Tensor, cfg, generator: torch.Generator | None) -> int:
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


def finish_reason(seq: Sequence, token: int, eos: set[int], cfg, capacity: int, text) -> Finish | None:
    """Whether `seq` ends with `token` (already appended), and why; `text()` decodes the completion."""
    if token in eos:
        return Finish.EOS
    if cfg.stops and find_stop(text(), cfg.stops) is not None:
        return Finish.STOP
    if len(seq.generated) >= cfg.max_new_tokens:
        return Finish.LENGTH
    if len(seq.prompt.tokens) + len(seq.generated) > capacity:
        return Finish.CONTEXT  # the next token would sit past the context
    return None


def completion_record(seq: Sequence, reason: Finish, text: str, stops: tuple[str, ...]) -> dict:
    """The output record of a finished sequence (the completion cut before a stop string)."""
    if reason == Finish.STOP:
        text = text[:find_stop(text, stops)]
    return {"index": seq.prompt.index, "id": seq.prompt.id, "completion": text, "tokens": seq.generated,
            "n_prompt_tokens": len(seq.prompt.tokens), "n_new_tokens": len(seq.generated),
            "finish_reason": reason.value}
