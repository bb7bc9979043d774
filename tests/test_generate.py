"""`hpc-llama generate`: greedy equal to transformers, seeded sampling equal across layouts, stops, resume."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from helpers.files import read_jsonl
from helpers.models import make_hf_model
from helpers.run import HPC, MPIRUN, ROOT, kill_midway, one_line_error, run_job

PROMPTS = ["def main(", "import os\nimport sys\n\nclass Handler", "x", "    return self.",
           "# A much longer prompt that goes on for a while, to make the lengths differ a lot: " * 2,
           "for i in range(10):", "héllo wörld"]


def write_prompts(path, prompts=PROMPTS):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")
    return str(path)


def generate(n, *args, check=True):
    return run_job(n, "generate", *args, check=check)


@pytest.fixture(scope="module")
def model(tokenizer_json, tmp_path_factory):
    """A random Llama with confident (well separated) logits, its tokenizer, and an EOS it really emits."""
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("gen") / "hf"
    m = make_hf_model("llama3", seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)  # top-1 margins far above fp32 noise: greedy is the same on any layout
    tok = Tokenizer.from_file(tokenizer_json)
    ids = [1] + tok.encode(PROMPTS[0], add_special_tokens=False).ids
    out = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    m.config.eos_token_id = int(out[0, len(ids) + 5])  # prompt 0 ends after 6 new tokens
    m.generation_config.eos_token_id = m.config.eos_token_id
    m.save_pretrained(d)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    return str(d)


def hf_greedy(model_dir, prompts, max_new):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    out = []
    for p in prompts:
        ids = [m.config.bos_token_id] + tok.encode(p, add_special_tokens=False).ids
        g = m.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                       eos_token_id=m.config.eos_token_id)
        out.append(g[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def reference(model):
    return hf_greedy(model, PROMPTS, 20)


@pytest.mark.parametrize("n, pp", [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)])
def test_greedy_equals_transformers_generate(model, reference, tmp_path, n, pp):
    prompts = write_prompts(tmp_path / "p.jsonl")
    generate(n, "--model", model, "--input", prompts, "--output", tmp_path / "g.jsonl", "--pp", pp,
             "--max-new-tokens", "20", "--batch-size", "3", "--quiet")
    got = read_jsonl(tmp_path / "g.jsonl")
    assert [r["index"] for r in got] == list(range(len(PROMPTS))) and [r["id"] for r in got][0] == "p0"
    assert [r["tokens"] for r in got] == reference
    assert got[0]["finish_reason"] == "eos" and got[0]["n_new_tokens"] == 6
    at_limit = [r for r in got if r["n_new_tokens"] == 20]
    assert at_limit and all(r["finish_reason"] == "length" for r in at_limit)
    summary = json.load(open(str(tmp_path / "g.jsonl") + ".summary.json"))
    assert summary["layout"]["pp"] == pp and len(summary["ranks"]) == n


def _sampling_args(model, prompts, seed=7):
    return ["--model", model, "--input", prompts, "--max-new-tokens", "16", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.95", "--seed", seed, "--quiet"]


@pytest.fixture(scope="module")
def one_rank_samples(model, tmp_path_factory):
    """Seeded sampling in one process: the prompts, and the tokens every layout must give."""
    d = tmp_path_factory.mktemp("sampling")
    prompts = write_prompts(d / "p.jsonl")
    generate(1, *_sampling_args(model, prompts), "--output", d / "one.jsonl", "--batch-size", "2")
    return prompts, read_jsonl(d / "one.jsonl")


def test_another_seed_samples_other_tokens(model, one_rank_samples, tmp_path):
    prompts, a = one_rank_samples
    generate(1, *_sampling_args(model, prompts, seed=8), "--output", tmp_path / "other.jsonl")
    assert [r["tokens"] for r in read_jsonl(tmp_path / "other.jsonl")] != [r["tokens"] for r in a]


@pytest.mark.parametrize("n, pp", [(2, 1), (4, 2)])
def test_seeded_sampling_is_the_same_on_every_layout(model, one_rank_samples, tmp_path, n, pp):
    prompts, a = one_rank_samples
    generate(n, *_sampling_args(model, prompts), "--output", tmp_path / "many.jsonl", "--pp", pp, "--batch-size", "4")
    b = read_jsonl(tmp_path / "many.jsonl")
    assert len(a) == len(PROMPTS) and [r["tokens"] for r in a] == [r["tokens"] for r in b]


def test_stop_strings_length_and_context_limits(model, reference, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    full = tok.decode(reference[3], skip_special_tokens=True)
    stop = full[6:9]
    prompts = write_prompts(tmp_path / "p.jsonl")
    generate(1, "--model", model, "--input", prompts, "--output", tmp_path / "s.jsonl", "--max-new-tokens", "20",
             "--stop", stop, "--stop", "NEVER-APPEARS-HERE", "--quiet")
    got = read_jsonl(tmp_path / "s.jsonl")[3]
    assert got["finish_reason"] == "stop" and got["completion"] == full[:full.find(stop)]
    assert stop not in got["completion"]
    # The context: a prompt of n tokens in a context of n + 3 gets 4 new tokens, the last at position n + 3.
    n = len(tok.encode(PROMPTS[1], add_special_tokens=False).ids) + 1
    generate(1, "--model", model, "--input", write_prompts(tmp_path / "one.jsonl", [PROMPTS[1]]),
             "--output", tmp_path / "c.jsonl", "--max-new-tokens", "50", "--context", n + 3, "--quiet")
    got = read_jsonl(tmp_path / "c.jsonl")[0]
    assert got["finish_reason"] == "context" and got["n_new_tokens"] == 4 and got["tokens"] == reference[1][:4]


def test_continuous_batching_and_stage_utilisation(model, reference, tmp_path):
    many = PROMPTS * 3
    prompts = write_prompts(tmp_path / "p.jsonl", many)
    generate(2, "--model", model, "--input", prompts, "--output", tmp_path / "g.parquet", "--pp", "2",
             "--max-new-tokens", "20", "--batch-size", "4", "--groups", "2", "--quiet")
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "g.parquet").to_pylist()
    assert [r["tokens"] for r in rows] == reference * 3  # 21 prompts through 4 slots, refilled as they finish
    summary = json.load(open(str(tmp_path / "g.parquet") + ".summary.json"))
    assert summary["layout"]["groups"] == 2 and len(summary["ranks"]) == 2
    assert all(0 < r["utilisation"] <= 1 for r in summary["ranks"])


def test_text_prompts_one_per_line(model, reference, tmp_path):
    (tmp_path / "p.txt").write_text("def main(\n\nx\n")
    generate(1, "--model", model, "--input", tmp_path / "p.txt", "--output", tmp_path / "g.jsonl",
             "--max-new-tokens", "20", "--quiet")
    got = read_jsonl(tmp_path / "g.jsonl")
    assert [r["id"] for r in got] == [f"{tmp_path / 'p.txt'}:1", f"{tmp_path / 'p.txt'}:3"]
    assert [r["tokens"] for r in got] == [reference[0], reference[2]]


def test_keep_fields_are_copied_into_each_record(model, tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "topic": f"t{i}", "n": i} | ({"extra": [i]} if i else {}))
                           + "\n" for i, p in enumerate(PROMPTS[:3])))
    for out in ("g.jsonl", "g.parquet"):
        generate(1, "--model", model, "--input", src, "--output", tmp_path / out, "--max-new-tokens", "4", "--quiet",
                 "--keep-fields", "topic,n,extra")
    got = read_jsonl(tmp_path / "g.jsonl")
    assert [(r["topic"], r["n"], r["extra"]) for r in got] == [("t0", 0, None), ("t1", 1, [1]), ("t2", 2, [2])]
    table = pq.read_table(tmp_path / "g.parquet").to_pylist()
    assert [(r["topic"], r["n"], r["extra"]) for r in table] == [("t0", 0, None), ("t1", 1, "[1]"), ("t2", 2, "[2]")]


def test_killed_job_resumes_to_byte_identical_output(model, tmp_path):
    # 10 steps of 14 prompts: the kill after 3 leaves most of the job to the rerun.
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 20)
    common = ["--model", model, "--input", prompts, "--pp", "2", "--max-new-tokens", "12", "--temperature", "0.7",
              "--seed", "3", "--set", "generate.chunk_docs=14", "--quiet"]
    generate(2, *common, "--output", tmp_path / "whole.jsonl")
    out = tmp_path / "cut.jsonl"
    cmd = [MPIRUN, "-n", "2", HPC, "generate", *map(str, common), "--output", str(out)]
    kill_midway(cmd, str(out) + ".journal.json", "kill-one")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


@pytest.mark.parametrize("content, extra, needle", [
    (None, ["--context", "64"], "p.jsonl:5: the prompt has"),
    (b'{"prompt": "ok"}\n{"prompt": oops}\n', [], "p.jsonl:2: invalid JSON"),
    (None, ["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (None, ["--max-new-tokens", "-3"], "max_new_tokens must be at least 1"),
    (None, ["--top-p", "0"], "top_p must be in (0, 1]"),
    (None, ["--top-p", "1.5"], "top_p must be in (0, 1]"),
])
def test_bad_input_fails_cleanly(model, tmp_path, content, extra, needle):
    prompts = tmp_path / "p.jsonl"
    if content is None:
        write_prompts(prompts)
    else:
        prompts.write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    one_line_error(generate(1, "--model", model, "--input", prompts, "--output", tmp_path / "g.jsonl", *extra,
                            check=False), needle)
    assert sorted(os.listdir(tmp_path)) == before


def test_existing_output_is_refused(model, tmp_path):
    (tmp_path / "g.jsonl").write_text("keep\n")
    one_line_error(generate(1, "--model", model, "--input", write_prompts(tmp_path / "p.jsonl"), "--output",
                            tmp_path / "g.jsonl", check=False), "already exists (use --overwrite")
    assert (tmp_path / "g.jsonl").read_text() == "keep\n"


@pytest.mark.parametrize("lengths, pieces", [
    ([], []),
    ([7], [[0]]),
    ([106, 85, 73, 50, 53, 27, 31, 25], [[7, 5, 6], [3, 4, 2], [1, 0]]),  # the benchmark's prompts
    ([10, 10, 10, 10], [[0, 1, 2, 3]]),  # equal lengths: one piece, no padding
    ([5, 300], [[0], [1]]),  # 600 padded for 305 real: apart
    ([20, 30], [[0, 1]]),  # 60 padded tokens: small enough to go together anyway
    ([100, 120, 130, 400], [[0, 1, 2], [3]]),
])
def test_prefill_pieces(lengths, pieces):
    from hpc_llama.generate.scheduler import prefill_pieces

    got = prefill_pieces(lengths)
    assert got == pieces
    assert sorted(i for p in got for i in p) == list(range(len(lengths)))  # every prompt exactly once
