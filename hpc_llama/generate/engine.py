"""Batched generation with a KV cache across pipeline stages: our own ring, since DeepSpeed has none.

Each replica is a ring of its pp stages. Its `batch_size` sequence slots are
cut into `groups` (micro-batches) of contiguous slots. Stage 0 schedules: it
embeds a group's next tokens, runs its layers and sends the hidden states on;
the last stage runs the head, samples each row's next token and sends the
tokens back to stage 0, which by then has started other groups -- with at
least pp groups in flight every stage has work. Each stage keeps the KV cache
of its own layers only. A prompt is prefilled in one pass; a decode step moves
one token per row between stages. A finished sequence frees its slot and the
next waiting prompt takes it (continuous batching).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .sampling import CONTEXT, EOS, LENGTH, STOP, SamplingConfig, find_stop, next_token, sequence_generator

STOP_RING, DECODE, PREFILL = 0, 1, 2
IDLE, GOING, FINISHED = 0, 1, 2


@dataclass(frozen=True)
class Prompt:
    index: int
    id: object
    tokens: tuple[int, ...]


@dataclass
class _Sequence:
    prompt: Prompt
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    stops: tuple[str, ...] = ()
    batch_size: int = 8
    """Sequence slots per replica."""
    groups: int = 0
    """Micro-batches of slots in flight; 0 means one per stage. More than that splits a decode step into
    smaller matmuls that each re-read every weight: measured 0.52x of one rank's tokens/s with 4 groups on 2
    stages against 0.91x with 2 (benchmarks/generate.py)."""


def prefill_pieces(lengths: list[int], max_waste: float = 0.25, small: int = 64) -> list[list[int]]:
    """Cut prompts (by index into `lengths`) into pieces to prefill together, shortest first.

    A piece is padded to its longest prompt. It grows while its padded tokens
    stay within (1 + max_waste) x its real tokens, or below `small` tokens in
    all (a tiny pass costs little however padded; many tiny passes cost more).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    pieces: list[list[int]] = []
    for i in order:
        if pieces:
            trial = pieces[-1] + [i]
            padded = lengths[i] * len(trial)  # sorted: i is the longest so far
            if padded <= small or padded <= (1 + max_waste) * sum(lengths[j] for j in trial):
                pieces[-1] = trial
                continue
        pieces.append([i])
    return pieces


