"""The hpc_llama HDF5 checkpoint: one file, or a directory of shards plus an index.

The layout is specified in docs/checkpoint.md. Tensors are keyed by global
parameter name, so any rank reads its own slice at any pipeline degree; they
are stored contiguous and unfiltered so a slice is read with one pread per
tensor at a known offset, hashed while it is still in cache.
"""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import torch

from ..errors import HpcLlamaError
from ..parallel.layout import plan_shards
from .base import CheckpointReader, file_inside, group_by_unit, shown, unit_of, unit_order
from .hf import model_config_from_hf
from .tensors import DTYPES, TORCH_NAMES, TensorInfo, checksum, empty_for, new_hasher, numpy_view, read_exact

FORMAT = "hpc_llama.checkpoint"
FORMAT_VERSION = 2
"""The newest version this code reads. Files without compressed tensors are still written as 1."""
PLAIN_VERSION = 1
INDEX = "index.json"
# Storage schemes this version reads (docs/checkpoint.md); any other is refused, not misread.
SCHEMES = ("none", "sparse", "int8-channel", "int4-group")


def _unit(name: str):
    try:
        return unit_of(name)
    except HpcLlamaError:
        return None


def _attr_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


# Filters a dataset of ours may use: the sparse scheme's shuffle + deflate (and HDF5's checksum). Any
# other is refused rather than run: a filter decides how many bytes a few stored bytes become.
_FILTERS = (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32)
MAX_INFLATE = 1032
"""Most bytes deflate can make of one stored byte (its longest match, 258 bytes, costs 2 bits)."""
# Exceptions h5py raises on a malformed file; each becomes a one-line error naming the file.
_H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


