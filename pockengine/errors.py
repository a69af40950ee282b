"""Every error pockengine raises on purpose; each message names the problem and the fix."""


class PockEngineError(Exception):
    """Base class of pockengine's own errors."""


class UserInputError(PockEngineError, ValueError):
    """The model, loss, batch or configuration handed to pockengine cannot be used as given."""


class CaptureError(PockEngineError):
    """torch.export could not turn the model and loss into a graph."""


class MissingVJPError(PockEngineError, NotImplementedError):
    """An op on the gradient path has no VJP rule in the registry."""


class BatchMismatchError(UserInputError):
    """A batch differs in structure or dtype from the example batch the trainer was compiled for."""


class NonFiniteLossError(PockEngineError, FloatingPointError):
    """The loss was NaN or infinite; the step was abandoned before any weight changed."""


class CompilerError(PockEngineError, RuntimeError):
    """A pass of pockengine's compiler failed or left a malformed program: a bug in pockengine, not in the model.
    The message names the pass and those before it; `disable={name}` may work around it until it is fixed."""


class CacheError(PockEngineError, OSError):
    """The cache folder cannot be created or written (converted weights, data, native kernels)."""


class CheckpointError(UserInputError):
    """A checkpoint cannot be written or read: the folder is not a checkpoint, or a file in it is damaged."""
