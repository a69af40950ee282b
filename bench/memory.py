"""Peak training memory of a process, the same way for every system (no torch import: ort_worker.py loads this
file by path in .venv-ort).

After warm-up the kernel's resident high-water mark is reset (`echo 5 > /proc/PID/clear_refs`), VmRSS is read, the
measured steps run, and VmHWM is read: the largest resident set during those steps. glibc keeps freed blocks
resident, which hides the peak; with MALLOC_MMAP_THRESHOLD_=65536 in the environment large blocks come from mmap and
go back to the OS when freed, so VmHWM follows the live memory (the runner sets it in the memory pass only, since it
slows steps down).
"""

from __future__ import annotations

import os

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status figure in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_kb(pid: int | None = None) -> int:
    return _status(pid or os.getpid(), "VmRSS")


def hwm_kb(pid: int | None = None) -> int:
    return _status(pid or os.getpid(), "VmHWM")


def reset_peak(pid: int | None = None) -> int:
    """Reset the resident high-water mark of `pid` to its current RSS; returns that RSS in KiB."""
    with open(f"/proc/{pid or os.getpid()}/clear_refs", "w") as f:
        f.write("5")
    return rss_kb(pid)


def trim() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so an idle process holds only live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
