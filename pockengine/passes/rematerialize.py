"""Choose which forward values the backward pass keeps and which it recomputes: a minimum cut over saved values.

A forward value that the backward pass reads stays in memory from the forward pass until then. When it comes from
values the backward pass keeps anyway (or from smaller ones) through a short chain of element-wise ops and views,
recomputing that chain right before its first backward use frees its memory for the whole stretch in between, for
the price of the chain's work. This pass picks, for the whole program at once, the cheapest combination, as
torch's partitioner does (`min_cut_rematerialization_partition` in torch/_functorch/partitioners.py):

- every forward value is a pair of vertices `in -> out` whose edge costs the bytes of keeping it (a view keeps
  its base's storage, so a view cannot be kept on its own: its edge is infinite and the cut falls on its base);
- a value the backward pass reads is tied to the sink; a value that cannot be recomputed (a matrix product, a
  reduction, a random or multi-output op, a program input) to the source; an element-wise op (`torch.Tag.pointwise`)
  or a view (from its schema's alias annotation) hangs from the source by its recomputation cost,
  `ELEMENT_COST` per element it computes (0 for a view), and from its inputs by infinite edges;
- a minimum cut between source and sink then keeps the values whose edges it cuts and recomputes, in the backward
  pass, the values on the sink's side: the least bytes kept plus recomputation cost, with every recomputed value's
  inputs either kept or recomputed themselves.

Typical results: a normalization's output (RMSNorm's `x * rsqrt(mean(x²)) * w`, read by the weight gradients of
the projections after it) is rebuilt from `x` and the per-row `rsqrt` that its own backward keeps anyway; an
activation (SmolLM2's `silu(gate)`, next to `gate`, which the SiLU backward reads) from its input; a convolution
weight with a frozen BatchNorm folded in from the weight. A value the `masks` pass keeps as a bit mask (the
activation a ReLU-like backward op reads) costs almost nothing to keep, so reads by those ops are not counted as
reads of the activation.

Each recomputed value is computed once, right before the first backward op that reads it, and freed after its last
backward use; the forward pass keeps its own copy only while it needs it. The listing notes each recomputed value
and its size. The pass runs before `inplace` (the forward pass is still functional: no op writes into a value
a recomputation would read).
"""

from __future__ import annotations

import math
import operator

import networkx
from torch.utils._pytree import tree_map

from pockengine.ir.graph import Graph, Node, TensorMeta, has_side_effects
from pockengine.ir.ops import is_pointwise, is_view

MB = 2 ** 20

# What recomputing one element costs, in bytes kept from the forward to the backward pass: a chain of up to four
# element-wise ops is recomputed rather than keeping one fp32 value of the same size. The ops are memory-bound (one
# pass over the data each): a SmolLM2 sparse step recomputes 8 M elements beside ~200 GFLOP of matrix products, and
# no step time difference is measurable (docs/recompute.md: step memory and time with and without this pass).
ELEMENT_COST = 1

_EARLY = ("forward", "loss")


def _nbytes(meta: object) -> int:
    if isinstance(meta, TensorMeta):
        return meta.nbytes
    if isinstance(meta, tuple):
        return sum(_nbytes(m) for m in meta)
    return 0


def _recomputable(n: Node) -> bool:
    """An element-wise op or a view with one tensor result: cheap to run again from its inputs, and the same result
    when run again (nothing random, nothing written)."""
    return (isinstance(n.meta, TensorMeta) and n.target is not operator.getitem
            and (is_pointwise(n.target) or is_view(n.target)) and not has_side_effects(n.target))


def _read_late(graph: Graph, masks: frozenset) -> tuple[set[Node], set[Node]]:
    """The forward values the backward pass reads (not counting the reads that the `masks` pass turns into reads
    of a bit mask), and those that stay anyway: read by the update section, or outputs of the program."""
    needed: set[Node] = set()
    stay: set[Node] = set(graph.outputs.values())
    for n in graph.nodes:
        if n.is_input or n.section in _EARLY:
            continue
        masked = n.args[1] if n.target in masks else None
        for a in n.inputs:
            if a.is_input or a.section not in _EARLY:
                continue
            if n.section == "update":
                stay.add(a)
            elif a is not masked:
                needed.add(a)
    return needed, stay


def choose_recomputed(graph: Graph, masks: frozenset = frozenset()) -> set[Node]:
    """The forward values the backward pass should recompute, by the minimum cut described above: element-wise ops,
    and views of recomputed values or of program inputs (the backward pass reads from the forward pass only the
    values it keeps, and views of them).
    `masks`: the backward ops whose second argument (the activation) the `masks` pass replaces by a bit mask."""
    needed, stay = _read_late(graph, masks)
    if not needed:
        return set()
    flow = networkx.DiGraph()
    region: set[Node] = set()
    todo = list(needed)
    while todo:
        n = todo.pop()
        if n in region:
            continue
        region.add(n)
        if n in needed:
            flow.add_edge((n, "out"), "sink")  # no capacity: infinite
        if n.is_input or n in stay or not _recomputable(n):
            # computed in the forward pass whatever the backward pass does; inputs and values that stay anyway
            # cost nothing more to read there
            flow.add_edge("source", (n, "in"))
            flow.add_edge((n, "in"), (n, "out"), capacity=0 if n.is_input or n in stay else _nbytes(n.meta))
            continue
        view = is_view(n.target)
        flow.add_edge((n, "in"), (n, "out"), capacity=math.inf if view else n.meta.nbytes)
        if not view:
            flow.add_edge("source", (n, "in"), capacity=ELEMENT_COST * n.meta.numel)
        for i in n.inputs:
            flow.add_edge((i, "out"), (n, "in"))
            todo.append(i)
    _, (_, sink_side) = networkx.minimum_cut(flow, "source", "sink")
    recomputed: set[Node] = set()
    for n in graph.nodes:  # in program order: a view is rebuilt when what it views is (or is a program input)
        if (n, "in") in sink_side and (not is_view(n.target) or all(i in recomputed or i.is_input for i in n.inputs)):
            recomputed.add(n)
    return recomputed


def rematerialize(graph: Graph, masks: frozenset = frozenset()) -> Graph:
    """Recompute the values `choose_recomputed` picks right before their first backward use, and note each in the
    listing."""
    recomputed = choose_recomputed(graph, masks)
    copies: dict[Node, Node] = {}
    placed: dict[Node, list[Node]] = {}  # backward op -> the recomputations that run right before it

    def copy_of(v: Node, before: Node) -> Node:
        if v not in recomputed:
            return v
        if v not in copies:
            args, kwargs = tree_map(lambda a: copy_of(a, before) if isinstance(a, Node) else a, (v.args, v.kwargs))
            copies[v] = graph.call(v.target, args, kwargs, module=v.module, section=before.section, meta=v.meta,
                                   name=v.name)
            graph.nodes.pop()  # placed below, in program order
            placed.setdefault(before, []).append(copies[v])
        return copies[v]

    for n in [n for n in graph.nodes if not n.is_input and n.section not in _EARLY]:
        if any(i in recomputed for i in n.inputs):
            n.args, n.kwargs = tree_map(lambda a, n=n: copy_of(a, n) if isinstance(a, Node) else a,
                                        (n.args, n.kwargs))
    graph.nodes = [m for n in graph.nodes for m in [*placed.get(n, []), n]]
    for v, again in copies.items():
        if not is_view(v.target):
            graph.notes[again] = (f"recomputed: %{v.name} ({v.meta.nbytes / MB:.2f} MB) is computed again here "
                                  f"instead of kept from the forward pass ({v.meta.numel / 1e6:.3g} M elements)")
    return graph

