"""pockengine: compile-first, sparse fine-tuning of PyTorch models where the data lives.

    trainer = pockengine.compile(model, loss_fn, example_batch, optimizer=pockengine.optim.SGD(lr=0.1))
    loss = trainer.step(batch)
"""

from pockengine import losses, optim
from pockengine.checkpoint import load
from pockengine.errors import (BatchMismatchError, CacheError, CaptureError, CheckpointError, MissingVJPError,
                               NonFiniteLossError, PockEngineError, UserInputError)
from pockengine.scheme import Scheme
from pockengine.trainer import Trainer, compile

__all__ = ["BatchMismatchError", "CacheError", "CaptureError", "CheckpointError", "MissingVJPError",
           "NonFiniteLossError", "PockEngineError", "Scheme", "Trainer", "UserInputError", "compile", "load", "losses", "optim"]