class H5File:
    """One HDF5 file of the format (a whole checkpoint or one shard).

    The file is a stranger's: every object it is read through must be a hard link inside it (no
    external or soft link, no external or virtual storage), and every dataset's claimed size must be
    held by the file (`_check_storage`) before a buffer is allocated for it.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except FileNotFoundError:
            raise HpcLlamaError(f"{path}: no such file") from None
        except OSError as e:
            reason = "truncated" if "truncated" in str(e) else "not a readable HDF5 file"
            raise HpcLlamaError(f"{path}: {reason} ({str(e).split('(')[0].strip()})") from None
        self.size = os.stat(path).st_size
        try:
            fmt = _attr_str(self.attr(self.f, "format", ""))
            if fmt != FORMAT:
                raise HpcLlamaError(f"{path}: not an hpc_llama checkpoint (format attribute {shown(fmt)})")
            version = self.attr(self.f, "format_version", 0)
            if not isinstance(version, (int, np.integer)):
                raise HpcLlamaError(f"{path}: corrupt format_version attribute {shown(version)}")
        except HpcLlamaError:
            self.f.close()
            raise
        if version > FORMAT_VERSION:
            self.f.close()
            raise HpcLlamaError(f"{path}: checkpoint format {version} is newer than this hpc_llama reads ({FORMAT_VERSION})")
        self._fd = None
        self._index = None
        self._infos: dict[str, TensorInfo] = {}
        self._group = None

    def attr(self, obj, name: str, default=None):
        """A scalar attribute (a format tag, a JSON string, a checksum): refused unless it is one value."""
        try:
            if name not in obj.attrs:
                return default
            if h5py.h5a.open(obj.id, name.encode()).shape != ():
                raise HpcLlamaError(f"{self.path}: corrupt attribute {shown(name)} (not a single value)")
            return obj.attrs[name]
        except _H5_ERRORS as e:
            raise HpcLlamaError(f"{self.path}: cannot read attribute {shown(name)}: {e}") from None

    def member(self, group, name: str, kind):
        """`group[name]`, which must be a hard link to an object of `kind` (h5py.Group or h5py.Dataset)."""
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise HpcLlamaError(f"{self.path}: {shown(name)} is not a plain object name: the file is corrupt")
        try:
            if not group.id.links.exists(name.encode()):
                return None
            if group.id.links.get_info(name.encode()).type != h5py.h5l.TYPE_HARD:
                raise HpcLlamaError(f"{self.path}: {shown(name)} is a link to another object or file, "
                                    f"which a checkpoint may not hold")
            obj = group[name]
        except _H5_ERRORS as e:
            raise HpcLlamaError(f"{self.path}: cannot open {shown(name)}: {e}") from None
        if not isinstance(obj, kind):
            raise HpcLlamaError(f"{self.path}: {shown(name)} is not a{' group' if kind is h5py.Group else ' dataset'}: "
                                f"the file is corrupt")
        return obj

    def _check_storage(self, d, name: str, nbytes: int) -> tuple[int | None, int | None]:
        """(byte offset of contiguous data or None, bytes on disk where a filter makes them differ), once
        the dataset is known to keep its `nbytes` inside this file."""
        try:
            plist = d.get_create_plist()
            layout = plist.get_layout()
            external = plist.get_external_count()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            offset = d.get_offset() if layout == h5py.h5d.CONTIGUOUS else None
            stored = d.get_storage_size()
        except _H5_ERRORS as e:
            raise HpcLlamaError(f"{self.path}: cannot read the layout of {shown(name)}: {e}") from None
        if external or layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
            raise HpcLlamaError(f"{self.path}: {shown(name)} keeps its data in other files (external or virtual "
                                f"storage), which a checkpoint may not")
        unknown = [f for f in filters if f not in _FILTERS]
        if unknown:
            raise HpcLlamaError(f"{self.path}: {shown(name)} uses HDF5 filter {unknown[0]}, which hpc_llama "
                                f"does not read")
        holds = stored * (MAX_INFLATE if filters else 1)
        if offset is not None:
            holds = self.size - offset
        if stored > self.size or nbytes > holds:
            raise HpcLlamaError(f"{self.path}: {shown(name)} claims {nbytes} bytes, more than the file holds "
                                f"for it ({max(holds, 0)}): the file is truncated or corrupt")
        return offset, (stored if offset is None else None)

    def read_dataset(self, group, name: str) -> bytes:
        """The bytes of a small uint8 dataset of ours (the index, an asset), checked before it is read."""
        d = self.member(group, name, h5py.Dataset)
        if d.dtype != np.uint8 or d.ndim != 1:
            raise HpcLlamaError(f"{self.path}: {shown(name)} is not a byte string: the file is corrupt")
        self._check_storage(d.id, name, int(d.shape[0]))
        try:
            return d[()].tobytes()
        except _H5_ERRORS as e:
            raise HpcLlamaError(f"{self.path}: cannot read {shown(name)}: {e}") from None

    def _tensors(self):
        return self.member(self.f, "tensors", h5py.Group)

    def _entries(self) -> dict[str, dict]:
        """name -> {dtype, shape, xxh3, attrs}: from the /index dataset in one read, else from each dataset."""
        if self._index is None:
            group = self._tensors()
            stored = list(group.keys()) if group is not None else []
            if self.member(self.f, "index", h5py.Dataset) is not None:
                raw = self.read_dataset(self.f, "index")
                if checksum(np.frombuffer(raw, np.uint8)) != _attr_str(self.attr(self.f["index"], "xxh3", "")):
                    raise HpcLlamaError(f"{self.path}: checksum mismatch in the tensor index: the file is corrupt")
                try:
                    index = json.loads(raw)
                except (ValueError, RecursionError):
                    raise HpcLlamaError(f"{self.path}: corrupt tensor index (not JSON)") from None
                self._index = _check_index(self.path, index)
                listed = set(self._index) | {p["dataset"] for e in self._index.values()
                                             for p in e.get("parts", {}).values()}
                present = set(stored)
                for name in stored:
                    if name not in listed:
                        raise HpcLlamaError(f"{self.path}: tensor {shown(name)} is stored but not in the index: "
                                            f"the file is corrupt")
                for name in listed:
                    if name not in present:
                        raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
            else:
                index = {}
                for name in stored:
                    d = self.member(group, name, h5py.Dataset)
                    attrs = {k: self.attr(d, k) for k in d.attrs.keys()}
                    attrs = {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v) for k, v in attrs.items()}
                    index[name] = {"dtype": attrs.pop("dtype", str(d.dtype)), "shape": list(d.shape),
                                   "xxh3": attrs.pop("xxh3", None), "attrs": attrs}
                self._index = _check_index(self.path, index)
        return self._index

    def names(self) -> list[str]:
        return list(self._entries())

    def info(self, name: str) -> TensorInfo:
        if name in self._infos:
            return self._infos[name]
        entry = self._entries().get(name)
        if entry is None:
            raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
        # The offset is asked of HDF5 itself, not stored, so a repacked file
        # stays readable; the low-level open skips h5py's per-object wrappers.
        if self._group is None:
            self._group = self._tensors()
        parts = {role: self._dataset_info(p["dataset"], p)[0] for role, p in entry.get("parts", {}).items()}
        info, stored = self._dataset_info(name, entry)
        if stored is not None or any(p.disk_bytes is not None for p in parts.values()):
            stored = (stored if stored is not None else info.nbytes) + sum(p.stored_bytes for p in parts.values())
        info = TensorInfo(name, info.shape, info.dtype, info.nbytes, self.path, info.offset, info.checksum,
                          entry.get("attrs", {}), parts, stored)
        self._infos[name] = info
        return info

    def _dataset_info(self, name: str, entry: dict) -> tuple[TensorInfo, int | None]:
        """One dataset's place, and its bytes on disk when a filter makes them differ from its size."""
        shape, dtype = tuple(entry["shape"]), entry["dtype"]
        if dtype not in DTYPES:
            raise HpcLlamaError(f"{self.path}: tensor {name} has unsupported dtype {shown(dtype)}")
        np_dtype = np.dtype(DTYPES[dtype][0])
        nbytes = math.prod(shape) * np_dtype.itemsize
        d = self._dataset_id(name)
        offset = d.get_offset()
        if offset is not None:
            # Contiguous bytes in this file (HDF5 gives no offset for chunked, compact, external or
            # virtual storage): they are read with pread, never through HDF5, as the index's dtype and
            # shape (the index is checksummed as a whole, each tensor's bytes by its own xxh3). So all
            # HDF5 must vouch for is their place and their count: a contiguous dataset's storage is
            # exactly its size. (Asking its dtype too would cost a third of planning a tensor.)
            if d.get_storage_size() != nbytes:
                raise HpcLlamaError(f"{self.path}: tensor {name} disagrees with the index: the file is corrupt")
            if offset + nbytes > self.size:
                raise HpcLlamaError(f"{self.path}: {shown(name)} claims {nbytes} bytes, more than the file holds "
                                    f"for it ({max(self.size - offset, 0)}): the file is truncated or corrupt")
            return TensorInfo(name, shape, dtype, nbytes, self.path, offset, entry.get("xxh3")), None
        if d.shape != shape or d.dtype != np_dtype:
            raise HpcLlamaError(f"{self.path}: tensor {name} disagrees with the index: the file is corrupt")
        offset, disk = self._check_storage(d, name, nbytes)
        return TensorInfo(name, shape, dtype, nbytes, self.path, offset, entry.get("xxh3")), disk

    def _dataset_id(self, name: str):
        """The low-level dataset /tensors/`name`: a hard link to a dataset, as `member` requires. One tensor
        at a time this is most of the cost of planning a slice, so h5py's object wrappers are skipped."""
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise HpcLlamaError(f"{self.path}: {shown(name)} is not a plain object name: the file is corrupt")
        gid, key = self._group.id, name.encode()
        try:
            if gid.links.get_info(key).type == h5py.h5l.TYPE_HARD:
                return h5py.h5d.open(gid, key)
        except _H5_ERRORS:
            pass
        d = self.member(self._group, name, h5py.Dataset)  # says what is wrong: missing, a link, not a dataset
        if d is None:
            raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
        return d.id

    def read_into(self, info: TensorInfo, out: np.ndarray, verify: bool) -> None:
        scheme = info.scheme
        if scheme not in SCHEMES:
            raise HpcLlamaError(f"{self.path}: tensor {info.name} is stored as {shown(scheme)}, "
                                f"which this version of hpc_llama does not read")
        hasher = new_hasher() if verify and info.checksum else None
        if info.offset is not None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            try:
                read_exact(self._fd, info.offset, out, hasher)
            except HpcLlamaError:
                raise HpcLlamaError(f"{self.path}: truncated (tensor {info.name})") from None
        else:
            try:
                self._tensors()[info.name].read_direct(out)
            except _H5_ERRORS as e:
                raise HpcLlamaError(f"{self.path}: cannot read tensor {info.name}: {e}") from None
            if hasher is not None:
                hasher.update(out.reshape(-1).view(np.uint8))
        if hasher is not None and hasher.hexdigest() != info.checksum:
            raise HpcLlamaError(f"{self.path}: checksum mismatch in tensor {info.name} (stored {info.checksum}, "
                                f"read {hasher.hexdigest()}): the file is corrupt")

    def assets(self) -> dict[str, bytes]:
        out = {}
        group = self.member(self.f, "assets", h5py.Group)
        for name in (group.keys() if group is not None else []):
            # Asset names become file names beside an export (convert --format hf): `member` takes plain names only.
            data = self.read_dataset(group, name)
            if checksum(np.frombuffer(data, np.uint8)) != _attr_str(self.attr(group[name], "xxh3", "")):
                raise HpcLlamaError(f"{self.path}: checksum mismatch in asset {name}: the file is corrupt")
            out[name] = data
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.f.close()


