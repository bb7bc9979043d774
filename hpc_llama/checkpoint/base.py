"""What every checkpoint reader offers, whatever the format on disk."""

from __future__ import annotations

import functools
import os
import re
import stat

import torch

from ..errors import HpcLlamaError
from ..model.llama import ModelConfig
from .tensors import DTYPES, TORCH_NAMES, TensorInfo, empty_for

_LAYER = re.compile(r"^layers\.(\d+)\.")


def shown(value, limit: int = 200) -> str:
    """A value a model file gave, for an error message: its repr, cut short (a file may hold megabytes there)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _roots(directory: str) -> list[str]:
    """Where a model directory's files may resolve to: the directory itself, and for a snapshot of the
    Hugging Face hub cache (models--ORG--NAME/snapshots/REV, whose files link to ../../blobs) that
    repository's blobs."""
    root = os.path.realpath(directory)
    roots = [root]
    snapshots, repo = os.path.dirname(root), os.path.dirname(os.path.dirname(root))
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        roots.append(os.path.join(repo, "blobs"))
    return roots


def file_inside(directory: str, name, source: str, entry: str) -> str:
    """The path of file `name` that `source` (an index, a config) names at `entry`, refused unless it is a
    plain file name (no directory part, no `..`) of a regular file that stays inside `directory` once
    symlinks are resolved. Nothing is opened before that is known."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name
            or os.path.basename(name) != name or os.path.isabs(name)):
        raise HpcLlamaError(f"{source}: {entry} names {shown(name)}, which is not a plain file name "
                            f"inside the model directory")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([root, real]) == root and real != root for root in _roots(directory)):
        raise HpcLlamaError(f"{source}: {entry} names {shown(name)}, a link that leads outside the model directory")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise HpcLlamaError(f"{source}: {entry} names {shown(name)}, which does not exist") from None
    if not stat.S_ISREG(mode):
        raise HpcLlamaError(f"{source}: {entry} names {shown(name)}, which is not a regular file")
    return path


def check_layers(reader: "CheckpointReader") -> None:
    """The config's layer count is the file's: layers 0..n_layers-1 each store tensors, and no other does.

    Checked at open, before anything is built per layer (a meta model, a stage plan), so a config that
    claims a billion layers costs as much as the names the file lists, not a billion modules.
    """
    stored = {unit_of(n) for n in reader.names()} - {"embed", "head"}
    n = reader.config.n_layers
    if len(stored) != n or (stored and (min(stored) != 0 or max(stored) != n - 1)):
        first = min(set(range(min(n, len(stored) + 1))) - stored, default=None)
        what = f"layer {first} stores no tensor" if first is not None else \
            f"it stores layers up to {max(stored)}"
        raise HpcLlamaError(f"{reader.path}: the model config says {n} layers, but {what}")


@functools.lru_cache(maxsize=1 << 16)  # opening a checkpoint asks this of every name several times
def unit_of(name: str):
    """The piece of the model a tensor belongs to: "embed", a layer number, or "head"."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1))
    if name.startswith("tok_embeddings."):
        return "embed"
    if name.startswith(("norm.", "output.")):
        return "head"
    raise HpcLlamaError(f"tensor {name!r} belongs to no part of a Llama model")


def group_by_unit(names: list[str]) -> list[list[str]]:
    """Consecutive names (in model order) grouped by the unit they belong to."""
    groups: list[list[str]] = []
    for n in names:
        if not groups or unit_of(groups[-1][0]) != unit_of(n):
            groups.append([])
        groups[-1].append(n)
    return groups


def unit_order(name: str) -> tuple:
    """Sort key that puts tensors in model order: embedding, layers 0..N-1, head."""
    unit = unit_of(name)
    if unit == "embed":
        return (0, 0, name)
    if unit == "head":
        return (2, 0, name)
    return (1, unit, name)


class CheckpointReader:
    """A checkpoint opened for reading; tensors are read one at a time, on demand."""

    path: str
    hf_config: dict
    config: ModelConfig
    format: str

    def names(self) -> list[str]:
        """Our names of every tensor stored, in model order."""
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def read_into(self, name: str, out: torch.Tensor, verify: bool = True) -> None:
        """Fill a contiguous CPU tensor of the stored dtype and shape; checksums are verified where stored."""
        raise NotImplementedError

    def read_pieces(self, name: str, verify: bool = True):
        """The tensor as (index, piece) pairs that fill it in order, for a consumer that transforms as it
        copies (a cast) without holding the whole tensor twice. One piece, the whole tensor, unless a format
        makes its tensors a part at a time (GGUF dequantizes a few rows at a time)."""
        yield ..., self.read(name, verify)

    def read_part(self, name: str, role: str, verify: bool = True) -> torch.Tensor:
        """A compressed tensor's companion (its `scale`, `zero`, ...); formats without compression have none."""
        raise HpcLlamaError(f"{self.path}: tensor {name} has no part {role!r}")

    def assets(self) -> dict[str, bytes]:
        """Small files carried with the model (tokenizer.json, ...)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def fingerprint(self) -> str:
        """xxh3 over the config and every tensor's name, dtype, shape and checksum.

        Formats without checksums (safetensors) contribute each tensor's file,
        offset, size and the file's modification time instead.
        """
        import json
        import os

        import xxhash

        h = xxhash.xxh3_64(json.dumps(self.hf_config, sort_keys=True).encode())
        for name in self.names():
            i = self.info(name)
            mark = i.checksum or f"{os.path.basename(i.path)}:{i.offset}:{os.stat(i.path).st_mtime_ns}"
            h.update(f"{name}|{i.dtype}|{list(i.shape)}|{mark}\n".encode())
        return h.hexdigest()

    def _check_out(self, name: str, out: torch.Tensor) -> TensorInfo:
        info = self.info(name)
        if tuple(out.shape) != info.shape or out.dtype != DTYPES[info.dtype][1]:
            raise HpcLlamaError(f"tensor {name}: stored {info.dtype}{list(info.shape)}, "
                                f"asked for {TORCH_NAMES.get(out.dtype, out.dtype)}{list(out.shape)}")
        return info

    def read(self, name: str, verify: bool = True) -> torch.Tensor:
        out = empty_for(self.info(name))
        self.read_into(name, out, verify)
        return out

    def asset(self, filename: str) -> bytes | None:
        return self.assets().get(filename)

    def has(self, name: str) -> bool:
        return name in set(self.names())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TableReader(CheckpointReader):
    """A reader whose whole tensor table is known at open (HF safetensors, GGUF): `_infos`, name -> TensorInfo."""

    _infos: dict[str, TensorInfo]

    def _set_table(self, infos: dict[str, TensorInfo]) -> None:
        self._infos = infos
        self._names = sorted(infos, key=unit_order)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise HpcLlamaError(f"{self.path}: tensor {name} is missing")
        return self._infos[name]
