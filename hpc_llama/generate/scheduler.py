"""Stage 0's book of one replica's sequence slots: which prompt each holds, and what each group does next.

The replica's `batch_size` slots are cut into groups of contiguous slots; a
group is one micro-batch in flight around the ring. When all of a group's
passes are back, the group goes again: its free slots take waiting prompts
(prefilled together in pieces of similar length), and otherwise its running
sequences take one decode step. A finished sequence frees its slot for the
next prompt (continuous batching). No torch.distributed here: the ring
carries what this plans.
"""

from __future__ import annotations

from collections import deque

import torch

from .ring import Answer, Kind, Status, Work


def group_bounds(batch_size: int, groups: int) -> list[tuple[int, int]]:
    """[lo, hi) slots of each group: `groups` runs of contiguous slots, as even as can be."""
    groups = max(1, min(groups, batch_size))
    bounds = [round(g * batch_size / groups) for g in range(groups + 1)]
    return [(bounds[g], bounds[g + 1]) for g in range(groups)]


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


class Scheduler:
    """The slots of one replica, seen from stage 0."""

    def __init__(self, groups: list[tuple[int, int]], prompts):
        self.groups = groups
        slots = groups[-1][1]
        self.waiting = deque(prompts)
        self.prompt_at = [None] * slots  # the Prompt in each slot, or None
        self.position = [0] * slots  # where each slot's next token goes
        self.token = [0] * slots  # each slot's next input token
        self.pending = [0] * len(groups)  # a group's passes still in flight

    def launch(self, g: int) -> list[tuple[torch.Tensor, Work]]:
        """Group g's next passes, each (input tokens (B, T), work); none when the group has nothing to do."""
        lo, hi = self.groups[g]
        free = [s for s in range(lo, hi) if self.prompt_at[s] is None]
        new = []
        while free and self.waiting:
            s = free.pop(0)
            self.prompt_at[s] = self.waiting.popleft()
            new.append(s)
        if new:
            passes = []
            lengths = [len(self.prompt_at[s].tokens) for s in new]
            for piece in prefill_pieces(lengths):
                rows = [new[i] for i in piece]
                lens = [lengths[i] for i in piece]
                T = max(lens)
                tokens = torch.zeros(len(rows), T, dtype=torch.long)
                for i, s in enumerate(rows):
                    tokens[i, :lens[i]] = torch.tensor(self.prompt_at[s].tokens)
                passes.append((tokens, Work(Kind.PREFILL, g, rows, torch.arange(T).expand(len(rows), T), lens,
                                            [self.prompt_at[s].index for s in rows])))
        elif any(self.prompt_at[s] is not None for s in range(lo, hi)):
            passes = [(torch.tensor(self.token[lo:hi])[:, None],
                       Work(Kind.DECODE, g, list(range(lo, hi)), torch.tensor(self.position[lo:hi])[:, None]))]
        else:
            return []
        self.pending[g] = len(passes)
        return passes

    def land(self, work: Work, answer: Answer) -> bool:
        """Take a pass's answer; True when it was the group's last pass in flight (the group may go again)."""
        for i, s in enumerate(work.rows):
            if answer.status[i] == Status.GOING:
                self.token[s] = answer.tokens[i]
                self.position[s] = work.lengths[i] if work.kind == Kind.PREFILL else self.position[s] + 1
            elif answer.status[i] == Status.FINISHED:
                self.prompt_at[s], self.position[s], self.token[s] = None, 0, 0
        self.pending[work.group] -= 1
        return self.pending[work.group] == 0
