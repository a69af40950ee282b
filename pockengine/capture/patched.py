"""One attribute of torch or of a library replaced for the length of a block: how the capture's tracing contexts
(pockengine/capture/export.py, `_tracing_contexts`) make torch.export see what it can trace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` inside the block and what it was again after it, however the block ends."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
