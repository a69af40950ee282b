"""Update each parameter as soon as the backward pass is done with it.

The optimizer's update ops are emitted at the end of the program, where the gradients of all trained parameters
would be alive at once (as in PyTorch, whose `.grad`s all wait for `optimizer.step()`). This pass moves every update
op up to the earliest point where it is still correct:

- after its inputs (so after the gradient is complete: every use of a tied weight has added to it);
- after the loss, which the runner checks for NaN/inf right there: a failed step still changes nothing;
- for an op that writes into a parameter, its optimizer state or a buffer, after every other op that reads that
  tensor or a view of it (the backward pass of earlier layers still multiplies by the old weights).

Each gradient is then freed right after its update instead of at the end of the step, and the update of the last
layers overlaps nothing but the backward pass of the first ones. Values are exactly the same as with the updates
at the end.
"""

from __future__ import annotations

from pockengine.ir.graph import Graph, Node
from pockengine.ir.ops import is_view


def update_early(graph: Graph, loss: Node) -> Graph:
    # The tensor whose storage each value shares: an input, through views and in-place ops (which return their
    # first argument), or None for a value of its own.
    root: dict[Node, Node | None] = {}
    for n in graph.nodes:
        if n.is_input:
            root[n] = n
        elif (is_view(n.target) or n.mutates) and n.args and isinstance(n.args[0], Node):
            root[n] = root.get(n.args[0])
    readers: dict[Node, list[Node]] = {}
    for n in graph.nodes:
        if n.section != "update":
            for i in n.inputs:
                if root.get(i) is not None:
                    readers.setdefault(root[i], []).append(n)
    updates = [n for n in graph.nodes if n.section == "update"]
    if not updates:
        return graph
    base = [n for n in graph.nodes if n.section != "update"]
    position = {n: i for i, n in enumerate(base)}
    after: dict[Node, int] = {}  # update op -> index in `base` of the op it must follow
    for u in updates:
        last = position[loss]
        for i in u.inputs:
            last = max(last, after[i] if i in after else position[i])
        if u.mutates and root.get(u.args[0]) is not None:
            last = max([last] + [position[r] for r in readers.get(root[u.args[0]], [])])
        after[u] = last
    placed: dict[int, list[Node]] = {}
    for u in updates:  # program order among the updates is kept: it already respects their dependencies
        placed.setdefault(after[u], []).append(u)
    graph.nodes = [m for i, n in enumerate(base) for m in [n, *placed.get(i, [])]]
    return graph
