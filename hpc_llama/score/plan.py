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

    def pieces(self) -> list[tuple[int, int, int]]:
        """(doc, first, end) of the row positions whose predictions count, per document."""
        return [(self.doc, self.length - self.n_scored, self.length)]

    def fill(self, seqs, tokens, positions, segments, targets, weights) -> None:
        seq = seqs[self.doc]
        tokens[:self.length] = torch.as_tensor(seq[self.start:self.start + self.length])
        targets[:self.length] = torch.as_tensor(seq[self.start + 1:self.start + self.length + 1])
        weights[self.length - self.n_scored:self.length] = True


@dataclass(frozen=True)
class Packed:
    """Conditional requests that share their first `shared` ids (one context), scored from one copy of it.

    The row is the context but its last id (segment 0), then per request a
    segment of its own: the context's last id and the continuation's ids but
    the last, at the positions they have in the request alone. The model's
    segment rule keeps requests from seeing each other, so each prediction is
    the one the request would get scored alone.
    """

    docs: tuple[int, ...]
    shared: int
    continuations: tuple[int, ...]
    """Each request's number of continuation ids (at least 1)."""

    @property
    def length(self) -> int:
        return self.shared - 1 + sum(self.continuations)

    def pieces(self) -> list[tuple[int, int, int]]:
        out, at = [], self.shared - 1
        for doc, n in zip(self.docs, self.continuations, strict=True):
            out.append((doc, at, at + n))
            at += n
        return out

    def fill(self, seqs, tokens, positions, segments, targets, weights) -> None:
        c = self.shared
        tokens[:c - 1] = torch.as_tensor(seqs[self.docs[0]][:c - 1])
        for k, (doc, lo, hi) in enumerate(self.pieces(), 1):
            seq = seqs[doc]
            tokens[lo:hi] = torch.as_tensor(seq[c - 1:c - 1 + hi - lo])
            targets[lo:hi] = torch.as_tensor(seq[c:c + hi - lo])
            positions[lo:hi] = torch.arange(c - 1, c - 1 + hi - lo)
            segments[lo:hi] = k
            weights[lo:hi] = True


class ContinuationTooLong(ValueError):
    def __init__(self, doc: int, n: int, context: int):
        super().__init__(f"the continuation is {n} tokens, more than the context window ({context})")
        self.doc = doc


