"""Document inputs (hpc_llama.documents), in process: order, kinds, validation, skipping, chunking, scanning."""

import json
import os

import pytest
import xxhash

from hpc_llama.documents import Document, Fields, chunks, expand_inputs, read_documents, scan_inputs
from hpc_llama.errors import HpcLlamaError


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return str(path)


def jsonl(path, *records):
    """A JSONL file; None stands for a blank line."""
    return write(path, "".join("\n" if r is None else json.dumps(r) + "\n" for r in records))


def docs_of(path, fields=Fields(), vocab_size=None, **kw):
    return list(read_documents(expand_inputs([str(path)]), fields, vocab_size, **kw))


# --- which files, in which order ------------------------------------------------------------


def test_files_in_the_order_given_globs_and_directories_sorted_by_path(tmp_path):
    first = jsonl(tmp_path / "first.jsonl", {"text": "j0"}, None, {"text": "j1"})
    texts = tmp_path / "texts"
    for name in ("z.txt", "b.txt", "sub/c.txt", "a.txt", "notes.md"):  # written out of order; .md is not text input
        write(texts / name, name)
    for name in ("y.jsonl", "x.jsonl"):
        jsonl(tmp_path / "g" / name, {"text": name})
    files = expand_inputs([first, str(texts), str(tmp_path / "g" / "*.jsonl")])
    assert [os.path.relpath(f.path, tmp_path) for f in files] == [
        "first.jsonl", "texts/a.txt", "texts/b.txt", "texts/sub/c.txt", "texts/z.txt", "g/x.jsonl", "g/y.jsonl"]
    assert [f.kind for f in files] == ["jsonl", "text", "text", "text", "text", "jsonl", "jsonl"]
    assert [f.size for f in files] == [os.path.getsize(f.path) for f in files]
    docs = list(read_documents(files))
    # Numbered 0.. across every file; the JSONL's blank line takes no number but keeps its line count.
    assert [d.index for d in docs] == list(range(8))
    assert [d.text for d in docs] == ["j0", "j1", "a.txt", "b.txt", "sub/c.txt", "z.txt", "x.jsonl", "y.jsonl"]
    assert [d.where for d in docs[:3]] == [f"{first}:1", f"{first}:3", str(texts / "a.txt")]


@pytest.mark.parametrize("spec, message", [
    ("missing.jsonl", "missing.jsonl: no such file or directory"),
    ("*.nothing", "*.nothing: no files match"),
    ("empty_dir", "empty_dir: directory holds no .txt files"),
])
def test_inputs_that_name_nothing_are_refused(tmp_path, spec, message):
    (tmp_path / "empty_dir").mkdir()
    write(tmp_path / "empty_dir" / "data.jsonl", "{}\n")  # a directory is read for .txt files only
    with pytest.raises(HpcLlamaError, match=message.replace("*", r"\*").replace(".", r"\.")):
        expand_inputs([str(tmp_path / spec)])


def test_text_file_is_one_document_or_one_per_line(tmp_path):
    path = write(tmp_path / "p.txt", "first line\r\n\n  \nsecond line\nlast, no newline")
    whole = docs_of(path)
    assert [(d.index, d.id, d.text, d.where) for d in whole] == [
        (0, path, "first line\r\n\n  \nsecond line\nlast, no newline", path)]
    lines = docs_of(path, Fields(text_lines=True))
    # Blank (and whitespace-only) lines are skipped; ids and places are FILE:LINE; line ends are dropped.
    assert [(d.index, d.id, d.text) for d in lines] == [
        (0, f"{path}:1", "first line"), (1, f"{path}:4", "second line"), (2, f"{path}:5", "last, no newline")]


def test_fields_ids_and_task_records(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"body": "hello", "name": "n1"}, {"body": "no id"})
    assert [(d.id, d.text) for d in docs_of(path, Fields(text="body", id="name"))] == [("n1", "hello"), (None, "no id")]
    task = jsonl(tmp_path / "t.jsonl", {"prompt": "Q?", "answer": "A."})
    (doc,) = docs_of(task, Fields(text="prompt", response="answer"))
    assert (doc.text, doc.response, doc.input_ids) == ("Q?", "A.", None)


