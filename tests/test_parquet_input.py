"""Parquet inputs end to end: `score` and `generate` read a Parquet file's rows as they read JSONL lines, and
write the same bytes; a killed score over Parquet resumes to them; a file that is not Parquet is one line."""

import json
import os

import numpy as np
import pytest

from helpers.files import write_jsonl
from helpers.run import one_line_error, run_job


def write_parquet(path, records, row_group_size):
    """The records as Parquet: a column per field, null where a record lacks it; small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.table({k: [r.get(k) for r in records] for k in names}), str(path),
                   row_group_size=row_group_size)
    return str(path)


def both(tmp_path, records, row_group_size=5):
    """The same records as JSONL and as Parquet."""
    return (write_jsonl(tmp_path / "in.jsonl", records),
            write_parquet(tmp_path / "in.parquet", records, row_group_size))


def score_records():
    """Texts of many lengths, token ids, questions whose choices share a context, kept fields, missing ids."""
    rng = np.random.default_rng(5)
    words = "def return import class self lambda yield value None True list dict the of and to in is".split()
    recs = []
    for i in range(24):
        recs.append({"id": f"t{i}", "text": " ".join(rng.choice(words, int(rng.integers(0, 60)))), "src": "code",
                     "n": i})
        if i % 4 == 1:
            recs.append({"id": f"ids{i}", "input_ids": rng.integers(0, 320, int(rng.integers(1, 50))).tolist()})
        if i % 6 == 2:
            ctx = f"Question {i}: " + " ".join(rng.choice(words, 8)) + "\nAnswer:"
            recs += [{"id": f"q{i}c{c}", "context": ctx, "continuation": " " + w, "src": "qa"}
                     for c, w in enumerate(rng.choice(words, 3))]
    recs.append({"text": "no id, and unicode: naïve café — 日本語 🚀"})
    return recs


def test_score_of_parquet_is_byte_identical_to_jsonl(text_model, tmp_path):
    jl, pq = both(tmp_path, score_records())
    common = ["score", "--model", text_model, "--context", "32", "--keep-fields", "src,n", "--quiet",
              "--set", "score.chunk_docs=7"]
    run_job(1, *common, "--input", jl, "--output", tmp_path / "j.jsonl")
    run_job(1, *common, "--input", pq, "--output", tmp_path / "p.jsonl")
    assert (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "j.jsonl").read_bytes()
    assert json.load(open(tmp_path / "p.jsonl.summary.json"))["documents"] == len(score_records())


def test_generate_reads_prompts_from_parquet(text_model, tmp_path):
    prompts = [{"id": "p0", "prompt": "def main("}, {"id": "p1", "prompt": "import os\nimport sys\n\nclass"},
               {"id": "p2", "input_ids": [1, 40, 41, 42]}, {"prompt": "for i in range(10):"}]
    jl, pq = both(tmp_path, prompts, row_group_size=2)
    common = ["generate", "--model", text_model, "--max-new-tokens", "6", "--quiet"]
    run_job(1, *common, "--input", jl, "--output", tmp_path / "j.jsonl")
    run_job(1, *common, "--input", pq, "--output", tmp_path / "p.jsonl")
    assert (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "j.jsonl").read_bytes()
    assert [json.loads(line)["id"] for line in open(tmp_path / "p.jsonl")] == ["p0", "p1", "p2", None]


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "JSON lines, named .parquet"}\n', "in.parquet: not a readable Parquet file (Parquet magic bytes"),
    (None, "in.parquet row 3: no 'text' field (and no input_ids)"),
])
def test_a_bad_parquet_input_is_one_line_and_writes_nothing(text_model, tmp_path, content, needle):
    path = tmp_path / "in.parquet"
    if content is None:
        write_parquet(path, [{"text": "fine"}, {"text": "fine"}, {"text": None}], 2)  # a null: no text to score
    else:
        path.write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    one_line_error(run_job(1, "score", "--model", text_model, "--input", path, "--output", tmp_path / "o.jsonl",
                           check=False), needle)
    assert sorted(os.listdir(tmp_path)) == before
