from pockengine.autodiff import rules  # noqa: F401  (fills the registry)
from pockengine.autodiff.engine import ChannelSlice, VJPContext, differentiate
from pockengine.autodiff.registry import VJP, VJP_BY_NAME, register, rule_for

__all__ = ["VJP", "VJP_BY_NAME", "ChannelSlice", "VJPContext", "differentiate", "register", "rule_for"]
