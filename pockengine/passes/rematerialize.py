"""Recompute values derived from weights alone in the backward pass instead of keeping them from the forward pass.

A value computed from parameters, buffers and constants only by cheap element-wise ops (a convolution weight with
a frozen BatchNorm folded in) is as large as a weight, and one kept from the forward to the backward pass adds
that much to the saved memory, for every layer the backward pass crosses. Recomputing it right before its first
backward use costs one or two element-wise ops on a weight and frees it again right after that use. The forward
pass keeps its own copy, which now dies as soon as the forward op has read it.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from pockengine.ir.graph import BUFFER, CONST, PARAM, Graph, Node

aten = torch.ops.aten

CHEAP = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default, aten.rsqrt.default,
    aten.sqrt.default, aten.view.default, aten.reshape.default, aten.permute.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.expand.default,
}


def rematerialize_weight_values(graph: Graph) -> Graph:
    derived: set[Node] = {n for n in graph.inputs() if n.role in (PARAM, BUFFER, CONST)}
    for n in graph.nodes:
        if (not n.is_input and n.section in ("forward", "loss") and n.target in CHEAP and n.inputs
                and all(i in derived for i in n.inputs)):
            derived.add(n)
    users = graph.users()
    for n in [n for n in graph.nodes if n in derived and not n.is_input]:
        late = [u for u in users[n] if u.section == "backward"]
        if not late:
            continue
        first = min(late, key=graph.nodes.index)
        emit = graph.emitter(graph.nodes[graph.nodes.index(first) - 1], first.module, "backward")
        copies: dict[Node, Node] = {}

        def recompute(v: Node) -> Node:
            if v.is_input:
                return v
            if v not in copies:
                args, kwargs = tree_map(lambda a: recompute(a) if isinstance(a, Node) else a, (v.args, v.kwargs))
                copies[v] = emit(v.target, *args, **kwargs)
            return copies[v]

        again = recompute(n)
        for u in late:
            u.args, u.kwargs = tree_map(lambda a: again if a is n else a, (u.args, u.kwargs))
    return graph
