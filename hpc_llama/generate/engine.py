"""Batched generation with a KV cache across pipeline stages: our own ring, since DeepSpeed has none.

Each replica is a ring of its pp stages. Stage 0 schedules (scheduler.py):
it embeds a group's next tokens, runs its layers and sends the hidden states
on (ring.py); the last stage runs the head, picks each row's next token,
decides which sequences are done (sampling.py) and answers stage 0, which by
then has started other groups -- with at least pp groups in flight every
stage has work. Each stage keeps the KV cache of its own layers only. A prompt
is prefilled in one pass; a decode step moves one token per row between
stages.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from ..parallel.layout import stage_and_replica
from .ring import Answer, Kind, Link, Status, Work
from .sampling import Prompt, Sequence, completion_record, finish_reason, next_token, start_sequence
from .scheduler import Scheduler, group_bounds


class RingGenerator:
    """This rank's stage of one replica's generation ring.

    `cfg` is the job's GenerateConfig (max_new_tokens, stops, batch_size,
    groups and the sampling settings); `capacity` is the cache length per slot.
    """

    def __init__(self, model, info, pp: int, cfg, tokenizer, eos_ids, capacity: int, dtype):
        self.model, self.pp, self.cfg = model, pp, cfg
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        self.capacity, self.device = capacity, info.device
        dp = info.world_size // pp
        self.stage, self.replica = stage_and_replica(info.rank, info.world_size, pp)
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        self.link = Link(prev=(self.stage - 1) * dp + self.replica, next=(self.stage + 1) * dp + self.replica,
                         first=self.replica, last=(pp - 1) * dp + self.replica, device=self.device, dtype=dtype,
                         slots=cfg.batch_size)
        self.groups = group_bounds(cfg.batch_size, cfg.groups or pp)
        self.cache = model.new_cache(cfg.batch_size, capacity, self.device, dtype)
        self._views: dict[tuple[int, int], dict] = {}
        self.busy_s = 0.0
        # The last stage's view of a step: its prompts, the sequence in each slot, the finished records.
        self.prompts: dict[int, Prompt] = {}
        self.slots: list[Sequence | None] = [None] * cfg.batch_size
        self.records: list[dict] = []

    def run(self, prompts: list[Prompt]) -> list[dict]:
        """Generate for this replica's prompts; the last stage returns the finished records."""
        self.prompts = {p.index: p for p in prompts}
        self.slots = [None] * self.cfg.batch_size
        self.records = []
        if self.first:
            self._schedule(Scheduler(self.groups, prompts))
        else:
            self._serve()
        self.link.drain()
        return self.records if self.last else []

    def _schedule(self, scheduler: Scheduler) -> None:
        flight: deque[Work] = deque()
        local: deque[Answer] = deque()  # without a pipeline the head's answers are right here

        def launch(g: int) -> None:
            for tokens, work in scheduler.launch(g):
                flight.append(work)
                out = self._stage_forward(tokens.to(self.device), work)
                if self.pp == 1:
                    local.append(self._head(out, work))
                else:
                    self.link.send(work, out)

        for g in range(len(self.groups)):
            launch(g)
        while flight:
            work = flight.popleft()
            answer = local.popleft() if self.pp == 1 else self.link.receive_answer(len(work.rows))
            if scheduler.land(work, answer):
                launch(work.group)
        if self.pp > 1:
            self.link.send(Work(Kind.STOP), None)

    def _serve(self) -> None:
        while True:
            work, hidden = self.link.receive()
            if work.kind == Kind.STOP:
                if not self.last:
                    self.link.send(work, None)
                return
            out = self._stage_forward(hidden, work)
            if self.last:
                self.link.answer(self._head(out, work))
            else:
                self.link.send(work, out)

    # --- compute ---------------------------------------------------------------------

    def _stage_forward(self, x, work: Work):
        t0 = time.perf_counter()
        rows = work.rows
        if work.kind == Kind.DECODE:
            # A whole group: contiguous slots, read through views made once per group.
            span = (rows[0], rows[-1] + 1)
            cache = self._views.get(span)
            if cache is None:
                cache = self._views[span] = {k: c.rows(slice(*span)) for k, c in self.cache.items()}
        else:
            view = torch.tensor(rows, device=self.device)
            cache = {k: c.rows(view) for k, c in self.cache.items()}
        with torch.inference_mode():
            h = self.model.trunk(x, work.positions.to(self.device), cache=cache)
        self.busy_s += time.perf_counter() - t0
        return h

    def _head(self, h, work: Work) -> Answer:
        """Last stage: every row's next token, and which sequences are done (their records written)."""
        t0 = time.perf_counter()
        rows = work.rows
        if work.kind == Kind.PREFILL:
            for s, index in zip(rows, work.prompts, strict=True):
                self.slots[s] = start_sequence(self.prompts[index], self.cfg)
            last = torch.tensor([n - 1 for n in work.lengths], device=h.device)
            h = h[torch.arange(len(rows), device=h.device), last]
        else:
            h = h[:, 0]
        with torch.inference_mode():
            logits = self.model.head(h).float().cpu()
        answer = Answer([], [])
        for i, s in enumerate(rows):
            seq = self.slots[s]
            if seq is None:
                answer.tokens.append(0)
                answer.status.append(Status.IDLE)
                continue
            t = next_token(logits[i], self.cfg, seq.generator)
            seq.generated.append(t)
            reason = finish_reason(seq, t, self.eos, self.cfg, self.capacity, lambda: self._text(seq))
            if reason is not None:
                self.records.append(completion_record(seq, reason, self._text(seq), self.cfg.stops))
                self.slots[s] = None
            answer.tokens.append(t)
            answer.status.append(Status.GOING if reason is None else Status.FINISHED)
        self.busy_s += time.perf_counter() - t0
        return answer

    def _text(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.generated, skip_special_tokens=True) if self.tokenizer else ""
