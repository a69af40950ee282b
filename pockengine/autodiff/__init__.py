from pockengine.autodiff import rules  # noqa: F401  (fills the registry)
from pockengine.autodiff.engine import ChannelSlice, VJPContext, differentiate
from pockengine.autodiff.registry import VJP, register

__all__ = ["VJP", "ChannelSlice", "VJPContext", "differentiate", "register"]
