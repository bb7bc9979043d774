"""The skeleton every batch job over documents shares (score, generate; eval next).

A batch job reads a checkpoint and input files, does the same work on every
layout of pp stages x dp replicas, and has rank 0 write one record per input
document, in input order, exactly once, resumably. What is common lives here:

    job = BatchJob(args, "score", FLAGS)      # config + overrides, ranks, layout check, checkpoint, inputs
    extra = job.validate(scan, options)       # rank 0 checks every input, opens the journal; all get `extra`
    with job.running(total, "doc"):           # torch.distributed when pp > 1, progress; always torn down
        for step in ...: job.commit(lines, stats, tokens)          # rank 0, step by step
        job.finish(columns, summary, message) # rank 0: OUT atomically, OUT.summary.json, one report line

A job module then says only what is its own: its flags, its engine, its step
and its record.
"""

from __future__ import annotations

import contextlib
import os
import time

from .errors import HpcLlamaError

# Flags every batch job has, mapped to the config keys they override.
COMMON_FLAGS = {"pp": "parallel.pp", "dtype": "parallel.dtype"}


def add_common_arguments(p, *, model_help: str, input_help: str, output_help: str, formats: tuple[str, ...],
                         sections: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--input", required=True, nargs="+", help=input_help)
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("--format", choices=formats, help="output format (default: from the name)")
    p.add_argument("--config", help=f"YAML preset with {sections} sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="compute dtype (default auto)")


def add_closing_arguments(p) -> None:
    from .cli import add_overwrite_argument, add_quiet_argument

    add_overwrite_argument(p)
    add_quiet_argument(p)


class BatchJob:
    """One batch job's shared state on this rank: config, rank, checkpoint, inputs, journal, progress."""

    def __init__(self, args, section: str, flags: dict[str, str], overrides: list[str] = (),
                 formats: tuple[str, ...] | None = None, out: str | None = None, fmt: str | None = None):
        from .atomic import OutputLock, check_not_an_input, sweep
        from .checkpoint import open_checkpoint
        from .config import SECTIONS, ParallelConfig, flag_overrides, load_sections
        from .documents import expand_inputs
        from .parallel.layout import require_layout
        from .parallel.ranks import start_rank, world_comm
        from .records import output_format
        from .tokenizer import Tokenizer

        self.t_start = time.time()
        self.args, self.quiet = args, args.quiet
        sections = load_sections(args.config, flag_overrides(args, {**COMMON_FLAGS, **flags}) + list(overrides)
                                 + args.set)
        self.parallel = sections["parallel"] or ParallelConfig()
        self.cfg = sections[section] or SECTIONS[section]()
        self.comm = world_comm()
        self.info = start_rank(self.comm)
        self.fmt = fmt or output_format(args.output, getattr(args, "format", None))
        if formats is not None and self.fmt not in formats:
            raise HpcLlamaError(f"{section} writes " + " or ".join(f".{f}" for f in formats))
        self.out = out or args.output
        # Rank 0 alone writes: it takes the output (a second job on it is refused at once) and sweeps away
        # what a killed job on it left behind.
        self.lock = OutputLock(self.out).acquire() if self.info.rank == 0 else None
        self.side_locks: list = []
        if self.lock is not None:
            sweep(self.out)
        self.reader = open_checkpoint(args.model)
        self.tokenizer = Tokenizer.from_checkpoint(self.reader)
        self.files = expand_inputs(getattr(args, "input", None) or [])  # eval makes its own input
        if self.info.rank == 0:
            check_not_an_input(self.out, [f.path for f in self.files] + [self.reader.path])
        require_layout(self.info.world_size, self.parallel.pp)
        self.journal = None
        self.start = 0
        self.progress = None

    @property
    def dp(self) -> int:
        return self.info.world_size // self.parallel.pp

    def validate(self, scan, options: dict):
        """Rank 0 checks every input before any rank starts work or anything is written, then opens the journal.

        `scan(files)` -> (files with counts and checksums, extra) raises on the
        first bad input; `options` (the job's section and anything else that
        changes a record) go into the journal's fingerprint, so a rerun with other
        options is refused instead of mixing results. Every rank gets `extra`;
        `self.files` and `self.start` (records already written by an earlier
        attempt) are set everywhere.
        """
        from .records import Journal

        state = None
        if self.info.rank == 0:
            files, extra = scan(self.files)
            fingerprint = {"model": self.reader.fingerprint(), "inputs": [[f.path, f.size, f.xxh3] for f in files],
                           "options": options}
            self.journal = Journal(self.out, fingerprint, self.args.overwrite)
            state = (files, extra, self.journal.documents_done)
        self.files, extra, self.start = self.bcast(state)
        return extra

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def gather(self, obj) -> list | None:
        return self.comm.gather(obj, root=0)

    @contextlib.contextmanager
    def running(self, total: int, unit: str):
        """Start torch.distributed (pipelines need it), show progress, and always tear down.

        Ends in a barrier, so no rank leaves while rank 0 still writes.
        """
        from .parallel.ranks import start_distributed, stop_distributed
        from .progress import Progress

        try:
            if self.parallel.pp > 1:
                start_distributed(self.info, self.comm, self.parallel.timeout_s)
            self.progress = Progress(self.info, total, self.start, quiet=self.quiet, unit=unit)
            if self.start:
                self.progress.log(f"resuming: {self.start} of {total} records are written already")
            yield self
            self.progress.close()
            self.comm.Barrier()
        except BaseException:
            if self.journal is not None and self.journal.documents_done == 0:
                self.journal.discard()  # nothing written: the corrected rerun must find the output free
            raise
        finally:
            stop_distributed()
            self.close()

    def close(self) -> None:
        """Let go of the checkpoint and the output (a job that ends early calls this itself)."""
        self.reader.close()
        if self.lock is not None:
            self.lock.release()
        for lock in self.side_locks:
            lock.release()

    def hold(self, path: str) -> None:
        """Rank 0: take a second output of this job (eval's --samples) as OUT is taken, until the job ends."""
        from .atomic import OutputLock, sweep

        self.side_locks.append(OutputLock(path).acquire())
        sweep(path)

    def commit(self, lines: list[str], stats: dict, tokens: int) -> None:
        """Rank 0: one step's records, durable before they count as done."""
        self.journal.commit(lines, stats)
        self.progress.update(len(lines), tokens)

    # --- the summary ---------------------------------------------------------------

    def wall(self) -> float:
        return time.time() - self.t_start

    def layout(self, **extra) -> dict:
        return {"ranks": self.info.world_size, "pp": self.parallel.pp, "dp": self.dp, "device": self.info.device,
                **extra}

    def model_summary(self) -> dict:
        return {"path": os.path.abspath(self.args.model), "fingerprint": self.journal.fingerprint["model"]}

    def inputs_summary(self, unit: str) -> list[dict]:
        return [{"path": os.path.abspath(f.path), "bytes": f.size, "xxh3": f.xxh3, unit: f.documents}
                for f in self.files]

    def finish(self, columns: dict[str, str], summary: dict, message: str) -> None:
        """Rank 0: write OUT from the journal's records, OUT.summary.json beside it, and report."""
        from .atomic import write_json_atomic

        self.journal.finish(self.fmt, columns)
        write_json_atomic(os.path.abspath(self.out) + ".summary.json", summary)
        self.say(message)

    def say(self, message: str, always: bool = False) -> None:
        """A report line from rank 0; `always` for one that explains a job ending without work, which a
        batch log must show even under --quiet."""
        from .progress import report

        report(message, self.quiet and not always, self.info.rank)
