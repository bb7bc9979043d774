"""Outputs appear whole or not at all, belong to one job, and are never written through a link.

Every file or directory hpc_llama publishes goes through one of these:
`open_atomic` (a file written in one go: summaries, journals, selections),
`atomic_path` (a file or directory a writer fills: checkpoints, records in a
typed format, token shards), `publish` (a finished file moved into place).
Temporary files live in a private directory (mkdtemp: a fresh, unpredictable
name only this process can write in) beside the output, so nothing planted
beside the output can redirect a write, and a rename publishes the result.
`OutputLock` makes one output belong to one running job. A reader never sees
half a file, and a crash leaves the old one or the new one; what a killed job
left behind is removed by the next job on the same output (see `sweep`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import tempfile
import time

from .errors import HpcLlamaError


def check_destination(dst: str, overwrite: bool) -> None:
    """`dst` may be written: absent (or replaceable with --overwrite), a regular file or directory if present,
    in a directory that exists."""
    if os.path.lexists(dst):
        if not overwrite:
            raise HpcLlamaError(f"{dst} already exists (use --overwrite to replace it)")
        mode = os.lstat(dst).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise HpcLlamaError(f"{dst} is not a regular file: refusing to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise HpcLlamaError(f"{parent}: output directory does not exist")


def check_not_an_input(dst: str, inputs, what: str = "an input") -> None:
    """Refuse an output that is, contains, or would replace one of `inputs` (files or directories),
    links resolved: --overwrite must never destroy what the job reads."""
    out = os.path.realpath(dst)
    for path in inputs:
        src = os.path.realpath(path)
        if out == src or src.startswith(out + os.sep):
            raise HpcLlamaError(f"{dst} is {what} of this job ({path}): refusing to write over it")
        if os.path.isdir(src) and out.startswith(src + os.sep) and os.path.lexists(out):
            raise HpcLlamaError(f"{dst} is a file of {what} of this job ({path}): refusing to write over it")


def open_regular(path: str, flags: int) -> int:
    """os.open for a side file at a fixed name: never through a link, and only a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HpcLlamaError(f"{path} is a symbolic link: refusing to read or write through it") from None
        raise HpcLlamaError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HpcLlamaError(f"{path} is not a regular file: refusing to use it")
    return fd


def fsync_path(path: str) -> None:
    """Make a file's bytes, or a directory's entries (a rename in it), durable.

    A file that cannot be synced is an error; a directory that cannot is not: some file systems do not
    fsync directories, and a rename in them is still atomic.
    """
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def publish(src: str, dst: str) -> None:
    """Rename a finished file over `dst`, durably. A link at `dst` is replaced, never followed."""
    os.replace(src, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))


def _private_dir(dst: str) -> str:
    """A fresh directory beside `dst` that only this process writes in (mode 0700, unpredictable name)."""
    dst = os.path.abspath(dst)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))


def sweep(dst: str) -> list[str]:
    """Remove what killed jobs on `dst` left behind (their private directories); returns what was removed.

    Only for the holder of dst's OutputLock: no other live job writes there.
    """
    dst = os.path.abspath(dst)
    prefix = f".{os.path.basename(dst)}.partial-"
    parent = os.path.dirname(dst)
    gone = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _write_error(e: OSError, path: str) -> HpcLlamaError:
    return HpcLlamaError(f"{path}: {e.strerror or e} (while writing it)")


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w"):
    """A file object for `path` that becomes `path` only when the block ends without error (fsynced first)."""
    path = os.path.abspath(path)
    private = _private_dir(path)
    tmp = os.path.join(private, os.path.basename(path))
    try:
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, path)
        except OSError as e:
            raise _write_error(e, path) from None
    finally:
        shutil.rmtree(private, ignore_errors=True)


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
    """Yield a path to write a file or directory into; it is renamed to `dst` when the block succeeds.

    The path lies in a private directory beside `dst`. On any error it is
    removed and `dst` is left as it was; a kill leaves the private directory
    for the next job on `dst` to sweep.
    """
    check_destination(dst, overwrite)
    dst = os.path.abspath(dst)
    private = _private_dir(dst)
    tmp = os.path.join(private, os.path.basename(dst))
    try:
        try:
            yield tmp
        except OSError as e:
            raise _write_error(e, dst) if e.filename is None else e from None
        if os.path.isfile(tmp):
            fsync_path(tmp)  # a writer library (h5py, pyarrow) closed it, but did not fsync it
        if os.path.isdir(dst) and not os.path.islink(dst):
            # A directory cannot be replaced in one rename: move the old one
            # aside (into the private directory) first, so a failure in between
            # still leaves one of the two.
            old = os.path.join(private, ".old")
            os.rename(dst, old)
            os.rename(tmp, dst)
            fsync_path(os.path.dirname(dst))
        else:
            publish(tmp, dst)
    finally:
        shutil.rmtree(private, ignore_errors=True)


class OutputLock:
    """One output belongs to one running job: an advisory lock on OUT.lock, held while the job runs.

    A second job on the same output is refused at once, naming the holder. The
    kernel drops the lock when its holder exits or dies (SIGKILL included), so a
    killed job never blocks the next one. POSIX record locks (fcntl) are used:
    on NFS they go through the lock manager (NFSv4, or NFSv3 with lockd), on
    Lustre they need the `flock` mount option; where the file system has no
    locks the job is refused, unless HPC_LLAMA_NO_LOCK=1 says one job per
    output is the user's own care (docs/errors.md).
    """

    held: set = set()  # this process's locks, for run_guarded to let go before it ends the job

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.abspath(out) + ".lock"
        self.fd = None

    def acquire(self) -> OutputLock:
        if os.environ.get("HPC_LLAMA_NO_LOCK") == "1":
            return self
        for _ in range(10):  # the file was replaced between open and lock: try again on the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise HpcLlamaError(f"{self.path} is a symbolic link: refusing to use it as the lock of "
                                        f"{self.out}") from None
                raise HpcLlamaError(f"{self.path}: {e.strerror} (the lock file of {self.out})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise HpcLlamaError(f"{self.path} is not a regular file: refusing to use it as a lock")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise HpcLlamaError(f"{self.out} is being written by another job ({holder}): wait for it "
                                        f"to end, or write to another output") from None
                raise HpcLlamaError(f"{self.path}: the file system does not lock files ({e.strerror}); set "
                                    f"HPC_LLAMA_NO_LOCK=1 to run without the lock (then one job per output "
                                    f"is up to you)") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stamp = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode(), 0)
            self.fd = fd
            OutputLock.held.add(self)
            return self
        raise HpcLlamaError(f"{self.path}: keeps being replaced while this job locks it")

    def release(self) -> None:
        """Remove the lock file and let go (removed while held, so no one takes a lock on a dead file)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        OutputLock.held.discard(self)

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls.held):
            lock.release()

    def __enter__(self) -> OutputLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output(out: str, inputs=(), overwrite: bool = False) -> OutputLock:
    """Before a job writes anything: `out` is free to write (check_destination), is none of the job's
    `inputs`, and becomes this job's (its lock); what a killed job on it left behind is swept away."""
    check_destination(out, overwrite)
    check_not_an_input(out, inputs)
    lock = OutputLock(out).acquire()
    sweep(out)
    return lock
