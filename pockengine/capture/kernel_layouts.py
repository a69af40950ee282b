"""Views of a value whose strides the kernels may not follow become `reshape`.

torch.export records `x.reshape(...)` as a `view` wherever the fake tensor's strides allow one. The fake strides
of an op's output are its meta function's, and a kernel may lay its output out otherwise: ATen's batch norm on the
CPU (`_native_batch_norm_legit_no_training`, `_native_batch_norm_legit`) returns a contiguous tensor for a
transposed input, whose strides its meta function keeps. PatchTST normalizes `x.transpose(1, 2)` with
`nn.BatchNorm1d` and transposes back; the program's view of the result then fails when it runs ("view size is not
compatible with input tensor's size and stride"), in pockengine and in the exported program alike.

A contiguous output is the layout every kernel agrees on. So a view is turned into `reshape` (the same view where
the real strides allow one, a copy where not; the graph is functional, so nothing writes through either) when the
value it reads comes, through views only, from an op whose fake output is not contiguous.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from pockengine.ir.ops import STRICT_VIEWS

aten = torch.ops.aten


def _is_alias(n: Node) -> bool:
    """Whether `n`'s output is a view of its first argument (the schema's alias annotation, writes excluded)."""
    target = n.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    return any(r.alias_info is not None for r in target._schema.returns)


def views_tolerate_kernel_layouts(gm: GraphModule) -> None:
    uncertain: set[Node] = set()  # values whose real strides may differ from the fake ones
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if _is_alias(n):
            if isinstance(n.args[0], Node) and n.args[0] in uncertain:
                uncertain.add(n)
                if n.target in STRICT_VIEWS:
                    n.target = aten.reshape.default
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 1 and not val.is_contiguous():
            uncertain.add(n)
    gm.recompile()
