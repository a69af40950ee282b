"""Cache directory and atomic writes, for converted weights, data and checkpoints.

Every cache entry is written under a temporary name and renamed into place, so a
crash or a concurrent loader never sees a half-written file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["cache_dir", "atomic_path", "atomic_dir", "save_safetensors"]


def cache_dir() -> Path:
    """Return the cache directory (``$POCKENGINE_CACHE`` or ``~/.cache/pockengine``), creating it."""
    root = os.environ.get("POCKENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pockengine")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _temp_name(final: Path, suffix: str) -> Path:
    # Unique per writer; created by the writer itself so it gets the usual umask permissions (mkstemp forces 0600).
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace stays a rename; same suffix so writers like np.savez keep the name.
    tmp = _temp_name(final, final.suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; rename it to ``path`` if the block succeeds.

    With ``replace`` an existing ``path`` is swapped out (a checkpoint being overwritten): it is renamed aside
    first and deleted only once the new folder is in place. Without it, if another process published ``path``
    first, its copy is kept and ours is discarded (a cache entry).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, "")
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if replace and final.exists():
            old = _temp_name(final, ".old")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
