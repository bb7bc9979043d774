"""`hpc-llama score` end to end: reference parity, layout invariance, resume, formats, bad input."""

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from helpers.files import read_jsonl, write_jsonl
from helpers.run import HPC, MPIRUN, ROOT, kill_midway, one_line_error, run_cli, run_job
from test_scoring_plan import lm_eval_windows

CONTEXT, STRIDE = 32, 24


@pytest.fixture(scope="module")
def model_dir(text_model):
    return text_model


@pytest.fixture(scope="module")
def mixed_docs(tmp_path_factory):
    """Short, long (many windows), empty, unicode, whitespace-only, and token-id documents."""
    import glob

    src = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:5])
    rng = np.random.default_rng(0)
    docs = []
    for i in range(24):
        n = int(rng.choice([3, 20, 80, 400, 1500]))
        s = int(rng.integers(0, len(src) - n))
        docs.append({"id": f"doc{i}", "text": src[s:s + n]})
    docs += [{"id": "empty", "text": ""}, {"id": "space", "text": "   "},
             {"id": "unicode", "text": "naïve café — 日本語のテキスト 🚀✨ Ελληνικά"},
             {"id": 7, "input_ids": [5, 17, 300, 2, 99, 1, 42] * 9}, {"text": "no id here"}]
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", docs)


