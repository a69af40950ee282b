"""The VJP registry: one rule per ATen overload.

A rule is `rule(ctx, g) -> cotangents`, where `g` is the cotangent of the op's output (a list, with None for unused
outputs, when the op returns several tensors) and the result holds one entry per positional argument of the op:
a node, None (no gradient), or for a list argument a list of those. `ctx.node` is the forward node, `ctx.needs(a)`
says whether argument `a` needs a cotangent, and `ctx(op, *args)` emits a backward op.
"""

from __future__ import annotations

from typing import Any, Callable

VJPRule = Callable[[Any, Any], Any]
VJP: dict[Any, VJPRule] = {}


def register(*targets: Any) -> Callable[[VJPRule], VJPRule]:
    """Register `rule` as the VJP of each ATen overload in `targets` (e.g. torch.ops.aten.mm.default)."""

    def wrap(rule: VJPRule) -> VJPRule:
        for t in targets:
            VJP[t] = rule
        return rule

    return wrap
