"""`score --shard I/N` with `merge`, and `score --ledger`, as one-rank runs without Slurm.

test_slurm.py runs the same through job arrays and scheduled jobs; here each
task is a plain `hpc-llama` run, so what is checked is the jobs' own logic.
"""

import json
import os
import shutil

import numpy as np
import pytest
import xxhash

from helpers.files import read_jsonl, write_jsonl
from helpers.run import one_line_error, run_cli

# 11 documents in steps of 2 (chunk_docs): 6 steps, of 2, 2, 2, 2, 2 and 1 documents. Three shards take
# 2 steps each: documents 0-3, 4-7 and 8-10.
N_DOCS, CHUNK = 11, 2
BLOCKS = [range(0, 4), range(4, 8), range(8, 11)]


def score(model, docs, out, *extra, check=True):
    return run_cli("score", "--model", model, "--input", docs, "--output", out, "--context", 16,
                   "--set", f"score.chunk_docs={CHUNK}", "--quiet", *extra, check=check)


def part(out, i, n=3):
    return f"{out}.part-{i:05d}-of-{n:05d}.jsonl"


def token_docs(path, seed):
    rng = np.random.default_rng(seed)
    return write_jsonl(path, [{"id": f"d{i}", "input_ids": rng.integers(0, 320, int(n)).tolist()}
                              for i, n in enumerate(rng.integers(1, 40, N_DOCS))])


@pytest.fixture(scope="module")
def sharded(hf_dirs, tmp_path_factory):
    """Token-id documents scored by one run, and in three parts (kept aside, each test merges a copy)."""
    d = tmp_path_factory.mktemp("shards")
    docs = token_docs(d / "docs.jsonl", seed=5)
    model = hf_dirs["llama3"]
    score(model, docs, d / "one.jsonl")
    for i in range(3):
        score(model, docs, d / "parts.jsonl", "--shard", f"{i}/3")
    return {"dir": d, "docs": docs, "model": model, "one": d / "one.jsonl", "parts": str(d / "parts.jsonl")}


def copy_parts(sharded, out, which=(0, 1, 2)):
    for i in which:
        for suffix in ("", ".summary.json"):
            shutil.copy(part(sharded["parts"], i) + suffix, part(out, i) + suffix)


def merge(out, *extra):
    return run_cli("merge", "--output", out, *extra)


def test_parts_merge_into_the_bytes_of_one_run(sharded, tmp_path):
    for i, block in enumerate(BLOCKS):
        assert [r["index"] for r in read_jsonl(part(sharded["parts"], i))] == list(block)
    out = str(tmp_path / "merged.jsonl")
    copy_parts(sharded, out)
    p = merge(out)
    assert p.returncode == 0, p.stderr
    assert open(out, "rb").read() == sharded["one"].read_bytes()
    summary = json.load(open(out + ".summary.json"))
    one = json.load(open(str(sharded["one"]) + ".summary.json"))
    assert [m["documents"] for m in summary["merged_from"]] == [4, 4, 3]
    assert (summary["documents"], summary["tokens"]) == (N_DOCS, one["tokens"])
    assert sorted(os.listdir(tmp_path)) == ["merged.jsonl", "merged.jsonl.summary.json"]  # parts removed


def _rescore_part_1(sharded, out, *extra, docs=None, model=None):
    score(model or sharded["model"], docs or sharded["docs"], out, "--shard", "1/3", *extra)
    copy_parts(sharded, out, (0, 2))


REFUSALS = [
    # gaps
    ("missing", "part 1 of 3 is missing: merged.jsonl.part-00001-of-00003.jsonl"),
    ("unfinished", "part 1 of 3 is missing: merged.jsonl.part-00001-of-00003.jsonl (still being written: its task "
                   "did not finish)"),
    ("no summary", "part 1 of 3 has no readable summary (merged.jsonl.part-00001-of-00003.jsonl.summary.json)"),
    # Part 1 is documents 4-7; its summary edited to claim 5-8.
    ("shifted", "part 1 covers documents 5..8, expected 4..7: refusing to merge a gap"),
    # overlaps
    ("a part twice", "merged.jsonl.part-00001-of-00003.jsonl says it is part 0 of 3"),
    ("other count", "from arrays of different sizes ([2, 3]): give --parts"),
    # mismatches
    ("other model", "part 1 was scored with a different model than part 0: refusing to merge"),
    ("other input", "part 1 was scored with a different inputs than part 0: refusing to merge"),
    ("other context", "part 1 was scored with a different context or stride than part 0: refusing to merge"),
    # Other steps (chunk_docs) batch documents differently, which can move a float's last digit.
    ("other steps", "part 1 was scored with a different score section or dtype than part 0: refusing to merge"),
    ("other options", "part 1 was scored with a different score section or dtype than part 0: refusing to merge"),
]