# --- validation: every error names FILE:LINE ------------------------------------------------


def test_token_ids_are_checked_against_the_vocabulary(tmp_path):
    path = jsonl(tmp_path / "ids.jsonl", {"id": 7, "input_ids": [0, 5, 9]}, {"input_ids": []})
    docs = docs_of(path, vocab_size=10)
    assert [(d.id, d.input_ids, d.text) for d in docs] == [(7, (0, 5, 9), None), (None, (), None)]
    # Without a vocabulary size nothing bounds the ids.
    assert docs_of(jsonl(tmp_path / "big.jsonl", {"input_ids": [10 ** 6]}))[0].input_ids == (10 ** 6,)


@pytest.mark.parametrize("line, message", [
    (b'{"input_ids": [1, 10]}', "input_ids contains 10, outside the vocabulary (0..9)"),
    (b'{"input_ids": [-1]}', "input_ids contains -1, outside the vocabulary (0..9)"),
    (b'{"input_ids": [1, true]}', "input_ids must be a list of integers"),
    (b'{"input_ids": [1.0]}', "input_ids must be a list of integers"),
    (b'{"input_ids": "1 2"}', "input_ids must be a list of integers"),
    (b'{"text": "\xff"}', "not valid UTF-8 (byte 10)"),  # `{"text": "` is 10 bytes
    (b'{"text": oops}', "invalid JSON (Expecting value at column 10)"),  # o is the 10th character
    (b'[1, 2]', "expected a JSON object, got list"),
    (b'"text"', "expected a JSON object, got str"),
    (b'{"body": "x"}', "no 'text' field (and no input_ids)"),
    (b'{"text": 3}', "field 'text' is not a string"),
])
def test_a_bad_document_is_named_by_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", b'{"text": "fine"}\n\n' + line + b"\n")  # line 3: after a blank line
    with pytest.raises(HpcLlamaError) as e:
        docs_of(path, vocab_size=10)
    assert str(e.value) == f"{path}:3: {message}"


def test_task_record_without_its_response_is_refused(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {"prompt": "Q?"})
    with pytest.raises(HpcLlamaError, match=r"t\.jsonl:1: no 'answer' field \(a string\) to go with 'prompt'"):
        docs_of(path, Fields(text="prompt", response="answer"))


def test_bad_utf8_in_a_text_file_names_the_file_or_the_line(tmp_path):
    path = write(tmp_path / "p.txt", b"ok\nbad \xc3\n")
    with pytest.raises(HpcLlamaError, match=r"p\.txt: not valid UTF-8 \(byte 7\)"):  # o k \n b a d space = 7 bytes
        docs_of(path)
    with pytest.raises(HpcLlamaError, match=r"p\.txt:2: not valid UTF-8 \(byte 4\)"):  # b a d space = 4 bytes
        docs_of(path, Fields(text_lines=True))


# --- skipping: start and on_error -----------------------------------------------------------


@pytest.fixture
def two_files(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"text": "a0"}, None, {"text": "a1"}, {"text": "a2"})
    b = write(tmp_path / "b.txt", "b0\n\nb1\n")
    return expand_inputs([a, b])


@pytest.mark.parametrize("fields", [Fields(), Fields(text_lines=True)])
def test_start_gives_the_tail_of_the_same_numbering(two_files, fields):
    whole = list(read_documents(two_files, fields))
    assert len(whole) == (5 if fields.text_lines else 4)  # a0 a1 a2, then b.txt whole, or as b0 and b1
    for start in range(len(whole) + 1):
        assert list(read_documents(two_files, fields, start=start)) == whole[start:]