def request_rows(seqs, contexts, context: int, stride: int, share: bool = True) -> list[Window | Packed]:
    """The rows that score a step's documents: rolling windows of a whole document; for a conditional
    request (contexts[d] >= 0 ids of seqs[d] are its context) the last `context` ids before its last one,
    lm-eval's left truncation, and (`share`) requests sharing one context in full packed into one row.

    Rows come in the order of their first document, windows of a document in order.
    """
    rows: list = []
    groups: dict[bytes, list[int]] = {}
    where: dict[bytes, int] = {}
    for d, (seq, c) in enumerate(zip(seqs, contexts, strict=True)):
        if c < 0:
            rows.extend(Window(d, *w) for w in rolling_windows(len(seq), context, stride))
            continue
        n = len(seq) - c
        if n == 0:
            continue
        if n > context:
            raise ContinuationTooLong(d, n, context)
        if len(seq) - 1 > context:  # left-truncated: this request's context is its own
            rows.append(Window(d, len(seq) - 1 - context, context, n))
            continue
        key = seq[:c].tobytes() if share else d.to_bytes(8, "little") + seq[:c].tobytes()
        if key not in groups:
            groups[key] = []
            where[key] = len(rows)
            rows.append(None)
        groups[key].append(d)
    for key, docs in groups.items():
        c = int(contexts[docs[0]])
        if len(docs) == 1:
            rows[where[key]] = Window(docs[0], 0, len(seqs[docs[0]]) - 1, len(seqs[docs[0]]) - c)
        else:
            rows[where[key]] = Packed(tuple(docs), c, tuple(len(seqs[d]) - c for d in docs))
    return rows


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
class MicroBatch:
    """`len(rows)` windows (ids, longest first) padded to `length`: one forward of shape (B, T)."""

    length: int
    rows: tuple[int, ...]

    @property
    def batch(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Call:
    """One forward call: its micro-batches, each of its own shape (a pipeline takes them in turn)."""

    micro: tuple[MicroBatch, ...]

    @property
    def positions(self) -> int:
        """Token positions computed, padding included."""
        return sum(m.batch * m.length for m in self.micro)


def default_tokens_per_batch(device) -> int:
    """Padded tokens per micro-batch when the config leaves it at 0: small on a CPU (activations stay in
    cache, rows are padded less), large on a GPU (enough rows to fill it)."""
    return 1024 if str(device) == "cpu" else 8192


def plan_micro_batches(lengths: list[int], tokens_per_batch: int, max_batch: int,
                       min_fill: float = 0.85) -> list[MicroBatch]:
    """Bucket windows of the given lengths into micro-batches, longest first, to keep padding small.

    A micro-batch's T is its longest window and it takes up to B = min(max_batch, tokens_per_batch // T)
    windows (at least 1), stopping at the first window shorter than `min_fill` x T, so no row is padded by
    more than 1 - min_fill. Rows are never padding. The result depends on the windows and these limits
    alone, never on the layout: every layout computes the same rows in the same shapes.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, at = [], 0
    while at < len(order):
        T = lengths[order[at]]
        end = min(at + max(1, min(max_batch, tokens_per_batch // max(T, 1))), len(order))
        for k in range(at + 1, end):
            if lengths[order[k]] < min_fill * T:
                end = k
                break
        out.append(MicroBatch(T, tuple(order[at:end])))
        at = end
    return out


def plan_calls(lengths: list[int], tokens_per_batch: int, max_batch: int, micro_batches: int,
               min_fill: float = 0.85) -> list[Call]:
    """The micro-batches of `plan_micro_batches`, in that order, `micro_batches` to a call (the last call
    takes the rest).

    A pipeline keeps its stages busy on a long call: micro-batches of any shapes follow each other through
    it, so a call needs no run of similar windows and its bubble is 1 / (micro_batches + stages - 1).
    """
    micro = plan_micro_batches(lengths, tokens_per_batch, max_batch, min_fill)
    return [Call(tuple(micro[i:i + micro_batches])) for i in range(0, len(micro), micro_batches)]


def replica_rounds(n_calls: int, dp: int) -> list[list[int | None]]:
    """rounds[r][d]: the call replica d runs in round r (None: a dummy call, so every rank
    makes the same number of pipeline calls). Consecutive calls, similar in cost, run side by side."""
    rounds = []
    for r in range(0, n_calls, dp):
        rounds.append([r + d if r + d < n_calls else None for d in range(dp)])
    return rounds


def call_tensors(call: Call, rows: list, seqs: list, device="cpu"):
    """The micro-batches of a call: (tokens, positions, segments, targets, weights), each (B, T) of its own.

    Padding sits at the end of a row, at positions past every real one, so
    the attention rule keeps real tokens from seeing it.
    """
    out = []
    for mb in call.micro:
        shape = (mb.batch, mb.length)
        tokens, targets, segments = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
        weights = torch.zeros(shape, dtype=torch.bool)
        positions = torch.arange(mb.length).expand(shape).contiguous()
        for b, rid in enumerate(mb.rows):
            rows[rid].fill(seqs, tokens[b], positions[b], segments[b], targets[b], weights[b])
        out.append(tuple(t.to(device) for t in (tokens, positions, segments, targets, weights)))
    return out


def dummy_call(device="cpu"):
    """A one-token micro-batch that scores nothing, for a replica with no work this round."""
    z = torch.zeros(1, 1, dtype=torch.long, device=device)
    return [(z, z.clone(), z.clone(), z.clone(), torch.zeros(1, 1, dtype=torch.bool, device=device))]


def head_chunk_elements(device) -> int:
    """Logits per piece of the scoring head: 4M (16 MiB in fp32) on a CPU, 32M on a GPU.

    On a CPU a piece above glibc's largest mmap threshold (32 MiB) is a fresh,
    kernel-zeroed mapping every time; 16 MiB pieces are reused from the heap
    and stay in cache for the softmax passes. Timed per micro-batch in turns
    over a scoring run: the head took 7.5-8.0 s in 4M pieces against 9.3-9.5 s
    in 32M ones on bench-100m, 7.6 against 8.3 on SmolLM2.
    """
    return 1 << 22 if str(device) == "cpu" else 1 << 25


def score_head(model, h, inputs, chunk_elements: int | None = None):
    """Last stage: log-probabilities of the scored targets, and whether each is the model's first choice.

    Returns (token_logprobs (B, T) float32, greedy (B, T) bool), zero / False
    where not scored. The head runs only on scored positions -- not on padding
    or on context kept from an earlier window -- in pieces of at most
    `chunk_elements` logits (by default `head_chunk_elements`), so a 128K
    vocabulary never materialises (B, T, V).
    """
    targets, weights = inputs[3], inputs[4]
    B, T, D = h.shape
    flat = h.reshape(B * T, D)
    picked = weights.reshape(-1).nonzero().squeeze(1)
    lp = torch.zeros(B * T, dtype=torch.float32, device=h.device)
    greedy = torch.zeros(B * T, dtype=torch.bool, device=h.device)
    step = max(1, (chunk_elements or head_chunk_elements(h.device)) // model.cfg.vocab_size)
    tgt = targets.reshape(-1)
    for s in range(0, picked.numel(), step):
        sel = picked[s:s + step]
        lp[sel], greedy[sel] = target_logprobs(model.head(flat[sel]), tgt[sel])
    return lp.view(B, T), greedy.view(B, T)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[target] per row, and whether the target is the row's argmax (its first maximum).

    Consumes `logits` (N, V): the head's fresh output is overwritten rather
    than copied. One pass finds each row's maximum and where it first
    occurs; exp(x - max) is then formed in place and summed. On a CPU this
    takes a third of what logsumexp (two temporaries the size of the
    logits) plus a separate argmax take (benchmarks/score.py).
    """
    logits = logits.float()
    target = logits.gather(1, targets[:, None]).squeeze(1)
    top, first = logits.max(dim=1)  # the first maximal index, as argmax
    logits.sub_(top[:, None]).exp_()
    return target - top - logits.sum(dim=1).log_(), first == targets
