"""Compute once, at compile time, the small values that depend on frozen tensors only.

Frozen BatchNorm folded into a convolution needs per channel `gamma / sqrt(var + eps)` and a shifted bias: a few
tiny ops per layer that would otherwise run at every step, from tensors no step changes (untrained parameters,
buffers no op updates, constants). Such values are evaluated here and become constant inputs of the program. Only
values up to `max_bytes` (64 KiB) are folded, and never a value as large as a frozen weight (2 or more
dimensions) it reads: that is a copy of the weight in another form (`weight * scale`, a BatchNorm-scaled kernel),
which folded would keep the weight twice across steps, beside the model's own; it stays in the program and reads
the weight at every step (for a depthwise kernel a few KiB of work).

Frozen tensors are read when the program is compiled: change frozen weights of the model afterwards and
recompile (a new `pockengine.compile`) for the change to be seen.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from pockengine.ir.graph import PARAM, Graph, Node, TensorMeta
from pockengine.ir.ops import draws_random, is_view

MAX_BYTES = 1 << 16


def _foldable(target) -> bool:
    """Computes a new value (a view would only copy a weight) and draws nothing at random."""
    return not draws_random(target) and not is_view(target)


def _copies_a_weight(n: Node) -> bool:
    """`n` is as large as a weight (a parameter of 2 or more dimensions: a kernel, a matrix) it reads: folded, it
    would be a second copy of that weight. Per-channel vectors (BatchNorm's scale from its weight) are folded."""
    return any(i.role == PARAM and len(i.meta.shape) >= 2 and n.meta.nbytes >= i.meta.nbytes for i in n.inputs)


def evaluate(n: Node, known: dict[Node, torch.Tensor]) -> torch.Tensor:
    """The value of op `n` from the values of its inputs."""
    args, kwargs = tree_map(lambda a: known[a] if isinstance(a, Node) else a, (n.args, n.kwargs))
    with torch.no_grad():
        return n.target(*args, **kwargs)


def fold_constants(graph: Graph, frozen: dict[Node, torch.Tensor], max_bytes: int = MAX_BYTES) -> Graph:
    """`frozen`: the program inputs no step changes, with their values."""
    known: dict[Node, torch.Tensor] = dict(frozen)
    for n in graph.nodes:
        if (n.is_input or n.mutates or not isinstance(n.meta, TensorMeta) or n.meta.nbytes > max_bytes
                or not n.inputs or not all(i in known for i in n.inputs) or not _foldable(n.target)
                or _copies_a_weight(n)):
            continue
        known[n] = evaluate(n, known)
    users = graph.users()
    outputs = set(graph.outputs.values())
    for n in [n for n in graph.nodes if n in known and not n.is_input]:
        if n in outputs or any(u not in known for u in users[n]):
            graph.replace_all_uses(n, graph.constant(f"{n.name}_folded", known[n].clone()))
    return graph
