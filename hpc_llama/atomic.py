"""Outputs appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil

from .errors import HpcLlamaError


def write_json_atomic(path: str, obj) -> None:
    """Write `obj` as indented JSON under a temporary name, then rename: readers never see half a file."""
    import json

    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def check_destination(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise HpcLlamaError(f"{dst} already exists (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise HpcLlamaError(f"{parent}: output directory does not exist")


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
    if os.path.isdir(dst) and not os.path.islink(dst):
        # A directory cannot be replaced in one rename: move the old one
        # aside first, so a failure in between still leaves one of the two.
        old = f"{tmp}.old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        _remove(old)
    else:
        os.replace(tmp, dst)
