"""One flag vocabulary across every subcommand, and one stream for reports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from helpers.run import HPC, ROOT, run_cli

# Subcommands that write an output someone may want replaced, and those that report as they go.
WRITERS = ("convert", "init", "score", "merge", "generate", "prepare", "train", "compress", "demo")
REPORTERS = ("convert", "init", "score", "merge", "generate", "prepare", "train", "compress")


def _subparsers():
    from hpc_llama.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_is_listed_with_help():
    from hpc_llama.cli import JOBS

    assert set(_subparsers()) == set(JOBS) >= set(WRITERS) | {"inspect", "check"}


def _imported_by(*argv):
    """The modules a fresh `hpc-llama ARGV` imports (the console script itself, under -X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", HPC, *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_no_torch():
    # Asking what the commands are must not cost a torch import (seconds on a busy login node).
    from hpc_llama.cli import JOBS

    imported = _imported_by("--help")
    assert "hpc_llama.cli" in imported
    assert not {"torch", "numpy", "deepspeed"} & imported
    assert not {f"hpc_llama.{module}" for module, _ in JOBS.values()} & imported  # nor any job's module


@pytest.mark.parametrize("job", ["inspect", "score", "eval", "train", "compress", "generate"])
def test_job_help_imports_no_torch(job):
    imported = _imported_by(job, "--help")
    assert not {"torch", "deepspeed"} & imported


@pytest.mark.parametrize("job", WRITERS)
def test_overwrite_is_the_one_name_and_force_a_hidden_alias(job):
    parser = _subparsers()[job]
    options = {s for a in parser._actions for s in a.option_strings}
    assert "--overwrite" in options
    force = next(a for a in parser._actions if "--force" in a.option_strings)
    overwrite = next(a for a in parser._actions if "--overwrite" in a.option_strings)
    assert force.dest == overwrite.dest == "overwrite"
    assert force.help == argparse.SUPPRESS and "--force" not in parser.format_help()


@pytest.mark.parametrize("job", REPORTERS)
def test_quiet_means_the_same_everywhere(job):
    quiet = next(a for a in _subparsers()[job]._actions if "--quiet" in a.option_strings)
    assert quiet.help == "no progress bar or report lines (errors still print)"


def test_reports_go_to_stderr_and_quiet_silences_them(tmp_path):
    out = tmp_path / "m.h5"
    p = run_cli("init", "--config", "tiny", out, check=True)
    assert p.stdout == "" and p.stderr.startswith(f"hpc-llama [rank 0]: wrote {out}")
    p = run_cli("convert", out, tmp_path / "c.h5", "--quiet", check=True)
    assert p.stdout == "" and p.stderr == ""
    p = run_cli("convert", out, tmp_path / "c.h5", check=False)
    assert p.returncode == 2 and "already exists (use --overwrite to replace it)" in p.stderr
    run_cli("convert", out, tmp_path / "c.h5", "--overwrite", "--quiet", check=True)
    run_cli("convert", out, tmp_path / "c.h5", "--force", "--quiet", check=True)  # the old name still works