def test_documents_before_start_are_not_parsed(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": oops}\n\xff\xfe\n{"text": "third"}\n')
    (doc,) = docs_of(path, start=2)  # lines 1 and 2 would fail if they were read as documents
    assert (doc.index, doc.text, doc.where) == (2, "third", f"{path}:3")


def test_on_error_skips_a_bad_document_and_keeps_its_number(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": "zero"}\n{"text": oops}\n{"text": "two"}\n[3]\n{"text": "four"}\n')
    errors = []
    docs = docs_of(path, on_error=errors.append)
    assert [(d.index, d.text) for d in docs] == [(0, "zero"), (2, "two"), (4, "four")]
    assert [str(e).split(": ", 1)[0] for e in errors] == [f"{path}:2", f"{path}:4"]
    assert all(isinstance(e, HpcLlamaError) for e in errors)


# --- chunks ---------------------------------------------------------------------------------


def _doc(i, text=None, ids=None):
    return Document(i, i, text, ids, f"x:{i}")


def test_a_chunk_ends_at_max_docs_or_once_it_holds_max_chars():
    sizes = [3, 3, 3, 10, 1, 1, 1, 2]
    docs = [_doc(i, text="x" * n) if i % 2 else _doc(i, ids=tuple(range(n))) for i, n in enumerate(sizes)]
    got = [[d.index for d in c] for c in chunks(iter(docs), max_docs=3, max_chars=8)]
    # 3+3+3 = 9 reaches 8 after three; 10 alone reaches it; 1+1+1 is three documents; 2 is what is left.
    # Token ids count as characters: the even documents are ids, the odd ones text.
    assert got == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert list(chunks(iter([]), 3, 8)) == []


def test_chunks_after_a_boundary_do_not_depend_on_where_the_run_started(tmp_path):
    texts = [f"doc {i} " + "w" * (i * 7 % 23) for i in range(40)]
    files = expand_inputs([jsonl(tmp_path / "d.jsonl", *({"text": t} for t in texts))])
    whole = [[d.index for d in c] for c in chunks(read_documents(files), 5, 60)]
    assert sum(map(len, whole)) == 40 and len(whole) > 8
    boundary = 0
    for k, chunk in enumerate(whole):
        # A run resumed at this boundary cuts the same chunks from here on.
        resumed = [[d.index for d in c] for c in chunks(read_documents(files, start=boundary), 5, 60)]
        assert resumed == whole[k:]
        boundary += len(chunk)


# --- scan_inputs ----------------------------------------------------------------------------


def test_scan_counts_documents_and_checksums_every_file(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"text": "one"}, None, {"input_ids": [1, 2]}, {"text": "three"})
    b = write(tmp_path / "b.txt", "a whole file\nof text\n")
    files, with_text = scan_inputs(expand_inputs([a, b]), Fields(), 10, True)
    assert [(f.path, f.kind, f.documents) for f in files] == [(a, "jsonl", 3), (b, "text", 1)]
    assert [f.xxh3 for f in files] == [xxhash.xxh3_64(open(p, "rb").read()).hexdigest() for p in (a, b)]
    assert [f.size for f in files] == [os.path.getsize(a), os.path.getsize(b)]
    assert with_text == 3  # "one", "three" and the text file; the ids document has no text


def test_scan_refuses_text_without_a_tokenizer_and_inputs_without_documents(tmp_path):
    ids = jsonl(tmp_path / "ids.jsonl", {"input_ids": [1]})
    text = jsonl(tmp_path / "text.jsonl", {"input_ids": [1]}, {"text": "words"})
    assert scan_inputs(expand_inputs([ids]), Fields(), 10, False)[1] == 0
    with pytest.raises(HpcLlamaError, match=r"text\.jsonl:2: the document is text but the checkpoint has no "
                                            r"tokenizer\.json"):
        scan_inputs(expand_inputs([text]), Fields(), 10, False)
    blank = [write(tmp_path / "blank.jsonl", "\n  \n"), write(tmp_path / "empty.txt", "")]
    with pytest.raises(HpcLlamaError) as e:
        scan_inputs(expand_inputs([blank[0]]), Fields(), 10, True)
    assert str(e.value) == f"no documents in {blank[0]}"
    # An empty text file is one (empty) document: it is there to be scored, and counts.
    assert scan_inputs(expand_inputs(blank), Fields(), 10, True)[0][1].documents == 1


# --- Parquet: a row is a record, as a JSONL line is -------------------------------------------


def parquet(path, records, row_group_size=None, **columns):
    """A Parquet file of these records: a column per field (first seen first), null where a record lacks it.
    `columns` gives a column as an Arrow array instead (a type the records cannot say)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(k for r in records for k in r))
    table = pa.table({**{k: [r.get(k) for r in records] for k in names}, **columns})
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def same_documents(a, b):
    """Document sequences equal in everything but `where` (FILE:LINE against FILE row N)."""
    strip = [(d.index, d.id, d.text, d.input_ids, d.response, d.context, d.keep) for d in a]
    assert strip == [(d.index, d.id, d.text, d.input_ids, d.response, d.context, d.keep) for d in b]


SCORE_RECORDS = [
    {"id": "a", "text": "hello world", "src": "web", "n": 1, "meta": {"lang": "en", "tags": ["x", "y"]}},
    {"id": "b", "input_ids": [1, 2, 3], "n": 2},
    {"id": "c", "context": "Q: 2 + 2?\nA:", "continuation": " 4", "src": "qa", "meta": {"lang": "en", "tags": []}},
    {"id": "d", "context": "Q: 2 + 2?\nA:", "continuation": " 5", "src": "qa"},
    {"text": "no id, and unicode: naïve café — 日本語 🚀", "n": 5},
    {"id": "f", "text": "", "input_ids": None, "src": None},  # a null is an absent field
    {"id": "g", "input_ids": []},
]


@pytest.mark.parametrize("fields, records", [
    (Fields(conditional=True, keep=("src", "n", "meta", "absent")), SCORE_RECORDS),
    (Fields(text="body", id="name"), [{"body": "x", "name": 1}, {"body": "y"}, {"body": "z", "name": 3}]),
    (Fields("prompt", "id", text_lines=True), [{"id": "p0", "prompt": "def main("}, {"input_ids": [5, 6]}]),
    (Fields(text="prompt", response="answer"), [{"prompt": "Q?", "answer": "A."}, {"prompt": "Q2", "answer": ""}]),
])
def test_parquet_rows_give_the_documents_the_same_jsonl_lines_give(tmp_path, fields, records):
    as_jsonl = docs_of(jsonl(tmp_path / "d.jsonl", *({k: v for k, v in r.items() if v is not None}
                                                    for r in records)), fields, vocab_size=10)
    path = parquet(tmp_path / "d.parquet", records)
    as_parquet = docs_of(path, fields, vocab_size=10)
    same_documents(as_parquet, as_jsonl)
    assert [d.where for d in as_parquet] == [f"{path} row {i}" for i in range(1, len(records) + 1)]


def test_parquet_files_are_read_by_suffix_among_other_inputs(tmp_path):
    a = parquet(tmp_path / "a.parquet", [{"text": "p0"}, {"text": "p1"}])
    b = parquet(tmp_path / "g" / "b.pq", [{"text": "q0"}])
    c = jsonl(tmp_path / "g" / "c.jsonl", {"text": "j0"})
    files = expand_inputs([a, str(tmp_path / "g" / "*")])
    assert [(f.kind, f.size) for f in files] == [("parquet", os.path.getsize(a)), ("parquet", os.path.getsize(b)),
                                                 ("jsonl", os.path.getsize(c))]
    docs = list(read_documents(files))
    assert [(d.index, d.text, d.where) for d in docs] == [(0, "p0", f"{a} row 1"), (1, "p1", f"{a} row 2"),
                                                          (2, "q0", f"{b} row 1"), (3, "j0", f"{c}:1")]
    files, with_text = scan_inputs(files, Fields(), 10, True)
    assert [f.documents for f in files] == [2, 1, 1] and with_text == 4
    assert files[0].xxh3 == xxhash.xxh3_64(open(a, "rb").read()).hexdigest()


@pytest.mark.parametrize("group", [1, 3, 7, 100])
def test_parquet_start_anywhere_in_any_row_group(tmp_path, group):
    records = [{"id": i, "text": f"row {i}"} if i % 3 else {"id": i, "input_ids": [i]} for i in range(20)]
    files = expand_inputs([parquet(tmp_path / "d.parquet", records, row_group_size=group),
                           jsonl(tmp_path / "e.jsonl", {"text": "last"})])
    whole = list(read_documents(files))
    assert [d.id for d in whole[:20]] == list(range(20)) and whole[20].text == "last"
    for start in range(len(whole) + 1):
        assert list(read_documents(files, start=start)) == whole[start:]
    # Chunks cut from a boundary are the ones the whole run cuts from there.
    cut = [[d.index for d in c] for c in chunks(read_documents(files), 4, 12)]
    boundary = 0
    for k, chunk in enumerate(cut):
        assert [[d.index for d in c] for c in chunks(read_documents(files, start=boundary), 4, 12)] == cut[k:]
        boundary += len(chunk)


def _corrupt_row_group(path, g):
    """Overwrite the page header of row group g's first column: decoding that group fails."""
    import pyarrow.parquet as pq

    offset = pq.ParquetFile(path).metadata.row_group(g).column(0).data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)


