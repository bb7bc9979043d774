"""Conditional requests in `score` (context + continuation): lm-evaluation-harness's HF backend is the reference
for the tokenization, the log-likelihood and is_greedy; shared contexts are packed; every layout agrees."""

import json
import os

import numpy as np
import pytest
import torch

from helpers.files import read_jsonl, write_jsonl
from helpers.run import one_line_error, run_job

CONTEXT = 128


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    """Questions with 4 choices each (one context, several continuations), contexts ending in spaces and
    newlines, an empty context, contexts longer than the window, plain documents mixed in."""
    rng = np.random.default_rng(3)
    words = ("def return import class self lambda yield value None True list dict the of and to in is "
             "for with as from while").split()

    def phrase(n):
        return " ".join(rng.choice(words, n))

    recs = []
    for q in range(12):
        ctx = f"Question {q}: {phrase(int(rng.integers(3, 12)))}?" + ["\nAnswer:", " Answer: ", "\n", ""][q % 4]
        for c in range(4):
            recs.append({"id": f"q{q}c{c}", "context": ctx, "continuation": " " + phrase(int(rng.integers(1, 4)))})
    recs.append({"id": "plain", "text": "a plain document " + phrase(30)})
    recs.append({"id": "empty-context", "context": "", "continuation": "import os"})
    recs.append({"id": "long", "context": phrase(120), "continuation": " return value"})  # left-truncated
    recs.append({"id": "long2", "context": phrase(120), "continuation": " return value"})
    recs.append({"id": "empty-continuation", "context": "x =", "continuation": ""})
    recs.append({"id": "spaces", "context": "x =   ", "continuation": "1"})
    return write_jsonl(tmp_path_factory.mktemp("req") / "requests.jsonl", recs)


