"""Build and load pockengine's C kernels (masks.c, batch_norm.c) with the machine's C compiler, once, into the cache.

The library is compiled at first use for the machine it runs on (x86-64, AArch64...) and kept in the cache under a
hash of its source and flags, with its SHA-256 checked before each load (a damaged one is rebuilt); a missing or
failing compiler is reported once and the callers fall back to ATen compositions of the same functions. `POCKENGINE_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

from pockengine.storage import cache_dir, cached_file

SOURCES = [Path(__file__).with_name(name) for name in ("masks.c", "batch_norm.c")]
# Aliasing: the mask is applied to the floats' bits through uint32 pointers. -pthread: batch_norm.c's threads.
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-strict-aliasing", "-pthread"]
LIBRARIES = ["-lm"]


# What runs instead where the kernels cannot be built, for the warning.
FALLBACKS = ("activation masks use slower ATen ops and train-mode batch norm in channels-last layout ATen's kernels, "
             "which sum in float (less precise than eager PyTorch's contiguous kernels)")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, *LIBRARIES, platform.machine()]).encode()
                         ).hexdigest()[:16]
    # Verified before every load: a damaged library (a truncated one kills the process with SIGBUS when it is
    # mapped) is rebuilt instead.
    return cached_file(cache_dir() / "kernels" / f"masks-{key}.so",
                       lambda tmp: subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(tmp), *LIBRARIES],
                                                  check=True, capture_output=True, text=True),
                       "native kernel library")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) where they cannot be built here."""
    if os.environ.get("POCKENGINE_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(f"pockengine: no C compiler (cc, gcc or clang) found, so {FALLBACKS}; install one or set CC "
                      "to enable the native kernels", RuntimeWarning, stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"pockengine: building the native kernels with {compiler} failed, so {FALLBACKS}:\n{detail}",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.pockengine_init.argtypes = []
    lib.pockengine_pack_keep_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                                             ctypes.c_float, ctypes.c_void_p]
    lib.pockengine_apply_keep_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    for fn in (lib.pockengine_init, lib.pockengine_pack_keep_f32, lib.pockengine_apply_keep_f32):
        fn.restype = None
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.pockengine_batch_norm_f32.argtypes = [p, i64, i64, p, p, p, p, f64, f64, ctypes.c_int, p, p, p, p, p]
    lib.pockengine_batch_norm_backward_f32.argtypes = [p, p, i64, i64, p, p, p, f64, ctypes.c_int, p, p, p]
    lib.pockengine_batch_norm_f32.restype = lib.pockengine_batch_norm_backward_f32.restype = ctypes.c_int
    lib.pockengine_init()
    return lib
