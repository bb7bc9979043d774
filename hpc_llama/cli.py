"""The `hpc-llama` console script: one typed subcommand per job.

Every subcommand runs the same way under plain python, `mpirun -n N` and
`srun`; an error on any rank prints one line and ends the whole job.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand -> (module with add_arguments and run, one-line help). A job with
# modules of its own is a package (score, generate, compress, train); the
# single-module jobs live in hpc_llama.jobs.
JOBS = {
    "convert": ("jobs.convert", "convert between HF model directories and hpc_llama HDF5 checkpoints"),
    "inspect": ("jobs.inspect", "show a checkpoint's config, sizes and stage split; --verify checks every checksum"),
    "score": ("score.job", "log-likelihood and perplexity of documents, in input order, resumable"),
    "eval": ("eval.job", "lm-eval-style tasks (multiple choice, log-likelihood, bits per byte) on any layout, resumable"),
    "merge": ("score.merge", "join the parts of a sharded score job (a Slurm job array) into one output, in input order"),
    "generate": ("generate.job", "batched generation with a KV cache across pipeline stages, in input order, resumable"),
    "prepare": ("train.prepare", "turn a corpus into token shards with a train/val/test split"),
    "train": ("train.job", "pretrain, fine-tune or LoRA-tune on DeepSpeed (pipeline or ZeRO), resumable"),
    "compress": ("compress.job", "quantize (int8/int4/GPTQ), prune or factorise a checkpoint, each rank its own layers"),
    "init": ("jobs.init", "write a freshly initialised model from a config preset (seeded, layout-independent)"),
    "demo": ("jobs.demo", "show the whole product on 2 ranks, offline, and write a report"),
    "check": ("jobs.check", "run a parallel layout end to end and compare its logits with the whole model"),
}


def finite_float(text: str) -> float:
    """An argparse type: a float that is a real number (NaN and infinity would pass every range check)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for a count given on the command line: at least 1 (0 is not a way to say 'default')."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type for a count where 0 means none (few-shot examples)."""
    return _count(text, 0)


def _count(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def field_list(text: str) -> tuple[str, ...]:
    """An argparse type for `a,b,c`: record field names, none empty, none twice."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected field names separated by commas, each once, got {text!r}")
    return names


def add_overwrite_argument(p, what: str = "OUT") -> None:
    """The one flag that replaces an existing output, in every job; `--force`, its old name in some jobs,
    stays as a hidden alias so existing scripts keep working."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")
    p.add_argument("--force", dest="overwrite", action="store_true", help=argparse.SUPPRESS)


def add_quiet_argument(p) -> None:
    """The one meaning of --quiet: no progress bar and no report lines; warnings, errors and the line that
    says why a job ended without doing anything still print.
    Reports and progress go to stderr (progress.report); stdout carries only what a command is asked to
    show (inspect's report, check's comparison, the demo's walk-through)."""
    p.add_argument("--quiet", action="store_true", help="no progress bar or report lines (errors still print)")


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line from rank 0, like every other error (not a usage text per rank)."""

    def error(self, message):
        from .errors import HpcLlamaError

        raise HpcLlamaError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(jobs=tuple(JOBS)) -> argparse.ArgumentParser:
    """The command line, with the arguments of the subcommands in `jobs` (default all). Only their modules
    are imported; the others are listed with their one-line help, so `hpc-llama --help` imports no job
    module and a run imports its own (which imports torch only once it runs), not all of them."""
    parser = _Parser(prog="hpc-llama", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpc-llama {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True, parser_class=_Parser)
    for name, (path, help_text) in JOBS.items():
        if name not in jobs:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"hpc_llama.{path}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _main(argv):
    # The top level has no option that takes a value, so the first word that is not an option names the
    # job (or nothing: --help, --version, a usage error).
    job = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([job] if job in JOBS else []).parse_args(argv)
    return args._run(args)


def main(argv=None) -> int:
    from .parallel.ranks import run_guarded

    code = run_guarded(_main, sys.argv[1:] if argv is None else argv)
    sys.exit(code)