class RingGenerator:
    """This rank's stage of one replica's generation ring."""

    def __init__(self, model, info, pp: int, cfg: GenerationConfig, sampling: SamplingConfig, tokenizer,
                 eos_ids, capacity: int, dtype):
        from ..parallel.layout import stage_and_replica

        self.model, self.info, self.pp, self.cfg, self.sampling = model, info, pp, cfg, sampling
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        self.capacity, self.dtype, self.device = capacity, dtype, info.device
        dp = info.world_size // pp
        self.stage, self.replica = stage_and_replica(info.rank, info.world_size, pp)
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        self.prev = (self.stage - 1) * dp + self.replica
        self.next = (self.stage + 1) * dp + self.replica
        self.first_rank, self.last_rank = self.replica, (pp - 1) * dp + self.replica
        n_groups = cfg.groups or pp
        n_groups = max(1, min(n_groups, cfg.batch_size))
        bounds = [round(g * cfg.batch_size / n_groups) for g in range(n_groups + 1)]
        self.groups = [(bounds[g], bounds[g + 1]) for g in range(n_groups)]
        self.cache = model.new_cache(cfg.batch_size, capacity, self.device, dtype)
        self.busy_s = 0.0
        self._sends: deque = deque()

    # --- running a step of prompts ----------------------------------------------

    def run(self, prompts: list[Prompt]) -> list[dict]:
        """Generate for this replica's prompts; the last stage returns the finished records."""
        self.by_index = {p.index: p for p in prompts}
        self.state: list[_Sequence | None] = [None] * self.cfg.batch_size
        self.records: list[dict] = []
        if self.first:
            self._schedule(deque(prompts))
        else:
            self._serve()
        self._drain()
        return self.records if self.last else []

    def _schedule(self, waiting: deque) -> None:
        S = self.cfg.batch_size
        seq_at, pos, tok = [None] * S, [0] * S, [0] * S
        flight: deque = deque()
        local: deque = deque()  # without a pipeline the head's answers are right here
        pending = [0] * len(self.groups)  # a group's pieces still in flight; it goes again when all are back

        def launch(g: int) -> None:
            lo, hi = self.groups[g]
            free = [s for s in range(lo, hi) if seq_at[s] is None]
            new = []
            while free and waiting:
                s = free.pop(0)
                seq_at[s] = waiting.popleft()
                new.append(s)
            if new:
                # New prompts are prefilled in pieces of similar length, so little of the pass is padding.
                lengths = [len(seq_at[s].tokens) for s in new]
                metas = []
                for piece in prefill_pieces(lengths):
                    rows = [new[i] for i in piece]
                    lens = [lengths[i] for i in piece]
                    T = max(lens)
                    tokens = torch.zeros(len(rows), T, dtype=torch.long)
                    for i, s in enumerate(rows):
                        tokens[i, :lens[i]] = torch.tensor(seq_at[s].tokens)
                    metas.append((tokens, {"kind": PREFILL, "group": g, "rows": rows, "lengths": lens,
                                           "seq_ids": [seq_at[s].index for s in rows],
                                           "positions": torch.arange(T).expand(len(rows), T)}))
            elif any(seq_at[s] is not None for s in range(lo, hi)):
                metas = [(torch.tensor(tok[lo:hi])[:, None],
                          {"kind": DECODE, "group": g, "rows": list(range(lo, hi)),
                           "positions": torch.tensor(pos[lo:hi])[:, None]})]
            else:
                return
            pending[g] = len(metas)
            for tokens, meta in metas:
                flight.append((g, meta["kind"], meta["rows"], meta.get("lengths")))
                out = self._stage_forward(tokens.to(self.device), meta)
                if self.pp == 1:
                    local.append(self._head(out, meta))
                else:
                    self._send(meta, out)

        for g in range(len(self.groups)):
            launch(g)
        while flight:
            g, kind, rows, lengths = flight.popleft()
            tokens, status = local.popleft() if self.pp == 1 else self._receive_return(len(rows))
            for i, s in enumerate(rows):
                if status[i] == GOING:
                    tok[s] = tokens[i]
                    pos[s] = lengths[i] if kind == PREFILL else pos[s] + 1
                elif status[i] == FINISHED:
                    seq_at[s], pos[s], tok[s] = None, 0, 0
            pending[g] -= 1
            if not pending[g]:
                launch(g)
        if self.pp > 1:
            self._send({"kind": STOP_RING}, None)

    def _serve(self) -> None:
        while True:
            meta, hidden = self._receive()
            if meta["kind"] == STOP_RING:
                if not self.last:
                    self._send(meta, None)
                return
            out = self._stage_forward(hidden, meta)
            if self.last:
                tokens, status = self._head(out, meta)
                self._send_return(tokens, status)
            else:
                self._send(meta, out)

    # --- compute ---------------------------------------------------------------------

    def _stage_forward(self, x, meta):
        t0 = time.perf_counter()
        rows = meta["rows"]
        if meta["kind"] == DECODE:
            view = slice(rows[0], rows[-1] + 1)  # a whole group: contiguous slots, no copy
        else:
            view = torch.tensor(rows, device=self.device)
        cache = {k: c.rows(view) for k, c in self.cache.items()}
        with torch.inference_mode():
            h = self.model.trunk(x, meta["positions"].to(self.device), cache=cache)
        self.busy_s += time.perf_counter() - t0
        return h

    def _head(self, h, meta):
        """Last stage: sample every row's next token and decide which sequences are done."""
        t0 = time.perf_counter()
        rows = meta["rows"]
        if meta["kind"] == PREFILL:
            for s, seq_id in zip(rows, meta["seq_ids"]):
                p = self.by_index[seq_id]
                gen = sequence_generator(self.sampling.seed, p.index) if self.sampling.temperature > 0 else None
                self.state[s] = _Sequence(p, gen)
            last = torch.tensor([n - 1 for n in meta["lengths"]], device=h.device)
            h = h[torch.arange(len(rows), device=h.device), last]
        else:
            h = h[:, 0]
        with torch.inference_mode():
            logits = self.model.head(h).float().cpu()
        tokens, status = [], []
        for i, s in enumerate(rows):
            seq = self.state[s]
            if seq is None:
                tokens.append(0)
                status.append(IDLE)
                continue
            t = next_token(logits[i], self.sampling, seq.generator)
            seq.generated.append(t)
            reason = self._finished(seq, t)
            if reason is not None:
                self.records.append(self._record(seq, reason))
                self.state[s] = None
            tokens.append(t)
            status.append(GOING if reason is None else FINISHED)
        self.busy_s += time.perf_counter() - t0
        return tokens, status

    def _finished(self, seq: _Sequence, token: int) -> str | None:
        if token in self.eos:
            return EOS
        if self.cfg.stops and find_stop(self._text(seq), self.cfg.stops) is not None:
            return STOP
        if len(seq.generated) >= self.cfg.max_new_tokens:
            return LENGTH
        if len(seq.prompt.tokens) + len(seq.generated) > self.capacity:
            return CONTEXT  # the next token would sit past the context
        return None

    def _text(self, seq: _Sequence) -> str:
        return self.tokenizer.decode(seq.generated, skip_special_tokens=True) if self.tokenizer else ""

    def _record(self, seq: _Sequence, reason: str) -> dict:
        text = self._text(seq)
        if reason == STOP:
            text = text[:find_stop(text, self.cfg.stops)]
        return {"index": seq.prompt.index, "id": seq.prompt.id, "completion": text, "tokens": seq.generated,
                "n_prompt_tokens": len(seq.prompt.tokens), "n_new_tokens": len(seq.generated),
                "finish_reason": reason}

    # --- the ring's messages -------------------------------------------------------------
    # To the next stage: a header [kind, group, B, T, D, prefill], the positions,
    # for a prefill the slot rows, lengths and sequence ids, then the hidden states.
    # Back from the last stage to the first: [tokens..., statuses...].

    def _send(self, meta, hidden) -> None:
        import torch.distributed as dist

        if meta["kind"] == STOP_RING:
            header = torch.tensor([STOP_RING, 0, 0, 0, 0, 0], dtype=torch.long, device=self.device)
            self._sends.append((dist.isend(header, self.next), header))
            return
        B, T = meta["positions"].shape
        D = 0 if hidden is None else hidden.shape[-1]
        header = torch.tensor([meta["kind"], meta["group"], B, T, D, meta["kind"] == PREFILL], dtype=torch.long)
        parts = [header, meta["positions"].contiguous().to(torch.long)]
        if meta["kind"] == PREFILL:
            parts.append(torch.tensor([meta["rows"], meta["lengths"], meta["seq_ids"]], dtype=torch.long))
        elif meta["kind"] == DECODE:
            parts.append(torch.tensor([meta["rows"][0], meta["rows"][-1] + 1], dtype=torch.long))
        for t in parts:
            self._sends.append((dist.isend(t.to(self.device), self.next), t))
        if hidden is not None:
            hidden = hidden.contiguous()
            self._sends.append((dist.isend(hidden, self.next), hidden))
        while len(self._sends) > 64:
            self._sends.popleft()[0].wait()

    def _receive(self):
        import torch.distributed as dist

        header = torch.empty(6, dtype=torch.long, device=self.device)
        dist.recv(header, self.prev)
        kind, group, B, T, D, prefill = (int(x) for x in header.cpu())
        if kind == STOP_RING:
            return {"kind": STOP_RING}, None
        positions = torch.empty(B, T, dtype=torch.long, device=self.device)
        dist.recv(positions, self.prev)
        meta = {"kind": kind, "group": group, "positions": positions}
        if kind == PREFILL:
            info = torch.empty(3, B, dtype=torch.long, device=self.device)
            dist.recv(info, self.prev)
            rows, lengths, seq_ids = (x.tolist() for x in info.cpu())
            meta.update(rows=rows, lengths=lengths, seq_ids=seq_ids)
        elif kind == DECODE:
            span = torch.empty(2, dtype=torch.long, device=self.device)
            dist.recv(span, self.prev)
            lo, hi = span.tolist()
            meta["rows"] = list(range(lo, hi))
        hidden = None
        if D:
            hidden = torch.empty(B, T, D, dtype=self.dtype, device=self.device)
            dist.recv(hidden, self.prev)
        return meta, hidden

    def _send_return(self, tokens, status) -> None:
        import torch.distributed as dist

        t = torch.tensor(tokens + status, dtype=torch.long, device=self.device)
        self._sends.append((dist.isend(t, self.first_rank), t))

    def _receive_return(self, n: int):
        import torch.distributed as dist

        t = torch.empty(2 * n, dtype=torch.long, device=self.device)
        dist.recv(t, self.last_rank)
        values = t.cpu().tolist()
        return values[:n], values[n:]

    def _drain(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()
