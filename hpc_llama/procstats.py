"""This process's I/O, memory and age, from /proc (Linux); None where it is not available."""

from __future__ import annotations

import os
import time


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


def available_memory() -> int | None:
    """Bytes the machine can still give processes without swapping (MemAvailable)."""
    kb = _field("/proc/meminfo", "MemAvailable")
    return None if kb is None else kb * 1024


def peak_rss() -> int | None:
    """Peak resident memory in bytes (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    kb = _field("/proc/self/status", "VmHWM")
    return None if kb is None else kb * 1024



def seconds_since_start() -> float | None:
    """Seconds since this process started, interpreter start and imports included (10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22, starttime: clock ticks after boot (CLOCK_BOOTTIME). The command name before it is in
            # parentheses and may hold spaces, so the fields are counted from its closing one.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return round(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no CLOCK_BOOTTIME (not Linux)
        return None
