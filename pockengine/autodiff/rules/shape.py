"""VJP rules of views, slicing, joining and indexing."""

import operator
import sys
from dataclasses import dataclass
from typing import Any

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.errors import MissingVJPError
from pockengine.ir.graph import Node

aten = torch.ops.aten


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _reshape_to(ctx, g, x):
    # The cotangent may be non-contiguous (after a permute), so reshape rather than view.
    return ctx(aten.reshape.default, g, list(x.meta.shape))


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
          aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default, aten.flatten.using_ints,
          aten.view_copy.default)
def reshape(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (_reshape_to(ctx, g, ctx.node.args[0]),)


@register(aten.permute.default, aten.permute_copy.default)
def permute(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    dims = [_dim(d, len(g.meta.shape)) for d in ctx.node.args[1]]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return (ctx(aten.permute.default, g, inverse),)


@register(aten.transpose.int)
def transpose(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    _, a, b = ctx.node.args
    return (ctx(aten.transpose.int, g, a, b),)


@register(aten.t.default)
def t(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.t.default, g),)


@register(aten.as_strided.default)
def as_strided(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """A re-striding (a pooled [N, C, 1, 1] given channels-last strides: the same elements in the same places) passes
    the gradient through. Windows over a 1-D value (Longformer's overlapping chunks, read from their input's elements
    in storage order, capture/strided_windows.py) add each output element's gradient into the element it reads, as
    autograd does: the index map is the same as_strided taken of the positions 0..numel-1, so elements read twice
    get both gradients. A 1-D value is contiguous whatever kernel made it, so its positions are its storage's."""
    x, size, stride = ctx.args[:3]
    offset = ctx.args[3] if len(ctx.args) > 3 else None
    dense = [s for s in size if s != 1]
    row_major = [1] * len(dense)
    for i in range(len(dense) - 2, -1, -1):
        row_major[i] = row_major[i + 1] * dense[i + 1]
    if tuple(size) == x.meta.shape and [st for st, s in zip(stride, size) if s != 1] == row_major and not offset:
        return (g,)
    if len(x.meta.shape) != 1:
        raise MissingVJPError(f"as_strided to size {list(size)}, stride {list(stride)} of a {list(x.meta.shape)} "
                              f"value whose storage has gaps or overlaps (module '{ctx.node.module}'): only "
                              "re-stridings and windows over a dense value are differentiable")
    numel = x.meta.numel
    last = (offset or 0) + sum((s - 1) * st for s, st in zip(size, stride))
    if any(st < 0 for st in stride) or (offset or 0) < 0 or (0 not in size and last >= numel):
        raise MissingVJPError(f"as_strided to size {list(size)}, stride {list(stride)}, offset {offset} reads outside "
                              f"its input of {list(x.meta.shape)} (module '{ctx.node.module}'): not differentiable")
    positions = ctx(aten.sub.Tensor, ctx(aten.cumsum.default, ctx(aten.new_ones.default, g, [numel],
                                                                   dtype=torch.int64), 0), 1)
    read = ctx(aten.reshape.default, ctx(aten.as_strided.default, positions, list(size), list(stride), offset), [-1])
    flat = ctx(aten.index_add.default, ctx(aten.new_zeros.default, g, [numel]), 0, read,
               ctx(aten.reshape.default, g, [-1]))
    return (ctx(aten.reshape.default, flat, list(x.meta.shape)),)


@register(aten.expand.default)
def expand(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (ctx.sum_to(g, x.meta.shape),)


@register(aten.slice.Tensor)
def slice_(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, start, end, step = ctx.args
    start = 0 if start is None else start
    end = sys.maxsize if end is None else end
    return (ctx(aten.slice_backward.default, g, list(x.meta.shape), dim, start, end, step),)


@register(aten.narrow_copy.default)
def narrow_copy(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, start, length = ctx.args
    return (ctx(aten.slice_backward.default, g, list(x.meta.shape), dim, start, start + length, 1),)


@register(aten.select.int)
def select(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, index = ctx.node.args
    return (ctx(aten.select_backward.default, g, list(x.meta.shape), dim, index),)


@register(aten.cat.default)
def cat(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    tensors, dim = ctx.args
    dim = _dim(dim, len(g.meta.shape))
    grads, offset = [], 0
    for x in tensors:
        if x.meta.shape == (0,):  # a legacy empty tensor, which cat skips whatever the dim (an empty KV cache)
            grads.append(ctx(aten.new_zeros.default, x, [0]) if ctx.needs(x) else None)
            continue
        size = x.meta.shape[dim]
        grads.append(ctx(aten.slice.Tensor, g, dim, offset, offset + size) if ctx.needs(x) else None)
        offset += size
    return (grads,)


def _join_split(ctx, g, dim):
    x = ctx.node.args[0]
    parts = [gi if gi is not None else ctx(aten.new_zeros.default, x, list(m.shape))
             for gi, m in zip(g, ctx.node.meta)]
    return (ctx(aten.cat.default, parts, _dim(dim, len(x.meta.shape))),)


@register(aten.split_with_sizes.default, aten.split.Tensor)
def split(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _join_split(ctx, g, ctx.args[2])


@register(aten.unbind.int, aten.unbind_copy.int)
def unbind(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim = ctx.args
    parts = [gi if gi is not None else ctx(aten.new_zeros.default, x, list(m.shape))
             for gi, m in zip(g, ctx.node.meta)]
    return (ctx(aten.stack.default, parts, dim),)


@register(aten.stack.default)
def stack(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    tensors, dim = ctx.args
    return ([ctx(aten.select.int, g, dim, i) if ctx.needs(x) else None for i, x in enumerate(tensors)],)


@register(aten.index.Tensor)
def index(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, indices = ctx.node.args
    zeros = ctx.zeros_like(x)
    return ctx(aten.index_put.default, zeros, indices, g, True), None


@register(aten.index_select.default)
def index_select(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, idx = ctx.node.args
    return ctx(aten.index_add.default, ctx.zeros_like(x), dim, idx, g), None, None


@register(aten.gather.default)
def gather(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, idx = ctx.node.args[:3]
    return ctx(aten.scatter_add.default, ctx.zeros_like(x), dim, idx, g), None, None


@register(aten.embedding.default)
def embedding(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    w, indices, padding_idx, scale, _sparse = ctx.args
    return ctx(aten.embedding_dense_backward.default, g, indices, w.meta.shape[0], padding_idx, scale), None


@register(aten.constant_pad_nd.default)
def constant_pad(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    pad = ctx.node.args[1]
    return (ctx(aten.constant_pad_nd.default, g, [-p for p in pad]),)


@register(aten.flip.default)
def flip(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.flip.default, g, ctx.node.args[1]),)


@register(aten.view_as_real.default)
def view_as_real(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # The cotangent of a complex tensor is (dL/d real) + i (dL/d imag), as in PyTorch; view_as_complex needs
    # the (real, imag) pairs adjacent, which a cotangent after a select or permute may not have.
    return (ctx(aten.view_as_complex.default, ctx(aten.clone.default, g, memory_format=torch.contiguous_format)),)


@register(aten.view_as_complex.default)
def view_as_complex(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.view_as_real.default, g),)


@register(aten.repeat.default)
def repeat(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, repeats = ctx.node.args
    shape = list(x.meta.shape)
    lead = len(repeats) - len(shape)
    # Split every repeated dim into (repeat, size) and sum over the repeat axes.
    split, dims = [], []
    for i, r in enumerate(repeats):
        size = shape[i - lead] if i >= lead else 1
        dims.append(len(split))
        split += [r, size]
    summed = ctx(aten.sum.dim_IntList, ctx(aten.reshape.default, g, split), dims)
    return (ctx(aten.reshape.default, summed, shape),)


@register(aten.put.default)
def put(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """self with source written (or added) at flat indices: self keeps the cotangent except where overwritten; the
    source gets the cotangent read at its indices."""
    x, index, source, accumulate = ctx.args
    gx = None
    if ctx.needs(x):
        gx = g if accumulate else ctx(aten.put.default, g, index, ctx.zeros_like(source), False)
    return gx, None, ctx(aten.reshape.default, ctx(aten.take.default, g, index), list(source.meta.shape)) \
        if ctx.needs(source) else None, None


@register(aten._trilinear.default)
def trilinear(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """out = sum over `sumdim` of i1 i2 i3 (each unsqueezed at its `expand` dimensions): each input's gradient is
    the same product with the cotangent in its place, summed over what that input was expanded along (PyTorch's
    _trilinear_backward)."""
    i1, i2, i3, expand1, expand2, expand3, sumdim, _unroll = ctx.args
    return (ctx(aten._trilinear.default, g, i2, i3, sumdim, expand2, expand3, expand1) if ctx.needs(i1) else None,
            ctx(aten._trilinear.default, i1, g, i3, expand1, sumdim, expand3, expand2) if ctx.needs(i2) else None,
            ctx(aten._trilinear.default, i1, i2, g, expand1, expand2, sumdim, expand3) if ctx.needs(i3) else None)


@register(aten.index_put.default)
def index_put(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, indices, values, accumulate = ctx.args
    gx = gv = None
    if ctx.needs(x):  # overwritten entries take nothing back from the output
        gx = g if accumulate else ctx(aten.index_put.default, g, indices, ctx.zeros_like(values), False)
    if ctx.needs(values):
        # (a boolean mask with one value for all the rows it picks is captured as `where`, capture/masked_rows.py)
        gv = ctx.sum_to(ctx(aten.index.Tensor, g, indices), values.meta.shape)
    return gx, None, gv, None


@register(aten.scatter.src, aten.scatter.value)
def scatter(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, idx, src = ctx.args
    gx = ctx(aten.scatter.value, g, dim, idx, 0) if ctx.needs(x) else None
    gsrc = ctx(aten.gather.default, g, dim, idx) if ctx.needs(src) else None
    return gx, None, None, gsrc


@register(aten.scatter_add.default)
def scatter_add(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, idx, src = ctx.args
    return g, None, None, ctx(aten.gather.default, g, dim, idx) if ctx.needs(src) else None


@dataclass(frozen=True)
class _Placement:
    """How a reduce-into op places values: per element along `dim` (scatter_reduce: an index per source entry) or
    per slice (index_reduce: an index per source slice). Each op takes (self, dim, index, ...) in that order."""
    reduce_into: Any  # (x, dim, idx, src, reduce, include_self=)
    read: Any  # the values at the places: gather / index_select
    add_into: Any  # scatter_add / index_add
    clear: Any  # 0 at the places: scatter.value / index_fill


_PLACEMENTS = {aten.scatter_reduce.two: _Placement(aten.scatter_reduce.two, aten.gather.default,
                                                   aten.scatter_add.default, aten.scatter.value),
               aten.index_reduce.default: _Placement(aten.index_reduce.default, aten.index_select.default,
                                                     aten.index_add.default, aten.index_fill.int_Scalar)}


@register(*_PLACEMENTS)
def reduce_into(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """scatter_reduce and index_reduce, PyTorch's formulas (scatter_reduce_backward, index_reduce_backward): `sum`
    as scatter_add; `prod` as the product of the others, recomputed with zeros masked so that a single zero still
    gets its gradient; `mean` divided by the count of values reduced into each entry; `amax`/`amin` shared evenly
    among the entries equal to the result. With include_self=False the reduced-into entries of x take no gradient."""
    x, dim, idx, src, reduce = ctx.args
    include_self = ctx.kwarg("include_self")
    out = ctx.node
    op = _PLACEMENTS[ctx.node.target]
    gx = gsrc = None
    if reduce == "sum":
        gx = g if ctx.needs(x) else None
        gsrc = ctx(op.read, g, dim, idx) if ctx.needs(src) else None
    elif reduce == "prod":
        if ctx.needs(x):
            masked_x = ctx(aten.where.ScalarSelf, ctx(aten.eq.Scalar, x, 0), 1.0, x)
            others = ctx(op.reduce_into, masked_x, dim, idx, src, "prod", include_self=include_self)
            gx = ctx(aten.div.Tensor, ctx(aten.mul.Tensor, g, others), masked_x)
        if ctx.needs(src):
            src_zero = ctx(aten.eq.Scalar, src, 0)
            zeros_per_entry = ctx(op.read, ctx(op.add_into, ctx.zeros_like(x), dim, idx, ctx(
                aten._to_copy.default, src_zero, dtype=x.meta.dtype)), dim, idx)
            single_zero = ctx(aten.logical_and.default, src_zero, ctx(aten.eq.Scalar, zeros_per_entry, 1))
            without_zero = ctx(op.reduce_into, x, dim, idx,
                               ctx(aten.where.ScalarSelf, single_zero, 1.0, src), "prod", include_self=include_self)
            through_zero = ctx(op.read, ctx(aten.mul.Tensor, g, without_zero), dim, idx)
            through_result = ctx(aten.div.Tensor, ctx(op.read, ctx(aten.mul.Tensor, g, out), dim, idx),
                                 ctx(aten.where.ScalarSelf, src_zero, 1.0, src))
            gsrc = ctx(aten.where.self, single_zero, through_zero, through_result)
    elif reduce == "mean":
        count = ctx(op.add_into, ctx(aten.ones_like.default, g) if include_self else ctx.zeros_like(g),
                    dim, idx, ctx(aten.ones_like.default, src))
        count = ctx(aten.where.ScalarSelf, ctx(aten.eq.Scalar, count, 0), 1.0, count)
        gx = ctx(aten.div.Tensor, g, count) if ctx.needs(x) else None
        gsrc = ctx(aten.div.Tensor, ctx(op.read, g, dim, idx), ctx(op.read, count, dim, idx)) \
            if ctx.needs(src) else None
    elif reduce in ("amax", "amin"):
        value = ctx(op.read, out, dim, idx)
        x_is_result = ctx(aten.eq.Tensor, x, out)
        src_is_result = ctx(aten.eq.Tensor, src, value)
        ties = ctx(op.add_into, ctx(aten._to_copy.default, x_is_result, dtype=g.meta.dtype), dim, idx,
                   ctx(aten._to_copy.default, src_is_result, dtype=g.meta.dtype))
        shared = ctx(aten.div.Tensor, g, ties)
        gx = ctx(aten.mul.Tensor, shared, x_is_result) if ctx.needs(x) else None
        gsrc = ctx(aten.mul.Tensor, ctx(op.read, shared, dim, idx), src_is_result) \
            if ctx.needs(src) else None
    else:
        raise MissingVJPError(f"{ctx.node.target} with reduce='{reduce}' (node %{ctx.node.name}, module "
                              f"'{ctx.node.module or '<top level>'}') has no VJP rule; freeze the parameters "
                              "before it or register a rule")
    if gx is not None and not include_self:
        gx = ctx(op.clear, gx, dim, idx, 0)
    return gx, None, None, gsrc, None


@register(aten.index_add.default)
def index_add(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, idx, source = ctx.args
    alpha = ctx.kwarg("alpha")
    gsrc = None
    if ctx.needs(source):
        gsrc = ctx(aten.index_select.default, g, dim, idx) if len(source.meta.shape) else \
            ctx(aten.reshape.default, ctx(aten.index_select.default, g, dim, idx), [])
        gsrc = gsrc if alpha == 1 else ctx(aten.mul.Tensor, gsrc, alpha)
    return g if ctx.needs(x) else None, None, None, gsrc


@register(aten.diagonal.default)
def diagonal(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, offset, dim1, dim2 = ctx.args
    return (ctx(aten.diagonal_backward.default, g, list(x.meta.shape), offset, dim1, dim2),)


@register(aten.unfold.default)
def unfold(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, size, step = ctx.args
    return (ctx(aten.unfold_backward.default, g, list(x.meta.shape), dim, size, step),)


_UPSAMPLE = ("nearest1d", "nearest2d", "nearest3d", "_nearest_exact1d", "_nearest_exact2d", "_nearest_exact3d",
             "linear1d", "bilinear2d", "bicubic2d", "trilinear3d", "_bilinear2d_aa", "_bicubic2d_aa")


def _upsample_op(mode: str):
    return getattr(aten, f"_upsample{mode}" if mode.startswith("_") else f"upsample_{mode}")


@register(*[getattr(_upsample_op(m), o) for m in _UPSAMPLE for o in ("vec", "default")])
def upsample(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """ATen's backward kernel takes the output and input sizes and the per-dimension scales (the `.vec` form's
    scale factors, when given: nearest neighbours are picked with them)."""
    schema = ctx.node.target._schema
    args = dict(zip((a.name for a in schema.arguments if not a.kwarg_only), ctx.args))
    x = args["input"] if "input" in args else args["self"]
    spatial = len(x.meta.shape) - 2
    if ctx.node.target._overloadname == "vec":
        scales = list(args["scale_factors"] or [None] * spatial)
    else:
        scales = [v for k, v in args.items() if k.startswith("scales")]
    align = [args["align_corners"]] if "align_corners" in args else []
    backward = getattr(aten, schema.name.split("::")[1] + "_backward").default
    return (ctx(backward, g, list(ctx.node.meta.shape[2:]), list(x.meta.shape), *align, *scales),)


@register(aten._embedding_bag.default)
def embedding_bag(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    w, indices, offsets, scale_grad_by_freq, mode, _sparse, per_sample_weights, _last, padding_idx = ctx.args
    offset2bag, bag_size, max_indices = (ctx.graph.getitem(ctx.node, i) for i in (1, 2, 3))
    gw = gpsw = None
    if ctx.needs(w):
        gw = ctx(aten._embedding_bag_backward.default, g[0], indices, offsets, offset2bag, bag_size, max_indices,
                 w.meta.shape[0], scale_grad_by_freq, mode, False, per_sample_weights, padding_idx)
    if ctx.needs(per_sample_weights):
        gpsw = ctx(aten._embedding_bag_per_sample_weights_backward.default, g[0], w, indices, offsets, offset2bag,
                   mode, padding_idx)
    return gw, None, None, None, None, None, gpsw


@register(aten.diagonal_scatter.default)
def diagonal_scatter(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, src, offset, dim1, dim2 = ctx.args
    gx = ctx(aten.diagonal_scatter.default, g, ctx.zeros_like(src), offset, dim1, dim2) if ctx.needs(x) else None
    gsrc = ctx(aten.diagonal.default, g, offset, dim1, dim2) if ctx.needs(src) else None
    return gx, gsrc


@register(aten.select_scatter.default)
def select_scatter(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, src, dim, index = ctx.args
    gx = ctx(aten.select_scatter.default, g, ctx.zeros_like(src), dim, index) if ctx.needs(x) else None
    return gx, ctx(aten.select.int, g, dim, index) if ctx.needs(src) else None


@register(aten.slice_scatter.default)
def slice_scatter(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, src, dim, start, end, step = ctx.args
    gx = ctx(aten.slice_scatter.default, g, ctx.zeros_like(src), dim, start, end, step) if ctx.needs(x) else None
    return gx, ctx(aten.slice.Tensor, g, dim, start, end, step) if ctx.needs(src) else None


@register(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, grid, interpolation, padding, align_corners = ctx.args
    backward = (aten.grid_sampler_2d_backward.default if ctx.node.target is aten.grid_sampler_2d.default
                else aten.grid_sampler_3d_backward.default)
    mask = [ctx.needs(x), ctx.needs(grid)]
    out = ctx(backward, g, x, grid, interpolation, padding, align_corners, mask)
    return tuple(ctx(operator.getitem, out, i) if m else None for i, m in enumerate(mask))
