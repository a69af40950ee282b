"""pockengine: compile-first, sparse fine-tuning of PyTorch models where the data lives.

    trainer = pockengine.compile(model, loss_fn, example_batch, optimizer=pockengine.optim.SGD(lr=0.1))
    loss = trainer.step(batch)

The names below are imported on first use (PEP 562), so that `pockengine.runtime` (training with an exported step
on onnxruntime alone) and `pockengine.errors` import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pockengine.errors import (BatchMismatchError, CacheError, CaptureError, CheckpointError, CompilerError,
                               MissingVJPError, NonFiniteLossError, PockEngineError, UserInputError)

if TYPE_CHECKING:
    from pockengine import data, losses, models, optim
    from pockengine.checkpoint import Checkpoint, read_checkpoint
    from pockengine.options import Options
    from pockengine.scheme import Scheme
    from pockengine.trainer import Trainer, compile, load

_LAZY = {"losses": "pockengine.losses", "optim": "pockengine.optim", "models": "pockengine.models",
         "data": "pockengine.data", "Checkpoint": "pockengine.checkpoint", "read_checkpoint": "pockengine.checkpoint",
         "Options": "pockengine.options", "Scheme": "pockengine.scheme", "Trainer": "pockengine.trainer",
         "compile": "pockengine.trainer", "load": "pockengine.trainer"}

__all__ = ["BatchMismatchError", "CacheError", "CaptureError", "Checkpoint", "CheckpointError", "CompilerError",
           "MissingVJPError", "NonFiniteLossError", "Options", "PockEngineError", "Scheme", "Trainer", "UserInputError",
           "compile", "data", "load", "losses", "models", "optim", "read_checkpoint"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pockengine' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"pockengine.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