def test_parquet_rows_before_start_are_not_read(tmp_path):
    # Rows 1-5 (the first row group) cannot even be decoded, and rows 6-7 are bad records; from row 8 on, fine.
    records = [{"text": f"row {i}"} for i in range(5)] + [{"text": None}, {"text": None}] + \
              [{"text": f"row {i}"} for i in range(7, 10)]
    path = parquet(tmp_path / "d.parquet", records, row_group_size=5)
    _corrupt_row_group(path, 0)
    docs = docs_of(path, start=7)
    assert [(d.index, d.text, d.where) for d in docs] == [(i, f"row {i}", f"{path} row {i + 1}") for i in (7, 8, 9)]
    with pytest.raises(HpcLlamaError, match=r"d\.parquet row 6: no 'text' field"):
        docs_of(path, start=5)
    with pytest.raises(HpcLlamaError) as e:
        docs_of(path)
    assert str(e.value).startswith(f"{path}: row group 0 cannot be read from row 1 on (")


def test_parquet_bad_row_is_skipped_with_on_error_and_keeps_its_number(tmp_path):
    path = parquet(tmp_path / "d.parquet", [{"text": "zero"}, {"text": None}, {"text": "two"}, {"text": "x" * 50}])
    errors = []
    docs = docs_of(path, Fields(max_bytes=40), on_error=errors.append)
    assert [(d.index, d.text) for d in docs] == [(0, "zero"), (2, "two")]
    assert [str(e).split(": ", 1)[0] for e in errors] == [f"{path} row 2", f"{path} row 4"]


