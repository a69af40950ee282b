"""Capture in a child process (`compile(..., capture_process="fork")`): torch.export's garbage never enters the
training process.

Exporting MobileNetV2 creates hundreds of thousands of short-lived Python and C++ objects; the few that outlive it
(the IR, torch's caches) pin the heap pages between them, and the process keeps ~12 MB more resident memory than it
holds (docs/memory.md). Here a forked child (the model shared copy-on-write) exports and converts, and sends back
only pockengine's IR, pickled; the parent process never allocates the export's objects.

Where that cannot work the capture runs in this process, as without the option: no `os.fork` (not POSIX), CUDA
already initialized (a forked child cannot use it), a capture holding custom `autograd.Function` records (their
contexts belong to the process that ran them), or a child that fails for any reason (an error in the model is then
raised by the in-process capture, with its usual message). What the capture changes in the model during export
(a module that rescales its weights on its first forward pass) stays in the child.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable

import torch
from torch import nn

from pockengine.capture.export import Captured, capture


def _operator(namespace: str, name: str, overload: str) -> torch._ops.OpOverload:
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


class _Pickler(pickle.Pickler):
    """Operators by name (their objects wrap C++ functions pickle cannot copy)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch._ops.OpOverload):
            return _operator, (obj.namespace, obj._opname, obj._overloadname)
        return NotImplemented


def _dumps(captured: Captured) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(captured)
    return buffer.getvalue()


def capture_in_child(model: nn.Module, loss_fn: Callable, batch: Any) -> Captured | None:
    """The capture made by a forked child process, or None where it cannot be (see the module's docstring)."""
    if not hasattr(os, "fork") or torch.cuda.is_initialized():
        return None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: export, send the IR, exit without running the parent's exit handlers
        os.close(read)
        status = 1
        try:
            # OpenMP's thread pool does not survive fork: the parent's workers are gone, and the first parallel op
            # of the child (capture runs the model eagerly to record its branches on values) would wait for them
            # forever. The child computes little; one thread is enough.
            torch.set_num_threads(1)
            captured = capture(model, loss_fn, batch)
            if not captured.function_calls:
                with os.fdopen(write, "wb") as f:
                    f.write(_dumps(captured))
                status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return None
    return pickle.loads(data)
