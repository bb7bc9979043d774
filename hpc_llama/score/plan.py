"""Scoring arithmetic: rolling windows, length-bucketed calls, replica rounds, and the scoring head.

Definition (docs/scoring.md): a document's sequence S (its tokens, after a
BOS when the model has one) is scored left to right; every token after the
first is scored given all tokens before it, up to `context` of them. A
document longer than the context is cut into rolling windows so that every
target is scored exactly once, each window keeping up to `context` tokens of
history; `stride` is how many new targets each window after the first adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """One model input: S[start : start+length] predicts S[start+1 : start+length+1];
    only its last `n_scored` predictions count."""

    doc: int
    start: int
    length: int
    n_scored: int


def rolling_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, n_scored) of the windows that score targets 1..n-1 of a sequence of n tokens."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n <= 1:
        return []
    first = min(context, n - 1)
    out = [(0, first, first)]
    done = first
    while done < n - 1:
        end = min(done + stride, n - 1)
        start = max(0, end - context)
        out.append((start, end - start, end - done))
        done = end
    return out


@dataclass(frozen=True)
class Call:
    """One pipeline call: `len(rows)` micro-batches of `batch` rows, each padded to `length`.

    rows[m][b] is a window id.
    """

    batch: int
    length: int
    rows: tuple[tuple[int, ...], ...]

    @property
    def positions(self) -> int:
        return self.batch * self.length * len(self.rows)


def plan_calls(lengths: list[int], tokens_per_batch: int, max_batch: int, micro_batches: int,
               min_fill: float = 0.85) -> list[Call]:
    """Bucket windows of the given lengths into calls, longest first, to keep padding small.

    A call's micro-batches share one shape (B, T): T is the longest window in
    the call and B = min(max_batch, tokens_per_batch // T), at least 1. A call
    takes up to B x micro_batches windows in whole micro-batches, and stops
    at the first window shorter than `min_fill` x T, so no row is padded by
    more than 1 - min_fill; B shrinks so that a short run of windows still
    fills `micro_batches` micro-batches. Rows are never padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    calls, at = [], 0
    while at < len(order):
        T = lengths[order[at]]
        most = max(1, min(max_batch, tokens_per_batch // max(T, 1)))
        end = min(at + most * micro_batches, len(order))
        for k in range(at + 1, end):
            if lengths[order[k]] < min_fill * T:
                end = k
                break
        # Spread a short run over the call's micro-batches (a pipeline needs
        # several in flight), in whole micro-batches; the rest starts the next call.
        B = max(1, min(most, -(-(end - at) // micro_batches)))
        take = order[at:at + B * ((end - at) // B)]
        at += len(take)
        rows = tuple(tuple(take[m:m + B]) for m in range(0, len(take), B))
        calls.append(Call(B, T, rows))
    return calls


def replica_rounds(n_calls: int, dp: int) -> list[list[int | None]]:
    """rounds[r][d]: the call replica d runs in round r (None: a dummy call, so every rank
    makes the same number of pipeline calls). Consecutive calls, similar in cost, run side by side."""
    rounds = []
    for r in range(0, n_calls, dp):
        rounds.append([r + d if r + d < n_calls else None for d in range(dp)])
    return rounds


def call_tensors(call: Call, windows: list[Window], seqs: list, device="cpu"):
    """The micro-batches of a call: (tokens, positions, targets, weights), each (B, T)."""
    out = []
    for row_ids in call.rows:
        tokens = torch.zeros(call.batch, call.length, dtype=torch.long)
        targets = torch.zeros(call.batch, call.length, dtype=torch.long)
        weights = torch.zeros(call.batch, call.length, dtype=torch.bool)
        for b, wid in enumerate(row_ids):
            w = windows[wid]
            seq = seqs[w.doc]
            tokens[b, :w.length] = torch.as_tensor(seq[w.start:w.start + w.length])
            targets[b, :w.length] = torch.as_tensor(seq[w.start + 1:w.start + w.length + 1])
            weights[b, w.length - w.n_scored:w.length] = True
        positions = torch.arange(call.length).expand(call.batch, call.length).contiguous()
        out.append(tuple(t.to(device) for t in (tokens, positions, targets, weights)))
    return out


def dummy_call(device="cpu"):
    """A one-token micro-batch that scores nothing, for a replica with no work this round."""
    z = torch.zeros(1, 1, dtype=torch.long, device=device)
    return [(z, z.clone(), z.clone(), torch.zeros(1, 1, dtype=torch.bool, device=device))]


def score_head(model, h, inputs, chunk_elements: int = 1 << 24):
    """Last stage: log-probabilities of the scored targets.

    Returns (loglik (B,) float64, token_logprobs (B, T) float32, zero where not
    scored). The head runs only on scored positions -- not on padding or on
    context kept from an earlier window -- in pieces of at most
    `chunk_elements` logits, so a 128K vocabulary never materialises (B, T, V).
    """
    targets, weights = inputs[2], inputs[3]
    B, T, D = h.shape
    flat = h.reshape(B * T, D)
    picked = weights.reshape(-1).nonzero().squeeze(1)
    lp = torch.zeros(B * T, dtype=torch.float32, device=h.device)
    step = max(1, chunk_elements // model.cfg.vocab_size)
    tgt = targets.reshape(-1)
    for s in range(0, picked.numel(), step):
        sel = picked[s:s + step]
        logits = model.head(flat[sel]).float()
        lp[sel] = logits.gather(1, tgt[sel, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
    lp = lp.view(B, T)
    return lp.double().sum(dim=1), lp
