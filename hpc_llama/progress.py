"""What a job tells its user while it runs: a tqdm bar on rank 0 (documents, tokens/s, ETA) and report lines.

Both go to stderr, from rank 0 only, and `--quiet` silences both; stdout is
left to what a command is asked to show (see cli.add_quiet_argument).
"""

from __future__ import annotations

import sys
import time


def report(message: str, quiet: bool = False, rank: int = 0) -> None:
    """One report line on stderr, from rank 0 only: `hpc-llama [rank 0]: message`."""
    if not quiet and rank == 0:
        print(f"hpc-llama [rank {rank}]: {message}", file=sys.stderr, flush=True)


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
        report(message, self.quiet, self.info.rank)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
