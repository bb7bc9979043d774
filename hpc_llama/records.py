"""Per-document results, written by rank 0 only: in input order, exactly once, resumably.

While a job runs, finished steps are appended to `OUT.partial` (JSON lines)
and `OUT.journal.json` records how many documents and bytes of it are whole,
together with the job's fingerprint (model, inputs, options). A job started
again with the same command truncates the partial file to its last whole
step and carries on; anything else about the job having changed is refused.
At the end the final output is written under a temporary name and renamed,
so `OUT` only ever appears complete.
"""

from __future__ import annotations

import json
import os

from .atomic import atomic_path, check_destination, open_regular, publish, write_json_atomic
from .errors import HpcLlamaError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}


def output_format(path: str, requested: str | None = None) -> str:
    if requested:
        return requested
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    raise HpcLlamaError(f"{path}: cannot tell the output format from its name (.jsonl, .parquet, .h5) -- use --format")


class Journal:
    """Rank 0's record of what is safely written, for resuming after a kill."""

    def __init__(self, out: str, fingerprint: dict, overwrite: bool):
        self.out = os.path.abspath(out)
        self.partial = self.out + ".partial"
        self.path = self.out + ".journal.json"
        # As it will read back from JSON (tuples become lists), so a rerun compares equal.
        self.fingerprint = fingerprint = json.loads(json.dumps(fingerprint))
        self.state = {"documents": 0, "bytes": 0, "steps": 0, "stats": {}}
        self.resumed = False
        check_destination(out, overwrite)
        saved = self._read_saved()
        # A journal that recorded nothing (its job failed or was killed before its
        # first step) holds nothing to protect: the new job starts over in its place.
        if saved is not None and saved["state"]["documents"] > 0:
            keys = list(fingerprint) + [k for k in saved["fingerprint"] if k not in fingerprint]
            differs = [k for k in keys if saved["fingerprint"].get(k) != fingerprint.get(k)]
            if differs:
                raise HpcLlamaError(
                    f"{self.partial} belongs to a job with a different {differs[0]}: refusing to mix results "
                    f"(delete {os.path.basename(self.partial)} and {os.path.basename(self.path)} to start over)")
            self.state = saved["state"]
            self.resumed = True
            fd = open_regular(self.partial, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < self.state["bytes"]:
                    raise HpcLlamaError(f"{self.partial} is shorter than {self.path} records: it was changed by "
                                        f"something else; delete both to start over")
                os.ftruncate(fd, self.state["bytes"])  # drop a step that was being written when the job died
            finally:
                os.close(fd)
        else:
            os.close(open_regular(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            self._save()

    def _read_saved(self) -> dict | None:
        if not os.path.lexists(self.path):
            return None
        fd = open_regular(self.path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            try:
                saved = json.loads(f.read())
                if not (isinstance(saved["state"]["documents"], int) and isinstance(saved["fingerprint"], dict)):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise HpcLlamaError(f"{self.path} is not a journal of this tool: delete it and "
                                    f"{os.path.basename(self.partial)} to start over") from None
        return saved

    @property
    def documents_done(self) -> int:
        return self.state["documents"]

    def commit(self, lines: list[str], stats: dict) -> None:
        """Append one step's records and make them durable before recording them as done."""
        data = "".join(lines).encode()
        fd = open_regular(self.partial, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            # Disk full, quota, I/O error: what the journal records stays whole (a rerun drops this step's
            # bytes and carries on), so the message says which file and that nothing is lost.
            raise HpcLlamaError(f"{self.partial}: {e.strerror} while writing; the {self.documents_done} records "
                                f"before this step are kept: run the same command again to carry on") from None
        finally:
            os.close(fd)
        self.state["documents"] += len(lines)
        self.state["bytes"] += len(data)
        self.state["steps"] += 1
        for k, v in stats.items():
            self.state["stats"][k] = self.state["stats"].get(k, 0) + v
        self._save()

    def discard(self) -> None:
        """Remove the journal and the partial file (a job that recorded nothing)."""
        for path in (self.partial, self.path):
            if os.path.lexists(path):
                os.remove(path)

    def _save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "state": self.state}, indent=None)

    def finish(self, fmt: str, columns: dict[str, str]) -> None:
        """Write the final output from the partial file, atomically, and remove the journal.

        `columns` names each record field's kind (int, float, str, id, int_list,
        float_list) for the typed formats.
        """
        if fmt == "jsonl":
            publish(self.partial, self.out)  # its bytes are fsynced step by step already
        else:
            with atomic_path(self.out, overwrite=True) as tmp:
                (write_parquet if fmt == "parquet" else write_hdf5)(self.partial, tmp, columns)
            os.remove(self.partial)
        os.remove(self.path)


def _records(partial: str, batch: int = 65536):
    with open(partial, "rb") as f:
        out = []
        for line in f:
            out.append(json.loads(line))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out


def _id_types(partial: str, columns: dict[str, str]) -> dict[str, str]:
    """Each `id` column's type: int when every value is an integer or null, else str."""
    names = [n for n, kind in columns.items() if kind == "id"]
    kinds: dict[str, set] = {n: set() for n in names}
    for recs in _records(partial):
        for n in names:
            kinds[n].update("int" if isinstance(r.get(n), int) and not isinstance(r.get(n), bool) else
                            "none" if r.get(n) is None else "other" for r in recs)
    return {n: "int" if k <= {"int", "none"} else "str" for n, k in kinds.items()}


def _id_value(v, kind: str):
    if v is None or kind == "int":
        return v
    return v if isinstance(v, str) else json.dumps(v)


def write_parquet(partial: str, dst: str, columns: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    id_kinds = _id_types(partial, columns)
    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
             "int_list": pa.list_(pa.int64()), "float_list": pa.list_(pa.float32())}
    schema = pa.schema([(name, (pa.int64() if id_kinds[name] == "int" else pa.string()) if kind == "id" else
                         types[kind]) for name, kind in columns.items()])
    with pq.ParquetWriter(dst, schema) as w:
        for recs in _records(partial):
            cols = {name: [(_id_value(r.get(name), id_kinds[name]) if kind == "id" else r.get(name)) for r in recs]
                    for name, kind in columns.items()}
            w.write_table(pa.table(cols, schema=schema))


def write_hdf5(partial: str, dst: str, columns: dict[str, str]) -> None:
    """One dataset per column; a list column is flattened, with `<name>_offsets` marking each record's part;
    a missing float is NaN, a missing integer the smallest int64 and a missing bool -1 (attribute `missing`)."""
    import h5py
    import numpy as np

    id_kinds = _id_types(partial, columns)
    scalar = {"int": np.int64, "float": np.float64, "str": h5py.string_dtype(), "bool": np.int8}
    lists = {"int_list": np.int64, "float_list": np.float32}
    missing = np.iinfo(np.int64).min
    missing_of = {"int": missing, "bool": -1}
    with h5py.File(dst, "w") as f:
        f.attrs["format"] = "hpc_llama.records"
        ds, flat, offsets = {}, {}, {}
        for name, kind in columns.items():
            if kind in lists:
                flat[name] = f.create_dataset(name, (0,), dtype=lists[kind], maxshape=(None,), chunks=(1 << 18,))
                offsets[name] = f.create_dataset(f"{name}_offsets", (1,), dtype=np.int64, maxshape=(None,),
                                                 chunks=(65536,))
                offsets[name][0] = 0
            else:
                kind = id_kinds[name] if kind == "id" else kind
                ds[name] = f.create_dataset(name, (0,), dtype=scalar[kind], maxshape=(None,), chunks=(65536,))
                if kind in missing_of:
                    ds[name].attrs["missing"] = missing_of[kind]
        n = 0
        for recs in _records(partial):
            m = len(recs)
            for name, d in ds.items():
                kind = columns[name]
                d.resize((n + m,))
                values = [r.get(name) for r in recs]
                if kind == "id":
                    kind = id_kinds[name]
                    values = [None if v is None else _id_value(v, kind) for v in values]
                d[n:] = [(np.nan if kind == "float" else missing_of.get(kind, "")) if v is None else v for v in values]
            for name in flat:
                lengths = [len(r[name]) for r in recs]
                start = int(offsets[name][-1])
                flat[name].resize((start + sum(lengths),))
                if sum(lengths):
                    flat[name][start:] = np.concatenate([np.asarray(r[name], flat[name].dtype) for r in recs])
                offsets[name].resize((n + m + 1,))
                offsets[name][n + 1:] = start + np.cumsum(lengths)
            n += m