@pytest.mark.parametrize("damage, message", REFUSALS, ids=[damage for damage, _ in REFUSALS])
def test_merge_refuses_gaps_overlaps_and_mismatches(sharded, hf_dirs, tmp_path, damage, message):
    out = str(tmp_path / "merged.jsonl")
    if damage == "other steps":
        _rescore_part_1(sharded, out, "--set", "score.chunk_docs=3")
    elif damage == "other model":
        _rescore_part_1(sharded, out, model=hf_dirs["llama2"])
    elif damage == "other input":
        _rescore_part_1(sharded, out, docs=token_docs(tmp_path / "other.jsonl", seed=6))
    elif damage == "other context":
        _rescore_part_1(sharded, out, "--context", 8)
    elif damage == "other options":
        _rescore_part_1(sharded, out, "--token-logprobs")
    else:
        copy_parts(sharded, out)
        if damage == "missing":
            os.remove(part(out, 1))
        elif damage == "unfinished":
            os.rename(part(out, 1), part(out, 1) + ".partial")
        elif damage == "no summary":
            os.remove(part(out, 1) + ".summary.json")
        elif damage == "a part twice":
            for suffix in ("", ".summary.json"):
                shutil.copy(part(out, 0) + suffix, part(out, 1) + suffix)
        elif damage == "shifted":  # a summary that claims other documents than its place
            with open(part(out, 1) + ".summary.json") as f:
                s = json.load(f)
            s["shard"]["first"] += 1
            with open(part(out, 1) + ".summary.json", "w") as f:
                json.dump(s, f)
        elif damage == "other count":
            shutil.copy(part(out, 0), part(out, 0, n=2))
    before = sorted(os.listdir(tmp_path))
    one_line_error(merge(out), message)
    assert sorted(os.listdir(tmp_path)) == before  # no OUT, and every part still there


# --- scheduled scoring: a ledger of content checksums ------------------------------------------------


def content_key(text):
    """The ledger's key, by its definition: xxh3-128 of "t:" and the text's UTF-8 bytes."""
    return xxhash.xxh3_128(b"t:" + text.encode("utf-8")).hexdigest()


def test_ledger_scores_only_content_it_has_not_seen(text_model, tmp_path):
    incoming, outdir = tmp_path / "incoming", tmp_path / "scores"
    incoming.mkdir()
    outdir.mkdir()
    ledger = outdir / "ledger.tsv"
    a = [{"id": f"a{i}", "text": "alpha " * (i + 1)} for i in range(4)]
    write_jsonl(incoming / "a.jsonl", a)

    def period(name):
        out = outdir / f"scores-{name}.jsonl"
        p = run_cli("score", "--model", text_model, "--input", incoming / "*.jsonl", "--output", out,
                    "--ledger", ledger, "--context", 16, check=True)
        return out, p.stderr

    out1, _ = period("1")
    assert [r["id"] for r in read_jsonl(out1)] == ["a0", "a1", "a2", "a3"]
    assert ledger.read_text().splitlines() == [f"{content_key(d['text'])}\tscores-1.jsonl" for d in a]
    # New documents arrive: b1 is a1's text under another id, b3 repeats b0 in the same period.
    b = [{"id": "b0", "text": "beta"}, {"id": "b1", "text": a[1]["text"]}, {"id": "b2", "text": "gamma"},
         {"id": "b3", "text": "beta"}]
    write_jsonl(incoming / "b.jsonl", b)
    out2, _ = period("2")
    assert [r["id"] for r in read_jsonl(out2)] == ["b0", "b2"]
    assert ledger.read_text().splitlines()[4:] == [f"{content_key(t)}\tscores-2.jsonl" for t in ("beta", "gamma")]
    assert not [f for f in os.listdir(outdir) if f.endswith((".partial", ".journal.json"))]
    # The same period again: OUT is there, so nothing is scored and nothing changes.
    before = out2.read_bytes(), ledger.read_bytes(), sorted(os.listdir(outdir))
    _, log = period("2")
    assert "scores-2.jsonl exists: this period is scored already, nothing to do" in log
    assert (out2.read_bytes(), ledger.read_bytes(), sorted(os.listdir(outdir))) == before
    # A period with nothing new: an empty OUT, the ledger as it was.
    out3, log = period("3")
    assert out3.read_bytes() == b"" and ledger.read_bytes() == before[1]
    assert "no new documents: wrote an empty" in log
