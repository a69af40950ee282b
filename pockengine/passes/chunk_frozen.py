"""Run the frozen prefix of the forward pass in micro-batches.

Before the earliest trained layer the backward pass needs nothing, yet at full batch size the largest layer there
(an early convolution's input and output at high resolution) can set the peak of the whole step. Its ops treat
every sample on its own, so this pass runs that region `chunks` times on slices of the batch, one slice after the
other, and concatenates only the values that leave the region (usually one small activation). The region's
transient memory falls about `chunks` times; the arithmetic is the same, in smaller kernel calls.

The region: forward ops that keep the batch as dimension 0 and treat samples independently (convolution, frozen
BatchNorm, pooling, element-wise ops and activations), whose inputs are the batch, other region values, or values
that depend neither on the batch nor on a trained parameter (frozen weights).
"""

from __future__ import annotations

import operator

import torch
from torch.utils._pytree import tree_map

from pockengine.ir.graph import BATCH, Graph, Node, TensorMeta
from pockengine.ir.ops import SAMPLEWISE, is_pointwise
from pockengine.memory.plan import plan_memory

aten = torch.ops.aten


def _outputs(meta) -> list[TensorMeta]:
    return [m for m in (meta if isinstance(meta, tuple) else (meta,)) if isinstance(m, TensorMeta)]


def frozen_region(graph: Graph, trained: set[Node], until: Node | None = None) -> tuple[list[Node], list[Node], int]:
    """(region nodes in program order, those read outside the region, batch size); empty when there is none.
    `until` cuts the region after that node (the rest of it then runs at full batch)."""
    batch_inputs = [n for n in graph.inputs(BATCH) if isinstance(n.meta, TensorMeta) and n.meta.shape]
    if not batch_inputs:
        return [], [], 0
    size = batch_inputs[0].meta.shape[0]
    seeds = {n for n in batch_inputs if n.meta.shape[0] == size}
    # Values independent of the batch and of every trained parameter: shared by all micro-batches.
    varying = set(graph.inputs(BATCH)) | set(trained)
    for n in graph.nodes:
        if not n.is_input and any(i in varying for i in n.inputs):
            varying.add(n)

    users = graph.users()

    def allowed(n: Node, region: set[Node]) -> bool:
        if n.is_input or n.section != "forward" or not (is_pointwise(n.target) or n.target in SAMPLEWISE):
            return False
        if n.target is aten.mean.dim and (n.args[1] is None or 0 in [d % len(n.args[0].meta.shape)
                                                                     for d in n.args[1]]):
            return False
        if isinstance(n.meta, tuple):  # the outputs that are read (frozen BatchNorm's statistics are not)
            outs = [n.meta[u.args[1]] for u in users[n] if u.target is operator.getitem]
        else:
            outs = _outputs(n.meta)
        if not outs or any(not m.shape or m.shape[0] != size for m in outs):
            return False
        batched = [i for i in n.inputs if i in region or i in seeds]
        shared = [i for i in n.inputs if i not in batched]
        shared_ok = all(i not in varying and isinstance(i.meta, TensorMeta) for i in shared) and (
            # a pointwise op's other operand broadcasts against the batch: it must have no batch dimension
            not is_pointwise(n.target)
            or all(len(i.meta.shape) < len(outs[0].shape) or i.meta.shape[0] == 1 for i in shared))
        return bool(batched) and shared_ok

    position = {n: i for i, n in enumerate(graph.nodes)}
    region: set[Node] = set()
    for n in graph.nodes:
        if allowed(n, region):
            region.add(n)
        if n is until:
            break
    changed = True
    while changed:
        changed = False
        for n in [n for n in graph.nodes if n in region]:
            # a multi-output op leaves the region unless all its outputs stay in it, and so on downstream
            if (not allowed(n, region) or isinstance(n.meta, tuple)
                    and any(u not in region or u.target is not operator.getitem for u in users[n])):
                region.discard(n)
                changed = True
        # The micro-batches run where the region ends: an op outside it that reads a region value earlier (a
        # trained branch beside a frozen one) would come first. The region stops before the earliest such reader.
        readers = [position[u] for n in region for u in users[n] if u not in region]
        if readers and max(position[n] for n in region) > min(readers):
            cut = min(readers)
            region = {n for n in region if position[n] < cut}
            changed = True
    outputs = set(graph.outputs.values())
    ordered = [n for n in graph.nodes if n in region]
    boundary = [n for n in ordered if n in outputs or any(u not in region for u in users[n])]
    if not boundary or all(n.target is aten.clone.default for n in ordered):
        return [], [], size  # nothing worth splitting (at most the batch's layout conversion)
    return ordered, boundary, size


