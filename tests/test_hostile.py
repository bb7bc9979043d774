"""What users and clusters really do to outputs: two jobs on one output, planted links, an output that is an
input, failures and kills midway, a full disk, and numbers that are not numbers. Each case is a real process on
real files; each says what the tool does now."""

import os
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest

from helpers.files import read_jsonl, write_jsonl
from helpers.run import HPC, ROOT, one_line_error, run_cli


def token_docs(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return write_jsonl(path, [{"id": i, "input_ids": rng.integers(0, 320, int(k)).tolist()}
                              for i, k in enumerate(rng.integers(2, 40, n))])


def score(model, docs, out, *extra, check=None):
    return run_cli("score", "--model", model, "--input", docs, "--output", out, "--context", 16, "--quiet", *extra,
                   check=check)


@pytest.fixture(scope="module")
def model(hf_dirs):
    return hf_dirs["llama3"]


# --- one output, one job ------------------------------------------------------------------------------------


def test_a_second_job_on_one_output_is_refused_at_once_naming_the_first(model, tmp_path):
    from hpc_llama.atomic import OutputLock

    docs, out = token_docs(tmp_path / "docs.jsonl"), tmp_path / "s.jsonl"
    with OutputLock(str(out)):  # this test process is the first job
        p = score(model, docs, out)
        one_line_error(p, f"{out} is being written by another job (host {socket.gethostname()} pid {os.getpid()} ")
        assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "s.jsonl.lock"]  # nothing of the second job's
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]  # the lock goes with its holder

    # Two real jobs: the second starts while the first runs, and is refused; the first finishes whole.
    many = token_docs(tmp_path / "many.jsonl", n=3000, seed=1)
    first = subprocess.Popen([HPC, "score", "--model", model, "--input", many, "--output", str(out), "--context", "16",
                              "--set", "score.chunk_docs=100", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{out}.journal.json") and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the first job ended before the second could start"
    one_line_error(score(model, many, out, "--set", "score.chunk_docs=100"), f"pid {first.pid} ")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert [r["index"] for r in read_jsonl(out)] == list(range(3000))
    one_line_error(score(model, many, out), "already exists (use --overwrite to replace it)")


# --- links, and outputs that are something else ----------------------------------------------------------------


@pytest.mark.parametrize("side", ["partial", "journal.json", "lock"])
def test_a_link_planted_at_a_side_file_is_refused_and_its_target_untouched(model, tmp_path, side):
    docs, out = token_docs(tmp_path / "docs.jsonl"), tmp_path / "s.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{out}.{side}")
    one_line_error(score(model, docs, out), f"{out}.{side} is a symbolic link: refusing to")
    assert victim.read_text() == "precious\n" and not out.exists()


def test_links_at_the_output_and_its_summary_are_replaced_not_written_through(model, tmp_path):
    docs, out = token_docs(tmp_path / "docs.jsonl"), tmp_path / "s.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{out}.summary.json")
    score(model, docs, out, check=True)
    assert victim.read_text() == "precious\n" and not os.path.islink(f"{out}.summary.json")
    os.remove(out)
    os.symlink(victim, out)
    one_line_error(score(model, docs, out), "already exists (use --overwrite to replace it)")
    score(model, docs, out, "--overwrite", check=True)
    assert victim.read_text() == "precious\n" and not out.is_symlink() and len(read_jsonl(out)) == 40


def test_an_output_that_is_an_input_the_model_or_a_device_is_refused(model, tmp_path):
    docs = token_docs(tmp_path / "docs.jsonl")
    before = open(docs, "rb").read()
    one_line_error(score(model, docs, docs, "--overwrite"), f"{docs} is an input of this job ({docs}): refusing")
    os.symlink(docs, tmp_path / "alias.jsonl")  # the same file under another name
    one_line_error(score(model, docs, tmp_path / "alias.jsonl", "--overwrite"), "is an input of this job")
    assert open(docs, "rb").read() == before
    one_line_error(score(model, docs, f"{model}/model.safetensors", "--format", "jsonl", "--overwrite"),
                   f"{model}/model.safetensors is a file of an input of this job ({model})")
    one_line_error(score(model, docs, "/dev/null", "--format", "jsonl", "--overwrite"),
                   "/dev/null is not a regular file: refusing to replace it")
    h5 = tmp_path / "m.h5"
    run_cli("convert", model, h5, "--quiet", check=True)
    one_line_error(run_cli("convert", h5, h5, "--overwrite"), f"{h5} is an input of this job")
    one_line_error(run_cli("compress", "--model", h5, "--output", h5, "--method", "int8", "--overwrite"),
                   f"{h5} is an input of this job")
    assert os.path.getsize(h5) > 0


