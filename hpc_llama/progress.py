"""Progress for batch jobs: a tqdm bar on rank 0 (documents, tokens/s, ETA) and rank-tagged log lines."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, info, total: int, done: int = 0, quiet: bool = False, unit: str = "doc"):
        self.info, self.quiet = info, quiet
        self.tokens, self.t0 = 0, time.perf_counter()
        self.bar = None
        if info.rank == 0 and not quiet:
            from tqdm import tqdm

            # Off a terminal (a batch job's log), a line every half minute instead of a redrawn bar.
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5 if interactive else 30, smoothing=0.1)

    def update(self, n: int, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self.bar.update(n)

    def log(self, message: str) -> None:
        self.say(self.info, message, self.quiet)

    @staticmethod
    def say(info, message: str, quiet: bool = False) -> None:
        if not quiet and info.rank == 0:
            print(f"hpc-llama [rank {info.rank}]: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
