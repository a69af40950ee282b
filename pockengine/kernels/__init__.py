"""pockengine's own ops, for what ATen does in many passes: registered as `torch.ops.pockengine.*`, with C kernels
built at first use (native.py) and ATen compositions where those cannot run."""

from pockengine.kernels import cross_entropy
from pockengine.kernels.cross_entropy import LINEAR_CROSS_ENTROPY
from pockengine.kernels.masks import APPLY_KEEP_, PACK_KEEP

# Ops that allocate memory of their own while they run (freed before they return), for the memory plan: the op ->
# its bytes at most, from the op's arguments (meta tensors).
WORKSPACE = {LINEAR_CROSS_ENTROPY: cross_entropy.workspace_bytes}

__all__ = ["APPLY_KEEP_", "LINEAR_CROSS_ENTROPY", "PACK_KEEP", "WORKSPACE"]
