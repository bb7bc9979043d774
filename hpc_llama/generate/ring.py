"""The generation ring's messages and how they travel between the stages of one replica.

Stage 0 sends a `Work` (a group's pass: prefill of new prompts, or one decode
step) with its hidden states down the stages; the last stage answers stage 0
with an `Answer` (each row's next token and whether its sequence goes on).
They travel over torch.distributed point to point: the hidden states live on
the device, where NCCL moves them GPU to GPU, and isend lets a stage start its
next group while the last one is still on the wire.

On the wire, to the next stage: one control message of a fixed size (the
header [kind, group, B, T, D, prefill], then for a decode each row's position
and the slot span [lo, hi), for a prefill the slot rows, lengths and prompt
indices), for a prefill its positions (B, T), then the hidden states (B, T, D)
when D > 0 -- a decode step is two messages. Back to stage 0: the tokens, then
the statuses, of the B rows.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch


class Kind(enum.IntEnum):
    STOP = 0
    """The replica's prompts are all done; passed on to the last stage."""
    DECODE = 1
    """One new token per row, for a group of contiguous slots."""
    PREFILL = 2
    """New prompts, each whole, in the slots `rows`."""


class Status(enum.IntEnum):
    IDLE = 0
    """The slot holds no sequence."""
    GOING = 1
    """The sequence goes on with this token."""
    FINISHED = 2
    """The sequence ended; its record is written and its slot is free."""


@dataclass
class Work:
    """One pass of a group through the stages."""

    kind: Kind
    group: int = 0
    rows: list[int] = field(default_factory=list)
    """The slots the batch rows belong to (a decode: the group's contiguous slots)."""
    positions: torch.Tensor | None = None
    """(B, T) absolute positions of the tokens."""
    lengths: list[int] = field(default_factory=list)
    """Prefill: each row's prompt length."""
    prompts: list[int] = field(default_factory=list)
    """Prefill: each row's prompt (its index in the input)."""


@dataclass
class Answer:
    """The last stage's word on each row of a pass."""

    tokens: list[int]
    status: list[Status]


HEADER = 6  # kind, group, B, T, D, prefill
SENDS_IN_FLIGHT = 64  # unfinished isends kept before the oldest is waited for


class Link:
    """This rank's connections in its replica's ring: to the next stage, from the previous, and back to stage 0.

    `slots` is the replica's batch size, the most rows a pass can have: it fixes the control message's size,
    so a receiver knows it before anything else arrives.
    """

    def __init__(self, prev: int, next: int, first: int, last: int, device, dtype, slots: int):
        self.prev, self.next, self.first, self.last = prev, next, first, last
        self.device, self.dtype = device, dtype
        self.control = HEADER + 3 * slots
        self._sends: deque = deque()

    def _isend(self, t: torch.Tensor, dest: int) -> None:
        import torch.distributed as dist

        # The tensor is kept with its request: it must outlive the send.
        self._sends.append((dist.isend(t, dest), t))

    def send(self, work: Work, hidden: torch.Tensor | None) -> None:
        """A pass (and its hidden states) to the next stage."""
        control = [0] * self.control
        if work.kind != Kind.STOP:
            B, T = work.positions.shape
            D = 0 if hidden is None else hidden.shape[-1]
            prefill = work.kind == Kind.PREFILL
            if prefill:
                body = [*work.rows, *work.lengths, *work.prompts]
            else:  # one token per row: its position, and the group's slots
                body = [*work.positions[:, 0].tolist(), work.rows[0], work.rows[-1] + 1]
            control[:HEADER + len(body)] = [work.kind, work.group, B, T, D, prefill, *body]
        self._isend(torch.tensor(control, dtype=torch.long, device=self.device), self.next)
        if work.kind == Kind.PREFILL:
            self._isend(work.positions.to(self.device, torch.long).contiguous(), self.next)
        if hidden is not None:
            self._isend(hidden.contiguous(), self.next)
        while len(self._sends) > SENDS_IN_FLIGHT:
            self._sends.popleft()[0].wait()

    def receive(self) -> tuple[Work, torch.Tensor | None]:
        """The next pass from the previous stage."""
        import torch.distributed as dist

        control = torch.empty(self.control, dtype=torch.long, device=self.device)
        dist.recv(control, self.prev)
        values = control.tolist()
        kind, group, B, T, D, _ = values[:HEADER]
        if kind == Kind.STOP:
            return Work(Kind.STOP), None
        body = values[HEADER:]
        if kind == Kind.PREFILL:
            positions = torch.empty(B, T, dtype=torch.long, device=self.device)
            dist.recv(positions, self.prev)
            work = Work(Kind(kind), group, rows=body[:B], positions=positions, lengths=body[B:2 * B],
                        prompts=body[2 * B:3 * B])
        else:
            lo, hi = body[B], body[B + 1]
            work = Work(Kind(kind), group, rows=list(range(lo, hi)),
                        positions=torch.tensor(body[:B], dtype=torch.long, device=self.device)[:, None])
        hidden = None
        if D:
            hidden = torch.empty(B, T, D, dtype=self.dtype, device=self.device)
            dist.recv(hidden, self.prev)
        return work, hidden

    def answer(self, answer: Answer) -> None:
        """Last stage: a pass's answer back to stage 0."""
        self._isend(torch.tensor(answer.tokens + [int(s) for s in answer.status], dtype=torch.long,
                                 device=self.device), self.first)

    def receive_answer(self, n: int) -> Answer:
        """Stage 0: the answer for a pass of `n` rows."""
        import torch.distributed as dist

        t = torch.empty(2 * n, dtype=torch.long, device=self.device)
        dist.recv(t, self.last)
        values = t.cpu().tolist()
        return Answer(values[:n], [Status(s) for s in values[n:]])

    def drain(self) -> None:
        """Wait for every send still in flight."""
        while self._sends:
            self._sends.popleft()[0].wait()