def reference_scores(model_dir, docs_path, context, stride):
    """The same definition computed with plain transformers and the tokenizers library."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    bos = model.config.bos_token_id
    out = []
    for d in read_jsonl(docs_path):
        seq = d["input_ids"] if "input_ids" in d else [bos] + tok.encode(d["text"], add_special_tokens=False).ids
        total, n = 0.0, 0
        for start, length, n_scored in lm_eval_windows(len(seq), context, context - stride + 1):
            x = torch.tensor([seq[start:start + length]])
            with torch.no_grad():
                lp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            targets = seq[start + 1:start + length + 1]
            for j in range(length - n_scored, length):
                total += lp[j, targets[j]].item()
                n += 1
        out.append((n, total))
    return out


def score(n, model, docs, out, *extra, pp=1, check=True):
    return run_job(n, "score", "--model", model, "--input", docs, "--output", out, "--pp", pp,
                   "--context", CONTEXT, "--stride", STRIDE, "--quiet", *extra, check=check)


def test_loglik_matches_plain_transformers(model_dir, mixed_docs, tmp_path):
    score(1, model_dir, mixed_docs, tmp_path / "s.jsonl")
    got = read_jsonl(tmp_path / "s.jsonl")
    want = reference_scores(model_dir, mixed_docs, CONTEXT, STRIDE)
    assert [r["index"] for r in got] == list(range(len(want)))
    worst = 0.0
    for r, (n, ll) in zip(got, want):
        assert r["n_tokens"] == n
        worst = max(worst, abs(r["loglik"] - ll))
        if n:
            assert r["ppl"] == pytest.approx(np.exp(-r["loglik"] / n))
        else:
            assert r["loglik"] == 0.0 and r["ppl"] is None
    print(f"max |loglik - reference| = {worst:.2e} over {len(want)} documents")
    assert worst <= 1e-4
    by_id = {r["id"]: r for r in got}
    assert by_id["empty"]["n_tokens"] == 0 and by_id[7]["n_tokens"] == 62 and got[-1]["id"] is None
    assert max(r["n_tokens"] for r in got) > 4 * CONTEXT  # long documents really took several windows


@pytest.fixture(scope="module")
def layout_docs(tmp_path_factory):
    rng = np.random.default_rng(1)
    docs = [{"id": i, "input_ids": rng.integers(0, 320, int(n)).tolist()}
            for i, n in enumerate(rng.choice([1, 2, 5, 9, 31, 32, 33, 70, 250], size=60))]
    return write_jsonl(tmp_path_factory.mktemp("layout") / "docs.jsonl", docs)


@pytest.fixture(scope="module")
def one_rank_layout_scores(model_dir, layout_docs, tmp_path_factory):
    """The one-process records every layout must give."""
    out = tmp_path_factory.mktemp("one-rank") / "one.jsonl"
    score(1, model_dir, layout_docs, out, "--set", "score.chunk_docs=16")
    return read_jsonl(out)


@pytest.mark.parametrize("n, pp", [(2, 2), (2, 1), (4, 2), (4, 4)])
def test_same_records_for_every_layout(model_dir, layout_docs, one_rank_layout_scores, tmp_path, n, pp):
    p = score(n, model_dir, layout_docs, tmp_path / "many.jsonl", "--set", "score.chunk_docs=16", pp=pp)
    if n == 2:  # --quiet under mpirun: not a line from either rank
        assert p.stderr == "" and p.stdout == ""
    a, b = one_rank_layout_scores, read_jsonl(tmp_path / "many.jsonl")
    assert [(r["index"], r["id"], r["n_tokens"]) for r in a] == [(r["index"], r["id"], r["n_tokens"]) for r in b]
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) <= 1e-4
    summary = json.load(open(str(tmp_path / "many.jsonl") + ".summary.json"))
    assert summary["layout"] == {"ranks": n, "pp": pp, "dp": n // pp, "device": "cpu", "dtype": "float32"}


@pytest.mark.parametrize("n, pp", [(1, 1), (2, 2)])
def test_summary_says_how_long_each_rank_took_to_start(model_dir, layout_docs, tmp_path, n, pp):
    """first_forward_s: seconds from a rank's process start (interpreter and imports included) to its first
    forward; the summary's own is the last rank's."""
    out = tmp_path / "s.jsonl"
    began = time.monotonic()
    score(n, model_dir, layout_docs, out, pp=pp)
    elapsed = time.monotonic() - began
    summary = json.load(open(str(out) + ".summary.json"))
    starts = [r["first_forward_s"] for r in summary["ranks"]]
    assert len(starts) == n and all(0 < s < elapsed for s in starts), (starts, elapsed)
    assert summary["first_forward_s"] == max(starts)


def test_parquet_and_hdf5_hold_the_same_records(model_dir, mixed_docs, tmp_path):
    import h5py
    import pyarrow.parquet as pq

    score(1, model_dir, mixed_docs, tmp_path / "s.jsonl", "--token-logprobs")
    score(1, model_dir, mixed_docs, tmp_path / "s.parquet", "--token-logprobs")
    score(1, model_dir, mixed_docs, tmp_path / "s.h5", "--token-logprobs")
    ref = read_jsonl(tmp_path / "s.jsonl")
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["index"] for r in table] == [r["index"] for r in ref]
    for a, b in zip(ref, table):
        assert a["loglik"] == b["loglik"] and a["n_tokens"] == b["n_tokens"]
        assert np.allclose(a["token_logprobs"], b["token_logprobs"]) and len(a["token_logprobs"]) == a["n_tokens"]
        assert (a["id"] is None and b["id"] is None) or str(a["id"]) == b["id"]
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["loglik"][:].tolist() == [r["loglik"] for r in ref]
        off = f["token_logprobs_offsets"][:]
        k = 3
        assert np.allclose(f["token_logprobs"][off[k]:off[k + 1]], ref[k]["token_logprobs"])
        assert np.isnan(f["ppl"][[r["id"] for r in ref].index("empty")])
    # The token log-probabilities add up to the document's log-likelihood.
    assert all(abs(sum(r["token_logprobs"]) - r["loglik"]) < 1e-3 for r in ref)


def test_text_files_directories_and_globs(model_dir, tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i, text in enumerate(["first document", "second one, longer " * 5, ""]):
        (d / f"{i:02d}.txt").write_text(text)
    score(1, model_dir, str(d), tmp_path / "dir.jsonl")
    score(1, model_dir, str(d / "*.txt"), tmp_path / "glob.jsonl")
    a = read_jsonl(tmp_path / "dir.jsonl")
    assert [r["id"] for r in a] == [str(d / f"{i:02d}.txt") for i in range(3)]
    assert a == read_jsonl(tmp_path / "glob.jsonl")
    assert a[2]["n_tokens"] == 0


# Quiet mode under mpirun (nothing on stdout or stderr) is checked on the 2-rank layout runs above.
def test_progress_bar_on_rank_0_only(model_dir, layout_docs, tmp_path):
    p = run_job(2, "score", "--model", model_dir, "--input", layout_docs, "--output", tmp_path / "a.jsonl")
    assert p.stderr.count("60/60") >= 1 and "hpc-llama [rank 0]: scored 60 documents" in p.stderr
    assert "[rank 1]" not in p.stderr


# --- resume -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """600 documents: 15 steps of 40 (chunk_docs), about 0.15 s each, so a kill after 3 leaves 12 to the rerun."""
    rng = np.random.default_rng(2)
    docs = [{"id": f"r{i}", "input_ids": rng.integers(0, 320, int(n)).tolist()}
            for i, n in enumerate(rng.integers(5, 120, size=600))]
    return write_jsonl(tmp_path_factory.mktemp("resume") / "docs.jsonl", docs)


def _resume_args(model_dir, many_docs):
    return ["--model", model_dir, "--input", many_docs, "--pp", "2", "--context", CONTEXT,
            "--set", "score.chunk_docs=40", "--quiet"]


@pytest.fixture(scope="module")
def whole_run(model_dir, many_docs, tmp_path_factory):
    """The uninterrupted run that every interrupted one must equal, byte for byte."""
    out = tmp_path_factory.mktemp("whole") / "whole.jsonl"
    run_job(2, "score", *_resume_args(model_dir, many_docs), "--output", out)
    return out.read_bytes()


@pytest.mark.parametrize("how", ["kill-one", "term-all"])
def test_killed_job_resumes_to_byte_identical_output(model_dir, many_docs, whole_run, tmp_path, how):
    common = _resume_args(model_dir, many_docs)
    out = tmp_path / "resumed.jsonl"
    cmd = [MPIRUN, "-n", "2", HPC, "score", *map(str, common), "--output", str(out)]
    kill_midway(cmd, str(out) + ".journal.json", how)
    assert not out.exists() and os.path.exists(str(out) + ".partial")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == whole_run
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".journal.json")
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["resumed"] and summary["documents"] == 600


def test_a_changed_input_is_refused_not_mixed_in(model_dir, many_docs, tmp_path):
    docs = shutil.copy(many_docs, tmp_path / "docs.jsonl")
    out = tmp_path / "s.jsonl"
    common = ["--model", model_dir, "--input", str(docs), "--pp", "2", "--context", str(CONTEXT),
              "--set", "score.chunk_docs=40", "--quiet", "--output", str(out)]
    kill_midway([MPIRUN, "-n", "2", HPC, "score", *common], str(out) + ".journal.json", "kill-one")
    partial = open(str(out) + ".partial", "rb").read()
    with open(docs, "a") as f:
        f.write(json.dumps({"id": "late", "text": "added after the job started"}) + "\n")
    one_line_error(run_job(2, "score", *common, check=False), "belongs to a job with a different inputs", rank=0)
    assert open(str(out) + ".partial", "rb").read() == partial and not out.exists()


def test_twenty_thousand_documents_under_two_ranks(model_dir, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", ({"id": i, "text": f"document number {i} says hi"} for i in range(20000)))
    out = tmp_path / "s.jsonl"
    run_job(2, "score", "--model", model_dir, "--input", docs, "--output", out, "--pp", "2", "--quiet", timeout=400)
    ids = [json.loads(line)["id"] for line in open(out)]
    assert ids == list(range(20000))
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["documents"] == 20000 and summary["padding_waste"] < 0.2


# --- bad input ------------------------------------------------------------------------


def _bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl:2: invalid JSON"),
    (b'{"text": "fine"}\n\n{"body": "no text"}\n', "bad.jsonl:3: no 'text' field"),
    (b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', "bad.jsonl:2: not valid UTF-8"),
    (b'{"input_ids": [1, 2, 99999]}\n', "bad.jsonl:1: input_ids contains 99999, outside the vocabulary (0..319)"),
    (b'\n\n', "no documents in"),
])
def test_bad_documents_fail_with_file_and_line(model_dir, tmp_path, content, needle):
    docs = _bad(tmp_path, "bad.jsonl", content)
    before = sorted(os.listdir(tmp_path))
    one_line_error(run_cli("score", "--model", model_dir, "--input", docs, "--output", tmp_path / "out.jsonl"), needle)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no partial, no journal


def test_existing_output_and_missing_tokenizer_are_refused(model_dir, hf_dirs, mixed_docs, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    one_line_error(run_cli("score", "--model", model_dir, "--input", mixed_docs, "--output", out),
                   "already exists (use --overwrite")
    assert out.read_text() == "keep me\n"
    one_line_error(run_cli("score", "--model", hf_dirs["llama3"], "--input", mixed_docs, "--output", tmp_path / "o2.jsonl"),
                   "has no tokenizer.json")
    run_cli("score", "--model", model_dir, "--input", mixed_docs, "--output", out, "--overwrite", "--quiet", check=True)
    assert len(read_jsonl(out)) == len(read_jsonl(mixed_docs))


def test_each_rank_reads_only_its_own_layers(tmp_path):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import slice_sources
    from hpc_llama.config import ParallelConfig
    from hpc_llama.parallel.layout import stage_plans

    model = tmp_path / "m.h5"
    run_cli("init", "--config", "bench-100m", "--set", "model.n_layers=8", "--set", "model.vocab_size=8000",
            "--set", "model.tie_embeddings=false", model, check=True)
    docs = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": list(range(3, 40))}] * 8)
    out = tmp_path / "s.jsonl"
    run_job(4, "score", "--model", model, "--input", docs, "--output", out, "--pp", "4", "--quiet")
    ranks = json.load(open(str(out) + ".summary.json"))["ranks"]
    reader = open_checkpoint(str(model))
    plans = stage_plans(reader.config, ParallelConfig(pp=4))
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and len(plans) == 4
    total = sum(reader.info(n).nbytes for n in reader.names())
    for r, plan in zip(ranks, plans):
        own = sum(reader.info(n).nbytes for n in slice_sources(reader, plan.layers, plan.embed, plan.head))
        assert r["layers"] == [plan.layers.start, plan.layers.stop]
        print(f"rank {r['rank']}: read {r['model_bytes_read']} for {own} bytes of its slice ({total} in the model)")
        assert own <= r["model_bytes_read"] <= own * 1.05 + (64 << 10)
        assert r["model_bytes_read"] < total / 2


def test_bf16_scoring_runs_and_stays_close_to_fp32(model_dir, mixed_docs, tmp_path):
    # bf16 is for GPUs (slow on this CPU) but must work everywhere: tiny model, few documents.
    score(1, model_dir, mixed_docs, tmp_path / "fp32.jsonl")
    score(2, model_dir, mixed_docs, tmp_path / "bf16.jsonl", "--dtype", "bf16", pp=2)
    a, b = read_jsonl(tmp_path / "fp32.jsonl"), read_jsonl(tmp_path / "bf16.jsonl")
    assert len(a) == len(read_jsonl(mixed_docs)) and [r["n_tokens"] for r in a] == [r["n_tokens"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loglik"] - y["loglik"]) <= 0.02 * abs(x["loglik"]) + 0.1
    assert json.load(open(str(tmp_path / "bf16.jsonl") + ".summary.json"))["layout"]["dtype"] == "bfloat16"