def _hostile(tmp_path, case):
    """(path, fields) of a hostile Parquet input."""
    import datetime

    import pyarrow as pa

    p = tmp_path / "bad.parquet"
    good = [{"text": "fine"}, {"text": "also fine"}]
    if case == "not parquet":
        return write(p, b'{"text": "a JSONL file named .parquet"}\n'), Fields()
    if case == "empty file":
        return write(p, b""), Fields()
    if case == "truncated":
        data = open(parquet(tmp_path / "whole.parquet", good * 50), "rb").read()
        return write(p, data[:len(data) // 2]), Fields()
    if case == "corrupt page":
        _corrupt_row_group(parquet(p, good), 0)
        return str(p), Fields()
    if case == "no text column":
        return parquet(p, [{"body": "x", "id": 1}]), Fields()
    if case == "text not a string":
        return parquet(p, [{"text": 1}, {"text": 2}]), Fields()
    if case == "text is bytes":
        return parquet(p, [], text=pa.array([b"bytes"], pa.binary())), Fields()
    if case == "text not UTF-8":
        return parquet(p, [], text=pa.array([b"ok", b"bad \xff"], pa.binary()).view(pa.string())), Fields()
    if case == "null text":
        return parquet(p, [{"text": "fine"}, {"text": None, "id": 1}]), Fields()
    if case == "input_ids floats":
        return parquet(p, [{"input_ids": [1.0, 2.0]}]), Fields()
    if case == "input_ids strings":
        return parquet(p, [{"input_ids": "1 2"}]), Fields()
    if case == "input_ids bools":
        return parquet(p, [{"input_ids": [True]}]), Fields()
    if case == "input_ids a null":
        return parquet(p, [{"input_ids": [1, None]}]), Fields()
    if case == "input_ids outside the vocabulary":
        return parquet(p, [{"input_ids": [1, 2]}, {"input_ids": [9, 10]}]), Fields()
    if case == "text too large":
        return parquet(p, [{"text": "x" * 100}, {"text": "é" * 51}]), Fields(max_bytes=100)
    if case == "input_ids too large":  # digits and a separator each: 10 ids of 2 digits are 30 bytes
        return parquet(p, [{"input_ids": [10] * 10}]), Fields(max_bytes=29)
    if case == "row too large in all":  # the fields the job reads, together
        return parquet(p, [{"id": "i" * 60, "text": "t" * 60, "unread": "u" * 500}]), Fields(max_bytes=100)
    if case == "id not JSON":
        return parquet(p, [{"text": "x", "id": datetime.datetime(2020, 1, 1)}]), Fields()
    if case == "column twice":
        import pyarrow.parquet as pq

        pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), str(p))
        return str(p), Fields()
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("not parquet", ": not a readable Parquet file (Parquet magic bytes not found in footer."),
    ("empty file", ": not a readable Parquet file (Parquet file size is 0 bytes)"),
    ("truncated", ": not a readable Parquet file (Parquet magic bytes not found in footer."),
    ("corrupt page", ": row group 0 cannot be read from row 1 on (Couldn't deserialize thrift"),
    ("no text column", ": no 'text' column (and no input_ids); its columns are 'body', 'id'"),
    ("text not a string", " row 1: field 'text' is not a string"),
    ("text is bytes", " row 1: field 'text' is not a string"),
    ("text not UTF-8", " row 2: field 'text' is not valid UTF-8 (byte 4)"),
    ("null text", " row 2: no 'text' field (and no input_ids)"),
    ("input_ids floats", " row 1: input_ids must be a list of integers"),
    ("input_ids strings", " row 1: input_ids must be a list of integers"),
    ("input_ids bools", " row 1: input_ids must be a list of integers"),
    ("input_ids a null", " row 1: input_ids must be a list of integers"),
    ("input_ids outside the vocabulary", " row 2: input_ids contains 10, outside the vocabulary (0..9)"),
    ("text too large", " row 2: the document is 102 bytes, more than the limit of 100 (raise max_document_bytes"),
    ("input_ids too large", " row 1: the document is 30 bytes, more than the limit of 29"),
    ("row too large in all", " row 1: the document is 120 bytes, more than the limit of 100"),
    ("id not JSON", ": column 'id' holds timestamp[us], which has no JSON form"),
    ("column twice", ": column 'text' appears more than once"),
])
def test_a_hostile_parquet_file_is_one_line_naming_file_and_row(tmp_path, case, message):
    path, fields = _hostile(tmp_path, case)
    with pytest.raises(HpcLlamaError) as e:
        scan_inputs(expand_inputs([path]), fields, 10, True)
    assert str(e.value).startswith(path + message), str(e.value)
    assert "\n" not in str(e.value)


def test_a_parquet_row_group_is_streamed_not_loaded(tmp_path):
    """A 20 MB row group is read through a bounded buffer, a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 20000
    path = str(tmp_path / "big.parquet")
    pq.write_table(pa.table({"id": range(n), "text": [f"{i:08d} " + "x" * 1015 for i in range(n)]}), path,
                   row_group_size=n, compression="none", use_dictionary=False)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1 and os.path.getsize(path) > 20_000_000
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for d in docs_of(path):
        assert d.text.startswith(f"{d.index:08d} ")
        peak, count = max(peak, pa.total_allocated_bytes() - base), count + 1
    assert count == n and peak < 8 << 20, peak  # without the buffer: 21 MB