def chunk_frozen_prefix(graph: Graph, trained: set[Node], chunks: int, until: Node | None = None) -> Graph:
    """Run the frozen region (see `frozen_region`), up to `until`, on `chunks` slices of the batch in turn."""
    region, boundary, size = frozen_region(graph, trained, until)
    chunks = min(chunks, size)
    if not region or chunks <= 1:
        return graph
    members = set(region)
    anchor = region[-1]
    bounds = [size * i // chunks for i in range(chunks + 1)]
    pieces: dict[Node, list[Node]] = {b: [] for b in boundary}
    for start, stop in zip(bounds, bounds[1:]):
        local: dict[Node, Node] = {}

        def emit(target, args, kwargs, like: Node) -> Node:
            nonlocal anchor
            anchor = graph.call(target, args, kwargs, module=like.module, section=like.section, after=anchor)
            return anchor

        def value(a):
            if not isinstance(a, Node):
                return a
            if a in local:
                return local[a]
            if a.role == BATCH and a.meta.shape and a.meta.shape[0] == size:
                local[a] = emit(aten.slice.Tensor, (a, 0, start, stop), {}, a)
                return local[a]
            return a  # shared by every micro-batch

        for n in region:
            args, kwargs = tree_map(value, (n.args, n.kwargs))
            local[n] = emit(n.target, args, kwargs, n)
        for b in boundary:
            pieces[b].append(local[b])
    for b in boundary:
        joined = graph.call(aten.cat.default, (pieces[b], 0), module=b.module, section=b.section, after=anchor)
        anchor = joined
        graph.replace_all_uses(b, joined)
    graph.nodes = [n for n in graph.nodes if n not in members]
    return graph


def plan_chunks(region: list[Node], boundary: list[Node], size: int,
                live_bytes: dict[Node, int]) -> tuple[int, Node | None]:
    """How to split the region so that it no longer sets the step's peak, at the least cost: (micro-batches,
    the last node to split). Only the region's ops that run above the peak of the rest of the step are split
    (the early layers at high resolution; splitting more costs time in smaller kernel calls), into the fewest
    micro-batches (a divisor of the batch) that bring them below it. `live_bytes`: the bytes live while each op of
    the unsplit program runs (`MemoryPlan.live_during`)."""
    order = {n: i for i, n in enumerate(live_bytes)}
    first, last = order[region[0]], order[region[-1]]
    # Ops interleaved with the region (folding frozen weights) run while its values are live: they count as inside.
    inside = {n: b for n, b in live_bytes.items() if first <= order[n] <= last}
    outside = max((b for n, b in live_bytes.items() if not first <= order[n] <= last), default=0)
    high = [n for n, b in inside.items() if b > outside]
    if not high:
        return 1, None
    until = max((n for n in region if order[n] <= max(order[h] for h in high)), key=order.__getitem__)
    peak = max(inside.values())
    # The pieces of the values leaving the region pile up until they are joined, and the join holds them twice.
    leaving = sum(m.nbytes for n in boundary for m in _outputs(n.meta))
    for k in range(2, size + 1):
        if size % k == 0 and (peak - leaving) / k + 2 * leaving <= outside:
            return k, until
    return size, until


def chunk_for_memory(graph: Graph, trained: set[Node], chunks: int | str, device: torch.device,
                     input_strides: dict[Node, tuple[int, ...]]) -> Graph:
    """Run the frozen region in `chunks` micro-batches; "auto": on the CPU as many as `plan_chunks` finds on the
    memory plan of the unsplit program (`input_strides`: the layout of its non-contiguous inputs), on a GPU one.
    On a GPU memory is rarely the limit at these sizes, and every micro-batch launches the frozen prefix's kernels
    once more, which costs time and saves nothing needed."""
    until = None
    if chunks == "auto":
        chunks = 1
        if device.type == "cpu":
            region, boundary, size = frozen_region(graph, trained)
            if region:
                chunks, until = plan_chunks(region, boundary, size,
                                            plan_memory(graph, input_strides).live_during)
    return chunk_frozen_prefix(graph, trained, chunks, until)