# --- failures and kills leave the next run free -------------------------------------------------------------


def test_a_job_that_failed_before_its_first_step_leaves_the_output_free(model, tmp_path):
    from hpc_llama.records import Journal

    docs, out = token_docs(tmp_path / "docs.jsonl"), tmp_path / "s.jsonl"
    # A first attempt that was killed before its first step (as it leaves things), with other options:
    # it recorded nothing, so the corrected command takes its place instead of being refused.
    Journal(str(out), {"model": "another", "inputs": [], "options": {}}, overwrite=False)
    score(model, docs, out, check=True)
    assert len(read_jsonl(out)) == 40
    # A real failure after the journal exists: a layer whose bytes no longer match their checksum is found
    # when the ranks load their slices. The job ends with one line and leaves nothing behind.
    bad = tmp_path / "bad.h5"
    run_cli("convert", model, bad, "--quiet", check=True)
    with h5py.File(bad, "r+") as f:
        name = next(n for n in _datasets(f) if "layers.1" in n and "wq" in n)
        f[name][...] = f[name][...] + 1
    out2 = tmp_path / "s2.jsonl"
    one_line_error(score(bad, docs, out2), "checksum")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("s2.")]
    score(model, docs, out2, check=True)
    assert open(out2, "rb").read() == open(out, "rb").read()


def _datasets(f):
    names = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names


def test_what_a_killed_job_left_is_swept_by_the_next_one(model, tmp_path):
    """A kill leaves the private directory a job writes in (.OUT.partial-XXXX): planted here as a kill leaves
    it, each job on that output removes it before it writes, and only there."""
    def plant(out):
        d = tmp_path / f".{os.path.basename(out)}.partial-k1ll3d"
        d.mkdir()
        (d / os.path.basename(out)).write_bytes(b"\0" * 100_000)
        return d

    h5 = tmp_path / "m.h5"
    left = [plant(h5), plant(tmp_path / "q.h5"), plant(tmp_path / "data"), plant(tmp_path / "s.parquet")]
    other = tmp_path / ".other.h5.partial-k1ll3d"
    other.mkdir()
    run_cli("convert", model, h5, "--quiet", check=True)
    run_cli("compress", "--model", h5, "--output", tmp_path / "q.h5", "--method", "int8", "--quiet", check=True)
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of a small corpus about nothing much\n" for i in range(200)))
    run_cli("prepare", "--input", text, "--output", tmp_path / "data", "--train-tokenizer", 300, "--quiet", check=True)
    score(model, token_docs(tmp_path / "docs.jsonl"), tmp_path / "s.parquet", check=True)
    assert not any(d.exists() for d in left) and other.exists()


def test_a_full_disk_names_the_file_and_the_job_carries_on_once_there_is_room(model, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "hpc-llama-test", disk],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights); the write path's error "
                    "handling is the same for ENOSPC, EDQUOT and EIO")
    try:
        docs = token_docs(tmp_path / "docs.jsonl", n=2000, seed=3)
        whole = tmp_path / "whole.jsonl"
        score(model, docs, whole, "--set", "score.chunk_docs=100", check=True)
        out = disk / "s.jsonl"
        p = score(model, docs, out, "--set", "score.chunk_docs=100")
        one_line_error(p, f"{disk}/s.jsonl", "No space left on device")
        assert read_jsonl(f"{out}.journal.json")[0]["state"]["documents"] > 0  # steps before it are kept
        subprocess.run(["mount", "-o", "remount,size=16m", disk], check=True)
        score(model, docs, out, "--set", "score.chunk_docs=100", check=True)
        assert out.read_bytes() == whole.read_bytes()
    finally:
        subprocess.run(["umount", disk], capture_output=True)


