"""The hpc_llama HDF5 checkpoint: one file, or a directory of shards plus an index.

The layout is specified in docs/checkpoint.md. Tensors are keyed by global
parameter name, so any rank reads its own slice at any pipeline degree; they
are stored contiguous and unfiltered so a slice is read with one pread per
tensor at a known offset, hashed while it is still in cache.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import torch

from ..errors import HpcLlamaError
from ..parallel.layout import plan_shards
from .base import CheckpointReader, group_by_unit, unit_order
from .hf import model_config_from_hf
from .tensors import DTYPES, TORCH_NAMES, TensorInfo, checksum, empty_for, new_hasher, numpy_view, read_exact

FORMAT = "hpc_llama.checkpoint"
FORMAT_VERSION = 2
"""The newest version this code reads. Files without compressed tensors are still written as 1."""
PLAIN_VERSION = 1
INDEX = "index.json"
# Storage schemes this version reads (docs/checkpoint.md); any other is refused, not misread.
SCHEMES = ("none", "sparse", "int8-channel", "int4-group")


def _attr_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class H5File:
    """One HDF5 file of the format (a whole checkpoint or one shard)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except FileNotFoundError:
            raise HpcLlamaError(f"{path}: no such file") from None
        except OSError as e:
            reason = "truncated" if "truncated" in str(e) else "not a readable HDF5 file"
            raise HpcLlamaError(f"{path}: {reason} ({str(e).split('(')[0].strip()})") from None
        fmt = _attr_str(self.f.attrs.get("format", ""))
        if fmt != FORMAT:
            raise HpcLlamaError(f"{path}: not an hpc_llama checkpoint (format attribute {fmt!r})")
        version = int(self.f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise HpcLlamaError(f"{path}: checkpoint format {version} is newer than this hpc_llama reads ({FORMAT_VERSION})")
        self._fd = None
        self._index = None
        self._infos: dict[str, TensorInfo] = {}
        self._group = None

    def _entries(self) -> dict[str, dict]:
        """name -> {dtype, shape, xxh3, attrs}: from the /index dataset in one read, else from each dataset."""
        if self._index is None:
            stored = list(self.f["tensors"].keys()) if "tensors" in self.f else []
            if "index" in self.f:
                raw = self.f["index"][()].tobytes()
                if checksum(np.frombuffer(raw, np.uint8)) != _attr_str(self.f["index"].attrs.get("xxh3", "")):
                    raise HpcLlamaError(f"{self.path}: checksum mismatch in the tensor index: the file is corrupt")
                self._index = json.loads(raw)
                listed = set(self._index) | {p["dataset"] for e in self._index.values()
                                             for p in e.get("parts", {}).values()}
                present = set(stored)
                for name in stored:
                    if name not in listed:
                        raise HpcLlamaError(f"{self.path}: tensor {name} is stored but not in the index: the file is corrupt")
                for name in listed:
                    if name not in present:
                        raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
            else:
                self._index = {}
                for name in stored:
                    d = self.f["tensors"][name]
                    attrs = {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v) for k, v in d.attrs.items()}
                    self._index[name] = {"dtype": attrs.pop("dtype", str(d.dtype)), "shape": list(d.shape),
                                         "xxh3": attrs.pop("xxh3", None), "attrs": attrs}
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
            self._group = self.f["tensors"].id
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
        d = h5py.h5d.open(self._group, name.encode())
        offset = d.get_offset()  # None unless contiguous (filters need chunks)
        shape = tuple(entry["shape"])
        if d.shape != shape:
            raise HpcLlamaError(f"{self.path}: tensor {name} disagrees with the index: the file is corrupt")
        itemsize = np.dtype(DTYPES[entry["dtype"]][0]).itemsize if entry["dtype"] in DTYPES else d.dtype.itemsize
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        disk = d.get_storage_size() if offset is None else None
        return TensorInfo(name, shape, entry["dtype"], nbytes, self.path, offset, entry.get("xxh3")), disk

    def read_into(self, info: TensorInfo, out: np.ndarray, verify: bool) -> None:
        scheme = info.scheme
        if scheme not in SCHEMES:
            raise HpcLlamaError(f"{self.path}: tensor {info.name} is stored as {scheme!r}, "
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
                self.f["tensors"][info.name].read_direct(out)
            except OSError as e:
                raise HpcLlamaError(f"{self.path}: cannot read tensor {info.name}: {e}") from None
            if hasher is not None:
                hasher.update(out.reshape(-1).view(np.uint8))
        if hasher is not None and hasher.hexdigest() != info.checksum:
            raise HpcLlamaError(f"{self.path}: checksum mismatch in tensor {info.name} (stored {info.checksum}, "
                                f"read {hasher.hexdigest()}): the file is corrupt")

    def assets(self) -> dict[str, bytes]:
        out = {}
        for name, d in (self.f["assets"].items() if "assets" in self.f else []):
            data = d[()].tobytes()
            if checksum(np.frombuffer(data, np.uint8)) != _attr_str(d.attrs.get("xxh3", "")):
                raise HpcLlamaError(f"{self.path}: checksum mismatch in asset {name}: the file is corrupt")
            out[name] = data
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.f.close()


class H5Checkpoint(CheckpointReader):
    """A single .h5 checkpoint or a sharded directory; shards are opened only when needed."""

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, H5File] = {}
        if os.path.isdir(path):
            self.format = "h5-sharded"
            index_path = os.path.join(path, INDEX)
            try:
                with open(index_path) as f:
                    index = json.load(f)
            except FileNotFoundError:
                raise HpcLlamaError(f"{path}: directory has no {INDEX}") from None
            except ValueError:
                raise HpcLlamaError(f"{index_path}: corrupt index (not JSON)") from None
            if index.get("format") != FORMAT:
                raise HpcLlamaError(f"{index_path}: not an hpc_llama checkpoint index")
            if int(index.get("format_version", 0)) > FORMAT_VERSION:
                raise HpcLlamaError(f"{index_path}: checkpoint format is newer than this hpc_llama reads")
            self.hf_config = index["config"]
            self._where = index["tensors"]
            self._asset_shard = index.get("assets")
        else:
            self.format = "h5"
            single = self._file(path)
            self.hf_config = json.loads(_attr_str(single.f.attrs["config"]))
            self._where = {n: os.path.basename(path) for n in single.names()}
            self._asset_shard = os.path.basename(path)
        self.config = model_config_from_hf(self.hf_config)
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