def _check_index(path: str, index) -> dict[str, dict]:
    """A tensor index as the format defines it (docs/checkpoint.md), or a one-line error naming what is not."""
    def bad(what):
        return HpcLlamaError(f"{path}: corrupt tensor index ({what})")

    def check_entry(name, e):
        if not isinstance(e, dict):
            raise bad(f"entry {shown(name)} is not an object")
        for key, kind in (("dtype", str), ("shape", list)):
            if not isinstance(e.get(key), kind):
                raise bad(f"entry {shown(name)} has no {key}")
        if not all(type(n) is int and n >= 0 for n in e["shape"]):  # JSON gives int or bool, never a subclass
            raise bad(f"entry {shown(name)} has shape {shown(e['shape'])}")
        if not isinstance(e.get("xxh3"), (str, type(None))):
            raise bad(f"entry {shown(name)} has xxh3 {shown(e.get('xxh3'))}")

    if not isinstance(index, dict):
        raise bad("not an object")
    for name, e in index.items():
        check_entry(name, e)
        if not isinstance(e.get("attrs", {}), dict) or not isinstance(e.get("parts", {}), dict):
            raise bad(f"entry {shown(name)} has attrs or parts that are not objects")
        for role, part in e.get("parts", {}).items():
            check_entry(f"{name}.{role}", part)
            if not isinstance(part.get("dataset"), str):
                raise bad(f"part {shown(role)} of {shown(name)} names no dataset")
        try:
            unit_of(name)
        except HpcLlamaError:
            raise HpcLlamaError(f"{path}: tensor {shown(name)} belongs to no part of a Llama model") from None
    return index


