"""The VJP registry: one rule per ATen overload.

A rule is `rule(ctx, g) -> cotangents`, where `g` is the cotangent of the op's output (a list, with None for unused
outputs, when the op returns several tensors) and the result holds one entry per positional argument of the op:
a node, None (no gradient), or for a list argument a list of those. `ctx.node` is the forward node, `ctx.needs(a)`
says whether argument `a` needs a cotangent, and `ctx(op, *args)` emits a backward op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

if TYPE_CHECKING:
    from pockengine.autodiff.engine import VJPContext
    from pockengine.ir.graph import Node

Cotangent = Union["Node", None]
# The cotangent the op's output receives: a node, or for an op with several outputs one entry per output.
OutputCotangent = Union["Node", list[Cotangent]]
# What a rule returns: one entry per positional argument of the op, a list of entries for a list argument.
InputCotangents = Sequence[Union[Cotangent, Sequence[Cotangent]]]
VJPRule = Callable[["VJPContext", OutputCotangent], InputCotangents]
VJP: dict[Any, VJPRule] = {}  # ATen overload (torch.ops.aten.<op>.<overload>) -> its rule


def register(*targets: Any) -> Callable[[VJPRule], VJPRule]:
    """Register `rule` as the VJP of each ATen overload in `targets` (e.g. torch.ops.aten.mm.default)."""

    def wrap(rule: VJPRule) -> VJPRule:
        for t in targets:
            VJP[t] = rule
        return rule

    return wrap
