"""pockengine's own ops, for what ATen does in many passes: registered as `torch.ops.pockengine.*`, with C kernels
built at first use (native.py) and ATen compositions where those cannot run."""

from pockengine.kernels.masks import APPLY_KEEP_, PACK_KEEP

__all__ = ["APPLY_KEEP_", "PACK_KEEP"]
