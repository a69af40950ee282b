"""pockengine: compile-first, sparse fine-tuning of PyTorch models where the data lives.

    trainer = pockengine.compile(model, loss_fn, example_batch, optimizer=pockengine.optim.SGD(lr=0.1))
    loss = trainer.step(batch)
"""

from pockengine import losses, optim
from pockengine.checkpoint import Checkpoint, read_checkpoint
from pockengine.errors import (BatchMismatchError, CacheError, CaptureError, CheckpointError, CompilerError,
                               MissingVJPError, NonFiniteLossError, PockEngineError, UserInputError)
from pockengine.options import Options
from pockengine.scheme import Scheme
from pockengine.trainer import Trainer, compile, load

__all__ = ["BatchMismatchError", "CacheError", "CaptureError", "Checkpoint", "CheckpointError", "CompilerError",
           "MissingVJPError", "NonFiniteLossError", "Options", "PockEngineError", "Scheme", "Trainer", "UserInputError",
           "compile", "load", "losses", "optim", "read_checkpoint"]
