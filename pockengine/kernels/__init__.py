"""pockengine's own ops, for what ATen does in many passes: registered as `torch.ops.pockengine.*`, with C kernels
built at first use (native.py) and ATen compositions where those cannot run."""

from pockengine.kernels import cross_entropy, ctc, masks  # noqa: F401  (ctc: registers its ops)
from pockengine.kernels.attention import FLASH_UNMASKED_IF, FLASH_UNMASKED_IF_BACKWARD, MASKED_COMPOSITIONS
from pockengine.kernels.batch_norm import ATEN_EQUIVALENTS, BATCH_NORM, BATCH_NORM_BACKWARD, BATCH_NORM_NO_STATS
from pockengine.kernels.cross_entropy import LINEAR_CROSS_ENTROPY
from pockengine.kernels.masks import APPLY_KEEP_, PACK_KEEP

# Ops that allocate memory of their own while they run (freed before they return), for the memory plan: the op ->
# its bytes at most, from the op's arguments (meta tensors).
WORKSPACE = {LINEAR_CROSS_ENTROPY: cross_entropy.workspace_bytes}

# Ops a compiler traces as ATen ops instead of calling (Inductor): the C kernels' compositions (fused with their
# neighbours; functionalization also refuses a custom op returning an alias of its input), the run-time attention
# choice as its masked form (a traced graph cannot branch on a value).
ATEN_COMPOSITIONS = {**masks.ATEN_COMPOSITIONS, **ATEN_EQUIVALENTS, **MASKED_COMPOSITIONS}

__all__ = ["APPLY_KEEP_", "ATEN_COMPOSITIONS", "BATCH_NORM", "BATCH_NORM_BACKWARD", "BATCH_NORM_NO_STATS",
           "FLASH_UNMASKED_IF", "FLASH_UNMASKED_IF_BACKWARD", "LINEAR_CROSS_ENTROPY", "PACK_KEEP", "WORKSPACE"]
