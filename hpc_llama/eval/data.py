"""A task's data files, read as Hugging Face's loaders read them (json, parquet, csv): each document with where
it comes from (FILE:LINE, or FILE row N), for the one-line errors."""

from __future__ import annotations

import csv
import io
import json
import re

from ..errors import HpcLlamaError


def read_split(task, split: str) -> list[tuple[dict, str]]:
    """The split's documents with where each comes from, its files read in order."""
    reader = {"json": _read_json, "jsonl": _read_json, "parquet": _read_parquet, "csv": _read_csv}[task.dataset_path]
    docs = [d for path in task.files(split) for d in reader(path)]
    if not docs:
        raise HpcLlamaError(f"{', '.join(task.files(split))}: split {split!r} of task {task.name} holds no documents")
    return docs


def read_utf8(path: str) -> tuple[bytes, str]:
    """A file's bytes and its text; unreadable or not UTF-8 is a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HpcLlamaError(f"{path}: {e.strerror}") from None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HpcLlamaError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def _read_text(path: str) -> str:
    return read_utf8(path)[1]


def _parse_json(text: str, where: str, line_of_error: bool = False):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if line_of_error else where
        raise HpcLlamaError(f"{at}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise HpcLlamaError(f"{where}: the JSON nests too deeply") from None


def _read_json(path: str) -> list[tuple[dict, str]]:
    # Hugging Face's json loader reads JSON lines and a file holding one JSON array of records alike.
    text = _read_text(path)
    if text.lstrip().startswith("["):
        rows = _parse_json(text, path, line_of_error=True)
        out = []
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise HpcLlamaError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
            out.append((row, f"{path} row {i}"))
        return out
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _parse_json(line, where)
        if not isinstance(row, dict):
            raise HpcLlamaError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append((row, where))
    return out


def _read_parquet(path: str) -> list[tuple[dict, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise HpcLlamaError(f"{path}: not a readable Parquet file ({said(e)})") from None
    return [(row, f"{path} row {i}") for i, row in enumerate(rows, 1)]


# Hugging Face's csv loader reads with pandas.read_csv's defaults and keeps the types pandas infers; these
# are those rules for the common cases: pandas' default NA strings are null, a column of integers is int
# (float when one is missing), of numbers float, of True/False bool, anything else str.
CSV_NA = frozenset(("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))
_CSV_INT = re.compile(r"[+-]?\d+")
_CSV_FLOAT = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity)", re.IGNORECASE)
_CSV_BOOL = {"True": True, "TRUE": True, "true": True, "False": False, "FALSE": False, "false": False}


def _read_csv(path: str) -> list[tuple[dict, str]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        rows = [r for r in reader if r]  # pandas skips blank lines
    except csv.Error as e:
        raise HpcLlamaError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        raise HpcLlamaError(f"{path}: the header names a column twice")
    for i, row in enumerate(body, 1):
        if len(row) > len(header):
            raise HpcLlamaError(f"{path} row {i}: {len(row)} fields, the header has {len(header)}")
    columns = []
    for j in range(len(header)):
        cells = [row[j] if j < len(row) and row[j] not in CSV_NA else None for row in body]
        present = [c for c in cells if c is not None]
        if present and all(_CSV_INT.fullmatch(c) for c in present):
            convert = int if len(present) == len(cells) else float
        elif present and all(_CSV_FLOAT.fullmatch(c) for c in present):
            convert = float
        elif present and all(c in _CSV_BOOL for c in present):
            convert = _CSV_BOOL.get
        else:
            convert = str
        columns.append([None if c is None else convert(c) for c in cells])
    return [({name: col[i] for name, col in zip(header, columns)}, f"{path} row {i + 1}") for i in range(len(body))]


def said(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."
