"""records.Journal in process: what a job has safely written, resuming after a kill, and the final output."""

import json
import math
import os

import numpy as np
import pytest

from hpc_llama.errors import HpcLlamaError
from hpc_llama.records import Journal

FINGERPRINT = {"model": "m-1", "inputs": [["docs.jsonl", 120, "abc"]], "options": {"context": 32, "shard": (0, 2)}}


def line(**rec):
    return json.dumps(rec) + "\n"


STEP1 = [line(index=0, id=7, n_tokens=2, loglik=-1.5, ppl=math.exp(0.75), token_logprobs=[-1.0, -0.5]),
         line(index=1, id=None, n_tokens=0, loglik=0.0, ppl=None, token_logprobs=[])]
STEP2 = [line(index=2, id=9, n_tokens=1, loglik=-0.25, ppl=math.exp(0.25), token_logprobs=[-0.25])]
COLUMNS = {"index": "int", "id": "id", "n_tokens": "int", "loglik": "float", "ppl": "float",
           "token_logprobs": "float_list"}


def saved(journal):
    with open(journal.path) as f:
        return json.load(f)


def test_a_fresh_journal_is_an_empty_partial_file_and_a_saved_state(tmp_path):
    out = str(tmp_path / "s.jsonl")
    j = Journal(out, FINGERPRINT, overwrite=False)
    assert (j.partial, j.path) == (out + ".partial", out + ".journal.json")
    assert not j.resumed and j.documents_done == 0
    assert open(j.partial, "rb").read() == b""
    # Saved as JSON reads it back: the tuple is a list.
    assert saved(j) == {"fingerprint": {**FINGERPRINT, "options": {"context": 32, "shard": [0, 2]}},
                        "state": {"documents": 0, "bytes": 0, "steps": 0, "stats": {}}}
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl.journal.json", "s.jsonl.partial"]


def test_commit_appends_a_step_and_records_it_on_disk(tmp_path):
    j = Journal(str(tmp_path / "s.jsonl"), FINGERPRINT, overwrite=False)
    j.commit(STEP1, {"tokens": 2, "loglik": -1.5})
    j.commit(STEP2, {"tokens": 1, "loglik": -0.25})
    data = "".join(STEP1 + STEP2).encode()
    assert open(j.partial, "rb").read() == data
    state = {"documents": 3, "bytes": len(data), "steps": 2, "stats": {"tokens": 3, "loglik": -1.75}}
    assert j.state == state and j.documents_done == 3
    assert saved(j)["state"] == state  # on disk already, as a restarted job will read it
    assert not os.path.exists(j.path + ".tmp")


def test_reopened_with_the_same_fingerprint_it_resumes_without_the_half_written_step(tmp_path):
    out = str(tmp_path / "s.jsonl")
    first = Journal(out, FINGERPRINT, overwrite=False)
    first.commit(STEP1, {"tokens": 2})
    whole = open(first.partial, "rb").read()
    with open(first.partial, "ab") as f:
        f.write(STEP2[0][:20].encode())  # killed while writing step 2: in the file, not in the journal
    again = Journal(out, json.loads(json.dumps(FINGERPRINT)), overwrite=False)  # as a rerun builds it: lists
    assert again.resumed and again.documents_done == 2 and again.state["steps"] == 1
    assert open(again.partial, "rb").read() == whole
    again.commit(STEP2, {"tokens": 1})
    assert open(again.partial, "rb").read() == "".join(STEP1 + STEP2).encode()
    assert again.state["stats"] == {"tokens": 3}


@pytest.mark.parametrize("key, value", [("model", "m-2"), ("inputs", [["docs.jsonl", 121, "abd"]]),
                                        ("options", {"context": 64, "shard": [0, 2]})])
def test_a_different_job_is_refused_naming_what_differs(tmp_path, key, value):
    out = str(tmp_path / "s.jsonl")
    j = Journal(out, FINGERPRINT, overwrite=False)
    j.commit(STEP1, {})
    before = open(j.partial, "rb").read(), open(j.path, "rb").read()
    with pytest.raises(HpcLlamaError) as e:
        Journal(out, {**FINGERPRINT, key: value}, overwrite=False)
    assert str(e.value) == (f"{out}.partial belongs to a job with a different {key}: refusing to mix results "
                            f"(delete s.jsonl.partial and s.jsonl.journal.json to start over)")
    assert (open(j.partial, "rb").read(), open(j.path, "rb").read()) == before


