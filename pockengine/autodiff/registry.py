"""The VJP registry: one rule per ATen overload (or per op of a library outside PyTorch, by name).

A rule is `rule(ctx, g) -> cotangents`, where `g` is the cotangent of the op's output (a list, with None for unused
outputs, when the op returns several tensors) and the result holds one entry per positional argument of the op:
a node, None (no gradient), or for a list argument a list of those. `ctx.node` is the forward node, `ctx.needs(a)`
says whether argument `a` needs a cotangent, and `ctx(op, *args)` emits a backward op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch

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
# Ops that a library outside PyTorch defines exist only once it is imported (transformers' grouped matmul of
# mixture-of-experts layers), and pockengine imports no such library: their rules are keyed by the overload's name
# ("transformers.grouped_mm_fallback.default") and found by `rule_for` when the op shows up in a graph.
VJP_BY_NAME: dict[str, VJPRule] = {}


def register(*targets: Any) -> Callable[[VJPRule], VJPRule]:
    """Register `rule` as the VJP of each overload in `targets`: an ATen overload (torch.ops.aten.mm.default), or
    the name of another library's overload as `str(overload)` writes it ("transformers.grouped_mm_fallback.default")."""

    def wrap(rule: VJPRule) -> VJPRule:
        for t in targets:
            if isinstance(t, str):
                VJP_BY_NAME[t] = rule
            else:
                VJP[t] = rule
        return rule

    return wrap


def rule_for(target: Any) -> VJPRule | None:
    """The VJP rule of an op (a graph node's target), or None."""
    rule = VJP.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = VJP_BY_NAME.get(str(target))
    return rule
