"""Document inputs: JSONL files, plain-text files, directories of .txt files, globs.

Documents are numbered 0.. in input order across all inputs: the files in
the order given (a glob's matches and a directory's files sorted by path), a
JSONL file line by line (blank lines skipped). Input is streamed in chunks
whose boundaries depend only on the input itself, so a resumed job cuts the
same chunks as the first attempt did.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import xxhash

from .errors import HpcLlamaError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
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
    """FILE:LINE (or FILE) for error messages."""
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
    """jsonl or text."""
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
        kind = "jsonl" if p.endswith(JSONL_SUFFIXES) else "text"
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
    """A document larger than this (in bytes, as stored) is an error naming its file and line."""
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
    """
    index = 0
    for f in files:
        for where, read in _pieces(f, fields):
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


def _pieces(f: InputFile, fields: Fields):
    """(where, a function returning its bytes) of each document of one file, in order, blank lines skipped.

    A whole text file is read only when asked for, so a resumed job skips it unread.
    """
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


def _document(f: InputFile, fields: Fields, where: str, raw: bytes, index: int, vocab_size: int | None) -> Document:
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
