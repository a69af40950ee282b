"""Drop copies that change nothing.

torch.export writes `dropout` in eval mode, and some `contiguous`/`clone` calls of model code, as `clone` ops. In a
functional graph nothing ever writes to the copy or to its source, so the copy is the value itself: reading the
source instead saves the copy, and where the backward pass keeps both (the attention probabilities of a
transformer, read by the softmax backward and, through an eval-mode dropout, by a batched matmul) it halves what
is saved. Clones that change the memory layout, or copy a view (which may not be dense), are kept: later
views rely on their strides.
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph
from pockengine.ir.ops import is_view

aten = torch.ops.aten


def drop_redundant_clones(graph: Graph) -> Graph:
    """Run on a captured (functional) graph, before any pass that mutates values in place."""
    for n in list(graph.nodes):
        source = n.args[0] if n.target is aten.clone.default else None
        # A clone of a view (a slice, an expand) is dense where the view is not, and later views rely on that.
        if (source is not None and n.kwargs.get("memory_format", torch.preserve_format) is torch.preserve_format
                and not source.is_input and not is_view(source.target)):
            graph.replace_all_uses(n, n.args[0])
    return graph
