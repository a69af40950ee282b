"""Cache directory, durable atomic writes and checksums, for converted weights, data, kernels and checkpoints.

Every file pockengine writes and later trusts is written under a temporary name, flushed to disk (fsync), renamed
into place, and recorded with its SHA-256 and size: a cache file in a sidecar `<file>.sha256`, a folder in its
`pockengine-manifest.json`. A reader verifies before it uses anything, so a crash, a full disk or bytes changed
later are found instead of loaded: a damaged cache entry is rebuilt, a damaged checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pockengine.errors import CacheError

__all__ = ["cache_dir", "atomic_path", "atomic_dir", "save_safetensors", "file_digest",
           "fsync_dir", "flush_folder", "cached_file", "write_manifest", "manifest_problems", "MANIFEST"]

MANIFEST = "pockengine-manifest.json"
_SIDECAR = ".sha256"
_UMASK = os.umask(0)
os.umask(_UMASK)
USUAL_FILE_MODE = 0o666 & ~_UMASK  # what open() would give: safetensors' writer gives 0600, mkstemp too


def cache_dir() -> Path:
    """Return the cache directory (``$POCKENGINE_CACHE`` or ``~/.cache/pockengine``), creating it."""
    root = os.environ.get("POCKENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pockengine")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create the cache folder {path}: {type(e).__name__}: {e}; set POCKENGINE_CACHE to "
                         "a writable folder") from e
    return path


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path, suffix: str = "") -> Path:
    """A hidden sibling of `final` unique to this writer: `.<name>.<pid>.<random>.tmp<suffix>`."""
    # Created by the writer itself so it gets the usual umask permissions (mkstemp forces 0600).
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{suffix}")


def writer_alive(temp: Path) -> bool:
    """Whether the process that named `temp` `.<name>.<pid>.<random>.<kind>` (as `temp_name` does without a
    suffix) may still be writing it."""
    try:
        pid = int(temp.name.split(".")[-3])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; flush it and rename it onto ``path`` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace stays a rename; same suffix so writers like np.savez keep the name.
    tmp = temp_name(final, final.suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, USUAL_FILE_MODE)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR)


def _record(path: Path) -> str:
    return f"{file_digest(path)} {path.stat().st_size}\n"


def _verified(path: Path) -> bool:
    try:
        expected = _sidecar(path).read_text().split()
        return len(expected) == 2 and int(expected[1]) == path.stat().st_size and expected[0] == file_digest(path)
    except (OSError, ValueError):
        return False


def cached_file(path: str | os.PathLike[str], build: Callable[[Path], None], what: str) -> Path:
    """Return `path` once it holds a verified cache entry, calling ``build(temporary path)`` to (re)write it.

    An entry whose bytes do not match its recorded SHA-256 and size (truncated, zeroed, changed, or written by a
    pockengine that kept no checksum) is rebuilt with a warning naming it, never used.
    """
    final = Path(path)
    if _verified(final):
        return final
    if final.exists():
        warnings.warn(f"pockengine: the cached {what} {final} does not match its recorded checksum (damaged or "
                      "unverified); rebuilding it", RuntimeWarning, stacklevel=3)
    tmp = temp_name(final, final.suffix)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        build(tmp)
        record = _record(tmp)
        _fsync_file(tmp)
        os.replace(tmp, final)
        # The entry is published before its checksum: a crash in between leaves an entry without one, rebuilt.
        with atomic_path(_sidecar(final)) as side:
            side.write_text(record)
    except OSError as e:
        raise CacheError(f"cannot write the cached {what} {final}: {type(e).__name__}: {e}; set POCKENGINE_CACHE "
                         "to a writable folder with free space") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def flush_folder(folder: Path) -> list[Path]:
    """Flush every file under `folder` (written by us, before it is renamed into place) and its entries to disk,
    each file readable as the user's other files are; returns the files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        _fsync_file(p)
        os.chmod(p, USUAL_FILE_MODE)
    fsync_dir(folder)
    return files


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 and size of every file under `folder` in its manifest (written last, flushed)."""
    files = [p for p in flush_folder(folder) if p.name != MANIFEST]
    entries = {p.relative_to(folder).as_posix(): {"sha256": file_digest(p), "size": p.stat().st_size} for p in files}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": entries, "sha256": _entries_digest(entries)}, indent=1))
    _fsync_file(manifest)
    fsync_dir(folder)


def _entries_digest(entries: dict[str, Any]) -> str:
    # The manifest's own checksum: a damaged manifest is reported as such, not as damage to the files it lists.
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def manifest_problems(folder: Path) -> list[str]:
    """What is wrong with `folder` against its manifest (nothing: an empty list)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
        if not isinstance(entries, dict) or manifest.get("sha256") != _entries_digest(entries):
            raise ValueError("its recorded checksum does not match its content")
    except FileNotFoundError:
        return [f"{folder / MANIFEST} is missing"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        return [f"{folder / MANIFEST} is unreadable or damaged ({type(e).__name__}: {e})"]
    problems = []
    for name, entry in entries.items():
        p = folder / name
        try:
            size = p.stat().st_size
            if size != entry["size"]:
                problems.append(f"{p} has {size} bytes, {entry['size']} were written")
            elif file_digest(p) != entry["sha256"]:
                problems.append(f"{p} does not match its SHA-256 (its bytes changed after it was written)")
        except FileNotFoundError:
            problems.append(f"{p} is missing")
        except (OSError, TypeError, KeyError) as e:
            problems.append(f"{p} is unreadable ({type(e).__name__}: {e})")
    return problems


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; write its manifest and rename it to ``path`` if the block
    succeeds. If another process published ``path`` first, its copy is kept and ours is discarded (a cache entry).
    Read it back only if `manifest_problems(path)` is empty."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
