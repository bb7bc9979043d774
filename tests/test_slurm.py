"""Jobs on a real Slurm cluster (two slurmd "nodes" on this machine), submitted with sbatch."""

import json
import os

import pytest

from conftest import BIN, ROOT, run_cli
from test_score import read_jsonl, write_jsonl

SLURM_ENV = {"PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def scored_model(hf_dirs, tokenizer_json, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("slurm-score")
    shutil.copytree(hf_dirs["llama3"], d / "hf")
    shutil.copy(tokenizer_json, d / "hf" / "tokenizer.json")
    run_cli("convert", d / "hf", d / "m.h5", check=True)
    docs = write_jsonl(d / "docs.jsonl", [{"id": i, "text": "word " * (i % 37 + 1) + str(i)} for i in range(50)])
    return d, str(d / "m.h5"), docs


def test_score_template_on_two_nodes(slurm, scored_model, tmp_path):
    d, model, docs = scored_model
    run_cli("score", "--model", model, "--input", docs, "--output", tmp_path / "one.jsonl", "--quiet", check=True)
    out = tmp_path / "slurm.jsonl"
    env = dict(SLURM_ENV, MODEL=model, INPUT=docs, OUTPUT=str(out))
    job = slurm.sbatch("-N", "2", "--ntasks-per-node=2", "--chdir", ROOT, "--output", tmp_path / "job.out",
                       "--export=ALL", os.path.join(ROOT, "slurm", "score.sbatch"), env=env)
    info = slurm.wait(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["NodeList"] == "n[1-2]"
    a, b = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(out)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) <= 1e-4
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["layout"]["ranks"] == 4 and summary["layout"]["pp"] == 2  # pp from configs/score.yaml
    assert {r["rank"] for r in summary["ranks"]} == {0, 1, 2, 3}


def test_template_without_required_variables_fails_with_one_line(slurm, tmp_path):
    job = slurm.sbatch("-N", "1", "-n", "1", "--output", tmp_path / "job.out", "--export=ALL",
                       os.path.join(ROOT, "slurm", "score.sbatch"), env=SLURM_ENV)
    info = slurm.wait(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("1:")
    lines = (tmp_path / "job.out").read_text().strip().splitlines()
    assert len(lines) == 1 and "MODEL: is required" in lines[0]


def test_srun_with_the_wrong_mpi_plugin_is_refused(slurm, scored_model, tmp_path):
    # MPICH under --mpi=none: every task would silently be rank 0 of a world of 1.
    d, model, _ = scored_model
    script = tmp_path / "wrong.sbatch"
    script.write_text(f"#!/bin/bash\nsrun --mpi=none hpc-llama check --model {model} --lengths 5\n")
    job = slurm.sbatch("-N", "2", "--ntasks-per-node=1", "--output", tmp_path / "job.out", "--export=ALL", script,
                       env=SLURM_ENV)
    info = slurm.wait(job)
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "FAILED", out
    assert "srun started 2 tasks but MPI sees a world of 1" in out and "--mpi" in out
    assert "Traceback" not in out


def test_srun_describes_every_rank(slurm, scored_model, tmp_path):
    d, model, _ = scored_model
    script = tmp_path / "check.sbatch"
    script.write_text(f"#!/bin/bash\nsrun --mpi=pmi2 hpc-llama check --model {model} --pp 2 --lengths 9\n")
    job = slurm.sbatch("-N", "2", "--ntasks-per-node=2", "--output", tmp_path / "job.out", "--export=ALL", script,
                       env=SLURM_ENV)
    info = slurm.wait(job)
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["node"] for r in rows] == ["n1", "n1", "n2", "n2"]  # Slurm's node names, not the host's
    assert "max-abs difference 0.00e+00" in out