def test_a_key_only_the_saved_journal_has_counts_too(tmp_path):
    out = str(tmp_path / "s.jsonl")
    Journal(out, {**FINGERPRINT, "shard": [1, 3]}, overwrite=False).commit(STEP1, {})
    with pytest.raises(HpcLlamaError, match="belongs to a job with a different shard"):
        Journal(out, FINGERPRINT, overwrite=False)


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(HpcLlamaError, match=r"s\.jsonl already exists \(use --overwrite to replace it\)"):
        Journal(str(out), FINGERPRINT, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl"]
    j = Journal(str(out), FINGERPRINT, overwrite=True)
    j.commit(STEP2, {})
    j.finish("jsonl", COLUMNS)
    assert out.read_text() == STEP2[0]
    with pytest.raises(HpcLlamaError, match="output directory does not exist"):
        Journal(str(tmp_path / "no" / "s.jsonl"), FINGERPRINT, overwrite=False)


def _finished(tmp_path, name, fmt, steps):
    out = str(tmp_path / name)
    j = Journal(out, FINGERPRINT, overwrite=False)
    for step in steps:
        j.commit(step, {})
    j.finish(fmt, COLUMNS)
    assert sorted(os.listdir(tmp_path)) == [name]  # no partial, journal or temporary file left
    return out


def test_finish_jsonl_is_the_partial_file_itself(tmp_path):
    out = _finished(tmp_path, "s.jsonl", "jsonl", [STEP1, STEP2])
    assert open(out, "rb").read() == "".join(STEP1 + STEP2).encode()


def test_finish_parquet_holds_the_records_with_typed_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(x) for x in STEP1 + STEP2]
    table = pq.read_table(_finished(tmp_path, "s.parquet", "parquet", [STEP1, STEP2]))
    assert table.column_names == list(COLUMNS)
    assert table.schema.field("id").type == pa.int64()  # integer ids (and missing ones) stay integers
    assert table.schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert table.to_pylist() == records  # the log-probabilities are exact in float32 (-1, -0.5, -0.25)


def test_finish_parquet_writes_other_ids_as_strings(tmp_path):
    import pyarrow.parquet as pq

    steps = [[line(index=0, id="a", n_tokens=1, loglik=-0.5, ppl=None, token_logprobs=[-0.5]),
              line(index=1, id=3, n_tokens=1, loglik=-0.5, ppl=None, token_logprobs=[-0.5]),
              line(index=2, id={"k": 1}, n_tokens=1, loglik=-0.5, ppl=None, token_logprobs=[-0.5]),
              line(index=3, id=None, n_tokens=1, loglik=-0.5, ppl=None, token_logprobs=[-0.5])]]
    table = pq.read_table(_finished(tmp_path, "s.parquet", "parquet", steps))
    # Strings as they are, anything else as its JSON text, a missing id as null.
    assert table.column("id").to_pylist() == ["a", "3", '{"k": 1}', None]


def test_finish_hdf5_holds_the_records_column_by_column(tmp_path):
    import h5py

    with h5py.File(_finished(tmp_path, "s.h5", "hdf5", [STEP1, STEP2])) as f:
        assert f.attrs["format"] == "hpc_llama.records"
        assert f["index"][:].tolist() == [0, 1, 2] and f["n_tokens"][:].tolist() == [2, 0, 1]
        assert f["loglik"][:].tolist() == [-1.5, 0.0, -0.25]
        missing = np.iinfo(np.int64).min  # a missing integer id: the smallest int64, named in an attribute
        assert f["id"][:].tolist() == [7, missing, 9] and f["id"].attrs["missing"] == missing
        ppl = f["ppl"][:]
        assert ppl[0] == math.exp(0.75) and np.isnan(ppl[1]) and ppl[2] == math.exp(0.25)
        # One flat list; record k's part is [offsets[k], offsets[k + 1]).
        assert f["token_logprobs"][:].tolist() == [-1.0, -0.5, -0.25]
        assert f["token_logprobs_offsets"][:].tolist() == [0, 2, 2, 3]
