"""Recompute cheap values in the backward pass instead of keeping them from the forward pass.

A forward value that the backward pass reads must stay in memory from the forward pass until then. When it is a
cheap element-wise op away from values that stay anyway (or a short chain of them away from the weights), recomputing it right before its first backward
use trades that memory for those ops:

- values computed from weights alone (a convolution weight with a frozen BatchNorm folded in) are as large as a
  weight, once per layer the backward pass crosses;
- an activation of a value the backward pass keeps anyway (SmolLM2's `silu(gate)`, next to `gate` which the SiLU
  backward reads) is as large as that value.

The recomputed value is freed right after its backward use; the forward pass keeps its own copy only while it
needs it.
"""

from __future__ import annotations

from torch.utils._pytree import tree_map

from pockengine.ir.graph import BUFFER, CONST, PARAM, Graph, Node
from pockengine.ir.ops import is_pointwise, is_view


def rematerialize(graph: Graph) -> Graph:
    users = graph.users()
    saved = {n for n in graph.nodes
             if not n.is_input and n.section in ("forward", "loss") and any(u.section == "backward" for u in users[n])}
    # Values of weights alone, recomputable from the program's inputs by cheap ops.
    weights: set[Node] = {n for n in graph.inputs() if n.role in (PARAM, BUFFER, CONST)}
    for n in graph.nodes:
        if (not n.is_input and n.section in ("forward", "loss") and (is_pointwise(n.target) or is_view(n.target))
                and n.inputs and all(i in weights for i in n.inputs)):
            weights.add(n)
    chosen: list[Node] = []
    kept: set[Node] = set()
    for n in [n for n in graph.nodes if n in saved]:
        if n in weights or (is_pointwise(n.target)
                            and all(i.is_input or i in weights or i in kept for i in n.inputs)):
            chosen.append(n)
        else:
            kept.add(n)
    for n in chosen:
        late = [u for u in users[n] if u.section == "backward"]
        first = min(late, key=graph.nodes.index)
        anchor = graph.nodes[graph.nodes.index(first) - 1]
        copies: dict[Node, Node] = {}

        def recompute(v: Node) -> Node:
            nonlocal anchor
            if v.is_input or v in kept:
                return v
            if v not in copies:
                args, kwargs = tree_map(lambda a: recompute(a) if isinstance(a, Node) else a, (v.args, v.kwargs))
                anchor = copies[v] = graph.call(v.target, args, kwargs, module=v.module, section="backward",
                                                after=anchor)
            return copies[v]

        again = recompute(n)
        for u in late:
            u.args, u.kwargs = tree_map(lambda a: again if a is n else a, (u.args, u.kwargs))
    return graph