# --- numbers and sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["generate", "--temperature", "nan"], "argument --temperature: not a finite number: 'nan'"),
    (["generate", "--top-p", "inf"], "argument --top-p: not a finite number: 'inf'"),
    (["score", "--context", "0"], "argument --context: must be at least 1, got 0"),
    (["score", "--set", "parallel.timeout_s=.nan"], "parallel.timeout_s: expected a finite number, got nan"),
    (["compress", "--method", "prune", "--sparsity", "nan"], "argument --sparsity: not a finite number: 'nan'"),
])
def test_numbers_that_are_not_numbers_are_refused(model, tmp_path, args, needle):
    docs = token_docs(tmp_path / "docs.jsonl", n=3)
    io = ["--model", model] + (["--output", tmp_path / "o.h5"] if args[0] == "compress" else
                               ["--input", docs, "--output", tmp_path / "o.jsonl"])
    one_line_error(run_cli(args[0], *io, *args[1:]), needle)
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


def test_a_document_over_the_size_limit_is_named_by_file_and_line(model, tmp_path):
    from hpc_llama.config import GenerateConfig, ScoreConfig
    from hpc_llama.documents import MAX_DOCUMENT_BYTES

    assert ScoreConfig().max_document_bytes == GenerateConfig().max_document_bytes == MAX_DOCUMENT_BYTES == 8 << 20
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [5] * 700}])
    size = len(open(docs, "rb").readlines()[1])  # the second line, as stored
    one_line_error(score(model, docs, tmp_path / "o.jsonl", "--set", "score.max_document_bytes=1000"),
                   f"docs.jsonl:2: the document is {size:,} bytes, more than the limit of 1,000")


def test_an_os_error_is_one_line_naming_its_path(capsys):
    from hpc_llama.parallel.ranks import run_guarded

    def job(argv):
        open("/nonexistent-dir/x.jsonl")

    assert run_guarded(job) == 2
    assert capsys.readouterr().err == "hpc-llama: error: /nonexistent-dir/x.jsonl: No such file or directory\n"


def test_a_second_training_run_on_one_run_directory_is_refused(tmp_path):
    from hpc_llama.atomic import OutputLock

    run = tmp_path / "run"
    with OutputLock(str(run)):
        p = run_cli("train", "--config", "tiny-train", "--data", tmp_path / "no-data", "--out", run)
        one_line_error(p, f"{run} is being written by another job (host {socket.gethostname()} pid {os.getpid()} ")
    assert not run.exists()


@pytest.mark.parametrize("job", ["convert", "prepare"])
def test_a_real_kill_midway_leaves_only_what_the_rerun_sweeps(tmp_path, job):
    """SIGKILL while the job writes into its private directory; the same command then finishes, and nothing of
    the killed run is left."""
    import glob
    import signal

    if job == "convert":
        src = tmp_path / "m.h5"
        run_cli("init", "--config", "bench-100m", "--set", "model.n_layers=4", "--set", "model.vocab_size=8000",
                src, "--quiet", check=True)
        out = tmp_path / "hf"
        cmd = [HPC, "convert", str(src), str(out), "--format", "hf", "--quiet"]
    else:
        stdlib = os.path.dirname(os.__file__)
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for f in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:60]:
            os.symlink(f, corpus / (os.path.basename(f) + ".txt"))
        out = tmp_path / "data"
        cmd = [HPC, "prepare", "--input", str(corpus), "--output", str(out), "--train-tokenizer", "512", "--quiet"]
    private = f"{tmp_path}/.{out.name}.partial-*"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, DS_ACCELERATOR="cpu"))
    deadline = time.monotonic() + 60
    while not glob.glob(f"{private}/*") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"{job} finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert glob.glob(private) and not out.exists()  # what the kill left
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"),
                       timeout=240)
    assert p.returncode == 0, p.stderr
    assert out.is_dir() and not glob.glob(private) and not os.path.exists(f"{out}.lock")
