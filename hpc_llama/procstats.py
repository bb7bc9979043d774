"""This process's I/O and memory, from /proc (Linux); None where it is not available."""

from __future__ import annotations


def _field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def bytes_read() -> int | None:
    """Bytes this process has asked read()/pread() for so far (rchar), page cache or not."""
    return _field("/proc/self/io", "rchar")


def peak_rss() -> int | None:
    """Peak resident memory in bytes (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    kb = _field("/proc/self/status", "VmHWM")
    return None if kb is None else kb * 1024