@pytest.fixture(scope="module")
def lm_eval_results(text_model, requests_file):
    """(loglik, is_greedy, continuation ids) of every conditional request, from lm-eval's own HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(text_model, "tokenizer.json"), bos_token="<s>",
                                  eos_token="</s>")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=CONTEXT, device="cpu")
    # lm-eval refuses an empty continuation (an assert); `score` gives it n_tokens 0 and loglik 0.
    recs = [r for r in read_jsonl(requests_file) if "context" in r and r["continuation"]]
    instances = [Instance("loglikelihood", {}, (r["context"], r["continuation"]), i) for i, r in enumerate(recs)]
    out = lm.loglikelihood(instances, disable_tqdm=True)
    encoded = []
    for r in recs:  # lm-eval's own split of each pair into context and continuation ids
        if r["context"] == "":
            encoded.append(lm.tok_encode(r["continuation"], add_special_tokens=False))
        else:
            encoded.append(lm._encode_pair(r["context"], r["continuation"])[1])
    return {r["id"]: (ll, greedy, cont) for r, (ll, greedy), cont in zip(recs, out, encoded, strict=True)}


def score(n, model, docs, out, *extra, pp=1, check=True):
    return run_job(n, "score", "--model", model, "--input", docs, "--output", out, "--pp", pp, "--context", CONTEXT,
                   "--quiet", *extra, check=check)


def test_conditional_requests_match_lm_eval(text_model, requests_file, lm_eval_results, tmp_path):
    score(1, text_model, requests_file, tmp_path / "s.jsonl", "--keep-fields", "context")
    got = {r["id"]: r for r in read_jsonl(tmp_path / "s.jsonl")}
    worst = 0.0
    for rid, (ll, greedy, cont) in lm_eval_results.items():
        r = got[rid]
        assert r["n_tokens"] == len(cont), rid
        assert r["is_greedy"] == greedy, rid
        worst = max(worst, abs(r["loglik"] - ll))
        assert r["n_bytes"] == len(next(x for x in read_jsonl(requests_file) if x["id"] == rid)["continuation"]
                                   .encode()) or rid == "spaces"
    print(f"max |loglik - lm-eval| = {worst:.2e} over {len(lm_eval_results)} requests")
    assert worst <= 1e-4
    assert got["empty-continuation"]["n_tokens"] == 0 and got["empty-continuation"]["loglik"] == 0.0
    assert "is_greedy" not in got["plain"] and got["plain"]["n_tokens"] > 30
    assert got["q0c0"]["context"].startswith("Question 0")  # --keep-fields
    assert any(r["is_greedy"] is False for r in got.values() if "is_greedy" in r)


def test_shared_context_is_computed_once(text_model, requests_file, tmp_path):
    """The choices of a question share one copy of their context: fewer positions, the same numbers."""
    score(1, text_model, requests_file, tmp_path / "packed.jsonl")
    one_by_one = tmp_path / "alone.jsonl"
    score(1, text_model, requests_file, one_by_one, "--set", "score.share_context=false")
    a, b = read_jsonl(tmp_path / "packed.jsonl"), read_jsonl(one_by_one)
    assert [r["n_tokens"] for r in a] == [r["n_tokens"] for r in b]
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) <= 1e-4
    assert [x.get("is_greedy") for x in a] == [y.get("is_greedy") for y in b]
    # The packed run computes fewer real positions: each shared context once instead of four times.
    packed, alone = (json.load(open(f"{p}.summary.json"))["real_positions"] for p in (tmp_path / "packed.jsonl",
                                                                                      one_by_one))
    print(f"real positions: packed {packed}, one request at a time {alone}")
    assert packed < 0.7 * alone


@pytest.fixture(scope="module")
def one_rank_records(text_model, requests_file, tmp_path_factory):
    """The one-process records every layout must give."""
    out = tmp_path_factory.mktemp("one-rank") / "one.jsonl"
    score(1, text_model, requests_file, out, "--set", "score.micro_batches=4")
    return read_jsonl(out)


@pytest.mark.parametrize("n, pp", [(2, 2), (2, 1), (4, 2)])
def test_conditional_records_are_the_same_on_every_layout(text_model, requests_file, one_rank_records, tmp_path,
                                                          n, pp):
    score(n, text_model, requests_file, tmp_path / "many.jsonl", "--set", "score.micro_batches=4", pp=pp)
    a, b = one_rank_records, read_jsonl(tmp_path / "many.jsonl")
    assert [(r["id"], r["n_tokens"], r.get("is_greedy")) for r in a] == \
        [(r["id"], r["n_tokens"], r.get("is_greedy")) for r in b]
    worst = max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b))
    print(f"max |loglik difference| between 1 rank and {n} ranks (pp {pp}): {worst:.2e}")
    assert worst <= 1e-5


def test_bad_conditional_records(text_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "continuation": "b"}, {"context": "no continuation"}])
    p = score(1, text_model, bad, tmp_path / "o.jsonl", check=False)
    one_line_error(p, "bad.jsonl:2", "continuation")
    assert not os.path.exists(tmp_path / "o.jsonl")
    long = write_jsonl(tmp_path / "long.jsonl", [{"context": "a", "continuation": " word" * 60}])
    p = score(1, text_model, long, tmp_path / "o.jsonl", check=False)
    one_line_error(p, "long.jsonl:1", "more than the context window")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o.jsonl")]


def test_corpus_bytes_and_words(text_model, tmp_path):
    texts = ["one two three", "naïve café", "x\ny  z\t"]
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts] + [{"input_ids": [5, 6, 7]}])
    score(1, text_model, docs, tmp_path / "s.jsonl")
    recs = read_jsonl(tmp_path / "s.jsonl")
    assert [r["n_bytes"] for r in recs] == [len(t.encode()) for t in texts] + [None]
    s = json.load(open(f"{tmp_path / 's.jsonl'}.summary.json"))
    text_ll = sum(r["loglik"] for r in recs[:3])
    n_bytes = sum(len(t.encode()) for t in texts)
    assert s["bytes"] == n_bytes
    assert s["bits_per_byte"] == pytest.approx(-text_ll / n_bytes / np.log(2))
    assert s["byte_perplexity"] == pytest.approx(np.exp(-text_ll / n_bytes))
    assert s["word_perplexity"] == pytest.approx(np.exp(-text_ll / (3 + 2 + 4)))  # lm-eval counts "x y z ''"


def test_parquet_output_holds_the_new_columns(text_model, requests_file, tmp_path):
    import pyarrow.parquet as pq

    score(1, text_model, requests_file, tmp_path / "s.parquet", "--keep-fields", "context")
    score(1, text_model, requests_file, tmp_path / "s.jsonl", "--keep-fields", "context")
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    ref = read_jsonl(tmp_path / "s.jsonl")
    assert [r["is_greedy"] for r in table] == [r.get("is_greedy") for r in ref]
    assert [r["n_bytes"] for r in table] == [r["n_bytes"] for r in ref]
    assert [r["context"] for r in table] == [r.get("context") for r in ref]
