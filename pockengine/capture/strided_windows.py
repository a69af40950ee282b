"""`as_strided` windows over a value (Longformer's and LED's overlapping attention chunks) read from a flat copy of
its elements in their storage order.

`x.as_strided(size, stride)` reads x's storage, so what it reads depends on how x is laid out: Longformer chunks
`query.transpose(1, 2).reshape(...)`, a view whose strides are not row-major, so the windows pick elements in another
order than x's indices. The program's gradient of such a read (autodiff/rules/shape.py) maps each window element
back to the position it read; that map is only known against a layout fixed in the program. So, where torch.export
records as_strided of a dense value of more than one dimension (fake strides a permutation of a row-major layout)
that is more than a re-striding of it, the read becomes `x.permute(storage order).reshape(-1).as_strided(size,
stride, offset)`: the same elements read (the flat value is x's storage order, from x's first element), on a 1-D
contiguous value whatever layout the kernels give x at run time. An explicit storage offset is taken relative to x's
own and read from a copy (a view of x would keep x's offset, a copy starts at 0). A value with gaps or overlaps in
its storage is left as it is; the gradient rule refuses windows over it by name.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten


def _storage_order(val: torch.Tensor) -> list[int] | None:
    """The permutation of `val`'s dims that makes it row-major contiguous, if one does (a dense layout)."""
    order = sorted(range(val.dim()), key=lambda d: (-val.stride(d), -val.shape[d]))
    return order if val.permute(order).is_contiguous() else None


def _restrides(val: torch.Tensor, size: list[int], stride: list[int], offset: object) -> bool:
    """The same elements in row-major order (a pooled [N, C, 1, 1] given channels-last strides): the gradient rule
    passes the gradient through, whatever the layout."""
    dense = [(sz, st) for sz, st in zip(size, stride) if sz != 1]
    row_major = all(st == math.prod(sz for sz, _ in dense[i + 1:]) for i, (_, st) in enumerate(dense))
    return not offset and tuple(size) == tuple(val.shape) and row_major


def read_windows_from_storage_order(gm: GraphModule) -> None:
    graph = gm.graph
    for n in list(graph.nodes):
        if n.target is not aten.as_strided.default or not isinstance(n.args[0], Node):
            continue
        x, size, stride = n.args[:3]
        offset = n.args[3] if len(n.args) > 3 else n.kwargs.get("storage_offset")
        val = x.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or _restrides(val, size, stride, offset):
            continue
        order = _storage_order(val)
        if order is None:
            continue
        with graph.inserting_before(n):
            flat = graph.call_function(aten.reshape.default, (graph.call_function(aten.permute.default, (x, order)),
                                                              [-1]))
            if offset is not None:
                flat = graph.call_function(aten.clone.default, (flat,))
                offset = offset - val.storage_offset()
        n.args = (flat, size, stride, offset)
        n.kwargs = {}
    gm.recompile()