class H5Checkpoint(CheckpointReader):
    """A single .h5 checkpoint or a sharded directory; shards are opened only when needed.

    A sharded directory's index.json names the shard of every tensor; each name must be a plain file
    name that stays inside the directory (`base.file_inside`), checked before any shard is opened.
    """

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, H5File] = {}
        if os.path.isdir(path):
            self.format = "h5-sharded"
            if not os.path.lexists(os.path.join(path, INDEX)):
                raise HpcLlamaError(f"{path}: directory has no {INDEX}")
            index_path = file_inside(path, INDEX, path, "the checkpoint")
            try:
                with open(index_path, "rb") as f:
                    index = json.loads(f.read())
            except (ValueError, RecursionError):
                raise HpcLlamaError(f"{index_path}: corrupt index (not JSON)") from None
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                raise HpcLlamaError(f"{index_path}: not an hpc_llama checkpoint index")
            version = index.get("format_version", 0)
            if not isinstance(version, int):
                raise HpcLlamaError(f"{index_path}: corrupt index (format_version {shown(version)})")
            if version > FORMAT_VERSION:
                raise HpcLlamaError(f"{index_path}: checkpoint format is newer than this hpc_llama reads")
            self.hf_config = index.get("config")
            self._where = index.get("tensors")
            self._asset_shard = index.get("assets")
            if not isinstance(self._where, dict):
                raise HpcLlamaError(f"{index_path}: corrupt index (no tensors object)")
            # Every file the index names is checked before any is opened: the shards of the tensors,
            # the one holding the assets, and the shard list itself.
            shards = index.get("shards") or []
            if not isinstance(shards, list):
                raise HpcLlamaError(f"{index_path}: corrupt index (shards is not a list)")
            for i, fname in enumerate(shards):
                file_inside(path, fname, index_path, f"shards[{i}]")
            checked = set()
            for name, fname in self._where.items():
                if fname not in checked:
                    file_inside(path, fname, index_path, f"the entry of tensor {shown(name)}")
                    checked.add(fname)
            if self._asset_shard is not None:
                file_inside(path, self._asset_shard, index_path, "assets")
            source = f"{index_path} (config)"
        else:
            self.format = "h5"
            single = self._file(path)
            raw = single.attr(single.f, "config")
            if raw is None:
                raise HpcLlamaError(f"{path}: the checkpoint has no config attribute")
            try:
                self.hf_config = json.loads(_attr_str(raw))
            except (ValueError, RecursionError):
                raise HpcLlamaError(f"{path}: corrupt config attribute (not JSON)") from None
            self._where = dict.fromkeys(single.names(), os.path.basename(path))
            self._asset_shard = os.path.basename(path)
            source = f"{path} (config attribute)"
        for name in self._where:
            if not isinstance(name, str) or _unit(name) is None:
                raise HpcLlamaError(f"{self.path}: tensor {shown(name)} belongs to no part of a Llama model")
        self.config = model_config_from_hf(self.hf_config, source)
        self._names = sorted(self._where, key=unit_order)

    def _file(self, path: str) -> H5File:
        if path not in self._files:
            self._files[path] = H5File(path)
        return self._files[path]

    def _shard(self, name: str) -> H5File:
        if name not in self._where:
            raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
        base = self.path if self.format == "h5" else os.path.join(self.path, self._where[name])
        return self._file(base)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def read_into(self, name: str, out: torch.Tensor, verify: bool = True) -> None:
        info = self._check_out(name, out)
        self._shard(name).read_into(info, numpy_view(out), verify)

    def read_part(self, name: str, role: str, verify: bool = True) -> torch.Tensor:
        info = self.info(name)
        if role not in info.parts:
            raise HpcLlamaError(f"{self.path}: tensor {name} ({info.scheme}) has no part {role!r}: the file is corrupt")
        part = info.parts[role]
        out = empty_for(part)
        self._shard(name).read_into(part, numpy_view(out), verify)
        return out

    def assets(self) -> dict[str, bytes]:
        if not self._asset_shard:
            return {}
        base = self.path if self.format == "h5" else os.path.join(self.path, self._asset_shard)
        return self._file(base).assets()

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


