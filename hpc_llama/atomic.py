"""Outputs appear whole or not at all: written under a temporary name beside them, made durable, then renamed.

Every file or directory hpc_llama publishes goes through one of these:
`open_atomic` (a file written in one go: summaries, journals, selections),
`atomic_path` (a file or directory a writer fills: checkpoints, records in a
typed format, token shards), `publish` (a finished file moved into place).
A reader never sees half a file, and a crash leaves the old one or the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from .errors import HpcLlamaError


def check_destination(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise HpcLlamaError(f"{dst} already exists (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise HpcLlamaError(f"{parent}: output directory does not exist")


def _sync_directory(path: str) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file's bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def publish(src: str, dst: str) -> None:
    """Rename a finished file over `dst`, durably."""
    os.replace(src, dst)
    _sync_directory(os.path.dirname(os.path.abspath(dst)))


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w"):
    """A file object for `path` that becomes `path` only when the block ends without error (fsynced first)."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON at `path`, whole or not at all."""
    import json

    with open_atomic(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(dst: str, overwrite: bool = False):
    """Yield a temporary sibling path to write a file or directory into; rename it to `dst` on success.

    On any error the temporary output is removed and `dst` is left as it was.
    """
    check_destination(dst, overwrite)
    dst = os.path.abspath(dst)
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isfile(tmp):
        with open(tmp, "rb") as f:  # a writer library (h5py, pyarrow) closed it, but did not fsync it
            os.fsync(f.fileno())
    if os.path.isdir(dst) and not os.path.islink(dst):
        # A directory cannot be replaced in one rename: move the old one
        # aside first, so a failure in between still leaves one of the two.
        old = f"{tmp}.old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        _remove(old)
        _sync_directory(os.path.dirname(dst))
    else:
        publish(tmp, dst)
