"""Document inputs: JSONL files, Parquet files, plain-text files, directories of .txt files, globs.

Documents are numbered 0.. in input order across all inputs: the files in
the order given (a glob's matches and a directory's files sorted by path), a
JSONL file line by line (blank lines skipped), a Parquet file row by row (a
row is a record, as a JSONL object is). Input is streamed in chunks whose
boundaries depend only on the input itself, so a resumed job cuts the same
chunks as the first attempt did.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import xxhash

from .errors import HpcLlamaError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
# The largest document (a JSONL line, a text file, or a line of one) read by default. Generous -- a long
# book is a few MB -- but bounded: tokenizing 16 MB in one piece took 2.7 GB of memory and 16 s here, and a
# 200 MB line aborted the tokenizer. Each job has a setting to raise it (score.max_document_bytes, ...).
MAX_DOCUMENT_BYTES = 8 << 20


@dataclass(frozen=True)
class Document:
    """One document as read: its global index, id, and text or token ids."""

    index: int
    id: object
    text: str | None
    input_ids: tuple[int, ...] | None
    where: str
    """FILE:LINE, FILE row N (Parquet) or FILE, for error messages."""
    response: str | None = None
    """For task data: the response to `text` (the prompt)."""
    context: str | None = None
    """A conditional request: `text` (its continuation) is scored given this context."""
    keep: tuple | None = None
    """The values of the fields the job copies into its record (`--keep-fields`), in that order."""


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str
    """jsonl, parquet or text."""
    size: int
    xxh3: str = ""
    documents: int = 0


def expand_inputs(specs: list[str]) -> list[InputFile]:
    """Resolve paths, directories and globs into files, in a stable order."""
    files: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise HpcLlamaError(f"{spec}: no files match")
            files.extend(matches)
        elif os.path.isdir(spec):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(spec) for f in names if f.endswith(".txt"))
            if not found:
                raise HpcLlamaError(f"{spec}: directory holds no .txt files")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise HpcLlamaError(f"{spec}: no such file or directory")
    out = []
    for p in files:
        kind = "jsonl" if p.endswith(JSONL_SUFFIXES) else "parquet" if p.endswith(PARQUET_SUFFIXES) else "text"
        out.append(InputFile(p, kind, os.path.getsize(p)))
    return out


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    id: str = "id"
    response: str | None = None
    """Set for task data: records then need `text` (the prompt field) and this field."""
    text_lines: bool = False
    """A plain-text file holds one document per non-empty line (prompts), not one in all."""
    max_bytes: int = MAX_DOCUMENT_BYTES
    """A document larger than this (in bytes, as stored; a Parquet row: see _value_sizes) is an error naming
    its file and line."""
    conditional: bool = False
    """A record with a `context` field is a conditional request: its `continuation` is scored given it."""
    keep: tuple[str, ...] = ()
    """Fields copied from each input record into its output record (a missing one is null)."""


def _too_large(where: str, size: int, fields: Fields) -> HpcLlamaError:
    return HpcLlamaError(f"{where}: the document is {size:,} bytes, more than the limit of {fields.max_bytes:,} "
                         f"(raise max_document_bytes for this job, or split the document)")


def parse_line(raw: bytes, where: str, index: int, fields: Fields, vocab_size: int | None) -> Document:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HpcLlamaError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise HpcLlamaError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise HpcLlamaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return _record(obj, where, index, fields, vocab_size)


def _record(obj: dict, where: str, index: int, fields: Fields, vocab_size: int | None) -> Document:
    """A record (a JSONL object, a Parquet row without its nulls) as a Document: one set of rules for both."""
    doc_id = obj.get(fields.id)
    keep = tuple(obj.get(k) for k in fields.keep) if fields.keep else None
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise HpcLlamaError(f"{where}: input_ids must be a list of integers")
        if vocab_size is not None:
            bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
            if bad is not None:
                raise HpcLlamaError(f"{where}: input_ids contains {bad}, outside the vocabulary (0..{vocab_size - 1})")
        return Document(index, doc_id, None, tuple(ids), where, keep=keep)
    if fields.conditional and "context" in obj:
        return _request(obj, doc_id, where, index, keep)
    text = obj.get(fields.text)
    if text is None:
        raise HpcLlamaError(f"{where}: no {fields.text!r} field" + ("" if fields.response else " (and no input_ids)"))
    if not isinstance(text, str):
        raise HpcLlamaError(f"{where}: field {fields.text!r} is not a string")
    if fields.response is None:
        return Document(index, doc_id, text, None, where, keep=keep)
    response = obj.get(fields.response)
    if not isinstance(response, str):
        raise HpcLlamaError(f"{where}: no {fields.response!r} field (a string) to go with {fields.text!r}")
    return Document(index, doc_id, text, None, where, response, keep=keep)


def _request(obj: dict, doc_id, where: str, index: int, keep: tuple | None) -> Document:
    context, continuation = obj["context"], obj.get("continuation")
    if not isinstance(context, str):
        raise HpcLlamaError(f"{where}: field 'context' is not a string")
    if continuation is None:
        raise HpcLlamaError(f"{where}: a record with 'context' needs a 'continuation' (the text scored given it)")
    if not isinstance(continuation, str):
        raise HpcLlamaError(f"{where}: field 'continuation' is not a string")
    return Document(index, doc_id, continuation, None, where, context=context, keep=keep)


def read_documents(files: list[InputFile], fields: Fields = Fields(), vocab_size: int | None = None, start: int = 0,
                   on_error=None):
    """Yield every Document in input order, from global index `start` on.

    Documents before `start` are skipped without being parsed. A bad document
    raises HpcLlamaError naming its file and line, unless `on_error` is given:
    then it receives the error and the document is skipped (its index stays taken).
    A file that cannot be read at all (not Parquet, truncated) raises either way.
    """
    index = 0
    for f in files:
        for piece in _pieces(f, fields, skip=max(0, start - index)):
            if isinstance(piece, int):  # that many documents passed over unread (Parquet rows before `start`)
                index += piece
                continue
            where, read = piece
            if index >= start:
                try:
                    doc = _document(f, fields, where, read(), index, vocab_size)
                except HpcLlamaError as e:
                    if on_error is None:
                        raise
                    on_error(e)
                else:
                    yield doc
            index += 1


def _pieces(f: InputFile, fields: Fields, skip: int = 0):
    """(where, a function returning its bytes) of each document of one file, in order, blank lines skipped.

    A whole text file is read only when asked for, so a resumed job skips it unread. A Parquet file gives
    its rows (as records), and its first `skip` rows as counts, whole row groups unread.
    """
    if f.kind == "parquet":
        yield from _parquet_rows(f.path, fields, skip)
        return
    if f.kind == "text" and not fields.text_lines:
        def whole() -> bytes:
            with open(f.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > fields.max_bytes:
                    raise _too_large(f.path, size, fields)
                return fh.read()

        yield f.path, whole
        return
    with open(f.path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield f"{f.path}:{lineno}", (lambda raw=raw: raw)


def _document(f: InputFile, fields: Fields, where: str, raw, index: int, vocab_size: int | None) -> Document:
    if f.kind == "parquet":
        return _record(raw, where, index, fields, vocab_size)  # a row: its size was checked as it was read
    if len(raw) > fields.max_bytes:
        raise _too_large(where, len(raw), fields)
    if f.kind == "jsonl":
        return parse_line(raw, where, index, fields, vocab_size)
    text = _utf8(raw.rstrip(b"\r\n") if fields.text_lines else raw, where)
    return Document(index, where, text, None, where)


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HpcLlamaError(f"{where}: not valid UTF-8 (byte {e.start})") from None


# --- Parquet ------------------------------------------------------------------------------------

# Pages are read through a buffer of this size and rows decoded a batch of about PARQUET_BATCH_BYTES at a
# time (by the row group's own sizes), so a row group is never in memory whole: a 1 GB file of one row group
# (500,000 texts of 2 KB) read as documents in a peak RSS of 143 MB here, 71 MB of it the interpreter and its
# imports; without the buffer pyarrow loads the whole column chunk, and RSS passed 1 GB.
PARQUET_BUFFER = 1 << 20
PARQUET_BATCH_BYTES = 16 << 20
PARQUET_BATCH_ROWS = 1024


def _parquet_rows(path: str, fields: Fields, skip: int):
    """_pieces of a Parquet file: (FILE row N, a function returning the row as a record) of each row, and
    the rows before `skip` as counts -- whole row groups by their metadata, never decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
        meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise HpcLlamaError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    with pf:
        columns = _parquet_columns(path, schema, fields)
        leaves = [i for i in range(meta.num_columns) if pf.schema.column(i).path.split(".")[0] in columns]
        first = 0  # the row group's first row, 0-based over the whole file
        for g in range(meta.num_row_groups):
            rows, stored = _row_group_sizes(path, meta, g, leaves)
            if first + rows <= skip:
                yield rows
                first += rows
                continue
            batch_rows = min(PARQUET_BATCH_ROWS, max(1, PARQUET_BATCH_BYTES * rows // max(stored, 1)))
            row = first
            for batch in _parquet_batches(pf, path, g, row, columns, batch_rows):
                before = min(batch.num_rows, max(0, skip - row))  # rows before `skip`: decoded, not converted
                if before:
                    yield before
                if before < batch.num_rows:
                    yield from _batch_records(path, batch.slice(before), row + before, fields)
                row += batch.num_rows
            if row - first != rows:
                raise HpcLlamaError(f"{path}: row group {g} holds {row - first} rows, its metadata says {rows} "
                                    f"(a corrupt file)")
            first = row


def _row_group_sizes(path: str, meta, g: int, leaves: list[int]) -> tuple[int, int]:
    """Row group g's rows and the bytes its `leaves` columns hold decoded, as its metadata says."""
    import pyarrow as pa

    try:
        group = meta.row_group(g)
        rows, stored = group.num_rows, sum(group.column(i).total_uncompressed_size for i in leaves)
    except (pa.ArrowException, OSError, IndexError) as e:
        raise HpcLlamaError(f"{path}: corrupt Parquet metadata ({_one_line(e)})") from None
    if rows < 0:
        raise HpcLlamaError(f"{path}: corrupt Parquet metadata (row group {g} has {rows} rows)")
    return rows, stored


def _parquet_columns(path: str, schema, fields: Fields) -> list[str]:
    """The columns the job reads, in file order. A file without a column that gives documents is refused,
    and so is an id or kept column whose values have no JSON form (they are copied into output records)."""
    wanted = {fields.text, fields.id, "input_ids", *fields.keep, *([fields.response] if fields.response else []),
              *(["context", "continuation"] if fields.conditional else [])}
    names = schema.names
    columns = [n for n in names if n in wanted]
    twice = next((n for n in columns if columns.count(n) > 1), None)
    if twice is not None:
        raise HpcLlamaError(f"{path}: column {twice!r} appears more than once")
    if not {fields.text, "input_ids", *(["context"] if fields.conditional else [])} & set(columns):
        shown = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
        raise HpcLlamaError(f"{path}: no {fields.text!r} column" + ("" if fields.response else " (and no input_ids)")
                            + f"; its columns are {shown or 'none'}")
    for name in dict.fromkeys((fields.id, *fields.keep)):
        if name in columns and not _json_like(schema.field(name).type):
            raise HpcLlamaError(f"{path}: column {name!r} holds {schema.field(name).type}, which has no JSON form "
                                f"(its values go into the output records)")
    return columns


def _json_like(t) -> bool:
    """Whether a column of Arrow type t holds only values JSON has: null, bools, numbers, strings, lists, objects."""
    import pyarrow as pa

    types = pa.types
    if types.is_dictionary(t):
        return _json_like(t.value_type)
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        return _json_like(t.value_type)
    if types.is_struct(t):
        return all(_json_like(t.field(i).type) for i in range(t.num_fields))
    return (types.is_null(t) or types.is_boolean(t) or types.is_integer(t) or types.is_float32(t)
            or types.is_float64(t) or types.is_string(t) or types.is_large_string(t))


def _parquet_batches(pf, path: str, g: int, row: int, columns: list[str], batch_rows: int):
    """The record batches of row group g; a read error (a corrupt or truncated file) is one line naming it."""
    import pyarrow as pa

    batches = pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns, use_threads=False)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise HpcLlamaError(f"{path}: row group {g} cannot be read from row {row + 1} on "
                                f"({_one_line(e)})") from None
        if batch.schema.names != columns:  # a name with a dot ('a.b') also selects that path in a struct 'a'
            batch = batch.select(columns)
        row += batch.num_rows
        yield batch


def _batch_records(path: str, batch, first: int, fields: Fields):
    """(where, read) of each row of a batch whose first row is `first` (0-based): read() gives the row as a
    record, its nulls left out as absent fields, or raises the row's error (too large, unreadable)."""
    import numpy as np

    sizes = sum((_value_sizes(c) for c in batch.columns), np.zeros(batch.num_rows, np.int64))
    fits = np.flatnonzero(sizes <= fields.max_bytes)
    records: list = [None] * batch.num_rows
    for i in np.flatnonzero(sizes > fields.max_bytes):  # never converted to Python values
        records[i] = _too_large(f"{path} row {first + i + 1}", int(sizes[i]), fields)
    if len(fits):
        for i, rec in zip(fits, _to_records(batch if len(fits) == batch.num_rows else batch.take(fits),
                                            [f"{path} row {first + i + 1}" for i in fits])):
            records[i] = rec
    for i, rec in enumerate(records):
        yield f"{path} row {first + i + 1}", (lambda rec=rec: _given(rec))


def _given(rec):
    if isinstance(rec, HpcLlamaError):
        raise rec
    return rec


def _to_records(batch, wheres: list[str]) -> list:
    """The rows as dicts without their nulls (pyarrow's to_pylist values); a row that does not convert (a
    string column holding bytes that are not UTF-8) is an HpcLlamaError naming its row and field instead."""
    import pyarrow as pa

    try:
        rows = batch.to_pylist()
    except (UnicodeDecodeError, ValueError, OverflowError, pa.ArrowException):
        rows = []
        for i, where in enumerate(wheres):
            row = {}
            for name, column in zip(batch.schema.names, batch.columns):
                try:
                    row[name] = column[i].as_py()
                except UnicodeDecodeError as e:
                    row = HpcLlamaError(f"{where}: field {name!r} is not valid UTF-8 (byte {e.start})")
                    break
                except (ValueError, OverflowError, pa.ArrowException) as e:
                    row = HpcLlamaError(f"{where}: field {name!r} cannot be read ({_one_line(e)})")
                    break
            rows.append(row)
    return [r if isinstance(r, HpcLlamaError) else {k: v for k, v in r.items() if v is not None} for r in rows]


def _value_sizes(arr):
    """Each value's size, as a JSONL line of it would be about (numpy int64): a string or bytes its UTF-8
    bytes, a number or bool its digits, a list its items' sizes plus one each, a struct its fields' sizes.
    Measured on the Arrow data, before anything is converted to Python."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    types, n = pa.types, len(arr)
    t = arr.type
    if types.is_dictionary(t):
        return _value_sizes(arr.dictionary_decode())
    if types.is_null(t):
        return np.zeros(n, np.int64)
    if types.is_string(t) or types.is_large_string(t) or types.is_binary(t) or types.is_large_binary(t) \
            or types.is_fixed_size_binary(t):
        return pc.binary_length(arr).fill_null(0).to_numpy().astype(np.int64)
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        items = _value_sizes(arr.flatten())
        parents = pc.list_parent_indices(arr).to_numpy()
        return np.bincount(parents, weights=items + 1, minlength=n).astype(np.int64)
    if types.is_struct(t):
        return sum((_value_sizes(c) for c in arr.flatten()), np.zeros(n, np.int64))
    try:
        return pc.binary_length(pc.cast(arr, pa.string())).fill_null(0).to_numpy().astype(np.int64)
    except pa.ArrowException:  # a type with no text form: its share of the bytes the batch holds
        return np.full(n, -(-arr.nbytes // max(n, 1)), np.int64)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def file_checksum(path: str) -> str:
    """xxh3-64 of a file's bytes, as hex: how inputs are named in journals and summaries."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def scan_inputs(files: list[InputFile], fields: Fields, vocab_size: int | None, need_tokenizer_ok: bool,
                on_error=None):
    """Validate every document, count them and checksum every file, before any work starts.

    Returns (files with checksums and counts, number of documents with text).
    Raises HpcLlamaError naming the file and line of the first bad document.
    """
    out, with_text, total = [], 0, 0
    for f in files:
        n = 0
        for doc in read_documents([f], fields, vocab_size, on_error=on_error):
            n += 1
            if doc.text is not None:
                with_text += 1
                if not need_tokenizer_ok:
                    raise HpcLlamaError(f"{doc.where}: the document is text but the checkpoint has no tokenizer.json "
                                        f"(give input_ids, or a checkpoint with a tokenizer)")
        out.append(InputFile(f.path, f.kind, os.path.getsize(f.path), file_checksum(f.path), n))
        total += n
    if total == 0:
        raise HpcLlamaError(f"no documents in {', '.join(f.path for f in files)}")
    return out, with_text


def chunks(docs, max_docs: int, max_chars: int):
    """Group a document stream into lists; a chunk ends at `max_docs` documents or
    once it holds `max_chars` characters (token ids count as characters), but
    never between consecutive requests with the same context (the choices of
    one question are scored from one copy of it).

    Boundaries depend only on the documents, never on the layout or on where a
    run started, as long as it starts on a boundary.
    """
    chunk, size, full = [], 0, False
    for d in docs:
        if full and (d.context is None or d.context != chunk[-1].context):
            yield chunk
            chunk, size = [], 0
        chunk.append(d)
        size += (len(d.text) + len(d.context or "")) if d.text is not None else len(d.input_ids)
        full = len(chunk) >= max_docs or size >= max_chars
    if chunk:
        yield chunk