# --- writing -----------------------------------------------------------------


class H5Writer:
    """Writes one file of the format; tensors are added one at a time."""

    def __init__(self, path: str, hf_config: dict, assets: dict[str, bytes] | None = None, meta: dict | None = None,
                 version: int = PLAIN_VERSION):
        from .. import __version__

        self.f = h5py.File(path, "w")
        self.f.attrs["format"] = FORMAT
        self.f.attrs["format_version"] = version
        self.f.attrs["config"] = json.dumps(hf_config, sort_keys=True)
        self.f.attrs["created_by"] = f"hpc_llama {__version__}"
        for k, v in (meta or {}).items():
            self.f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        self.tensors = self.f.create_group("tensors")
        self.index: dict[str, dict] = {}
        if assets:
            g = self.f.create_group("assets")
            for name, data in sorted(assets.items()):
                arr = np.frombuffer(data, np.uint8)
                d = g.create_dataset(name, data=arr, track_times=False)
                d.attrs["xxh3"] = checksum(arr)

    def add(self, name: str, tensor: torch.Tensor, attrs: dict | None = None,
            parts: dict[str, torch.Tensor] | None = None) -> str:
        """Store one tensor; a compressed one also gives its scheme in `attrs` and its companions in `parts`."""
        attrs = dict(attrs or {})
        # A pruned tensor is mostly zeros: a byte-shuffle + deflate filter stores
        # it in about (1 - sparsity) of its size, and any HDF5 tool still reads it.
        entry = self._dataset(name, tensor, filtered=attrs.get("scheme") == "sparse")
        for k, v in attrs.items():
            self.tensors[name].attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
        entry["attrs"] = attrs
        if parts:
            entry["parts"] = {}
            for role, t in sorted(parts.items()):
                entry["parts"][role] = {"dataset": f"{name}.{role}", **self._dataset(f"{name}.{role}", t)}
            self.tensors[name].attrs["parts"] = json.dumps({r: p["dataset"] for r, p in entry["parts"].items()})
        self.index[name] = entry
        return entry["xxh3"]

    def _dataset(self, name: str, tensor: torch.Tensor, filtered: bool = False) -> dict:
        t = tensor.detach().cpu().contiguous()
        dtype = TORCH_NAMES.get(t.dtype)
        if dtype is None:
            raise HpcLlamaError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        arr = numpy_view(t)
        extra = {}
        if filtered and arr.size:
            rows = max(1, min(arr.shape[0], (1 << 20) // max(1, arr[0].nbytes)))  # ~1 MiB chunks
            extra = dict(chunks=(rows, *arr.shape[1:]), shuffle=True, compression="gzip", compression_opts=4)
        # No timestamps: the same tensors give the same file bytes, whatever the layout that wrote them.
        d = self.tensors.create_dataset(name, data=arr, track_times=False, **extra)
        d.attrs["dtype"] = dtype
        digest = checksum(arr)
        d.attrs["xxh3"] = digest
        return {"dtype": dtype, "shape": list(arr.shape), "xxh3": digest}

    def close(self):
        # One small JSON dataset describes every tensor, so a reader learns
        # dtypes and checksums in one read instead of one per tensor.
        raw = np.frombuffer(json.dumps(self.index, sort_keys=True).encode(), np.uint8)
        d = self.f.create_dataset("index", data=raw, track_times=False)
        d.attrs["xxh3"] = checksum(raw)
        self.f.close()


def write_checkpoint(dst: str, reader: CheckpointReader, shard_bytes: int | None = None,
                     hf_config: dict | None = None) -> None:
    """Copy every tensor of `reader` into a new checkpoint at `dst` (a file, or a directory when sharded).

    Tensors are streamed one at a time; bytes are copied, never converted.
    `dst` must not exist: the caller writes to a temporary path and renames.
    """
    hf_config = hf_config or reader.hf_config
    names = reader.names()
    assets = reader.assets()
    units = group_by_unit(names)
    compressed = "hpc_llama" in hf_config or any(reader.info(n).scheme != "none" for n in names)
    version = FORMAT_VERSION if compressed else PLAIN_VERSION

    def add(w, n):  # a compressed tensor keeps its scheme and companions, bit for bit
        info = reader.info(n)
        w.add(n, reader.read(n), info.attrs, {r: reader.read_part(n, r) for r in info.parts})

    if shard_bytes is None:
        w = H5Writer(dst, hf_config, assets, version=version)
        try:
            for n in names:
                add(w, n)
        finally:
            w.close()
        return
    sizes = [sum(reader.info(n).stored_bytes for n in group) for group in units]
    plan = plan_shards(sizes, shard_bytes)
    os.makedirs(dst)
    where = {}
    for s, unit_ids in enumerate(plan):
        fname = f"model-{s + 1:05d}-of-{len(plan):05d}.h5"
        w = H5Writer(os.path.join(dst, fname), hf_config, assets if s == 0 else None, version=version)
        try:
            for u in unit_ids:
                for n in units[u]:
                    add(w, n)
                    where[n] = fname
        finally:
            w.close()
    index = {"format": FORMAT, "format_version": version, "config": hf_config,
             "assets": f"model-00001-of-{len(plan):05d}.h5" if assets else None,
             "shards": [f"model-{s + 1:05d}-of-{len(plan):05d}.h5" for s in range(len(plan))],
             "tensors": where}
    with open(os.path.join(dst, INDEX), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
