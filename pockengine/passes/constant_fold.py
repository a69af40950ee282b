"""Compute once, at compile time, the small values that depend on frozen tensors only.

Frozen BatchNorm folded into a convolution needs per channel `gamma / sqrt(var + eps)` and a shifted bias: a few
tiny ops per layer that would otherwise run at every step, from tensors no step changes (untrained parameters,
buffers no op updates, constants). Such values are evaluated here and become constant inputs of the program. Only
values up to `max_bytes` (64 KiB) are folded: a folded copy of a frozen weight adds its size to the memory that
lives across steps, so only small ones are (the BatchNorm-scaled kernels of depthwise convolutions, a few KiB
each); `weight * scale` of larger weights stays in the program and reads the weight at every step.

Frozen tensors are read when the program is compiled: change frozen weights of the model afterwards and
recompile (a new `pockengine.compile`) for the change to be seen.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from pockengine.ir.graph import Graph, Node, TensorMeta
from pockengine.ir.ops import draws_random, is_view

MAX_BYTES = 1 << 16


def _foldable(target) -> bool:
    """Computes a new value (a view would only copy a weight) and draws nothing at random."""
    return not draws_random(target) and not is_view(target)


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
                or not n.inputs or not all(i in known for i in n.inputs) or not _foldable(n.target)):
            continue
        known[n] = evaluate(n, known)
    users = graph.users()
    outputs = set(graph.outputs.values())
    for n in [n for n in graph.nodes if n in known and not n.is_input]:
        if n in outputs or any(u not in known for u in users[n]):
            graph.replace_all_uses(n, graph.constant(f"{n.name}_folded", known[n].clone()))
    return graph
