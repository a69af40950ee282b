"""VJP rules of views, slicing, joining and indexing."""

import sys

import torch

from pockengine.autodiff.registry import register
from pockengine.errors import MissingVJPError

aten = torch.ops.aten


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _reshape_to(ctx, g, x):
    # The cotangent may be non-contiguous (after a permute), so reshape rather than view.
    return ctx(aten.reshape.default, g, list(x.meta.shape))


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
          aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default, aten.flatten.using_ints)
def reshape(ctx, g):
    return (_reshape_to(ctx, g, ctx.node.args[0]),)


@register(aten.permute.default)
def permute(ctx, g):
    dims = [_dim(d, len(g.meta.shape)) for d in ctx.node.args[1]]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return (ctx(aten.permute.default, g, inverse),)


@register(aten.transpose.int)
def transpose(ctx, g):
    _, a, b = ctx.node.args
    return (ctx(aten.transpose.int, g, a, b),)


@register(aten.t.default)
def t(ctx, g):
    return (ctx(aten.t.default, g),)


@register(aten.as_strided.default)
def as_strided(ctx, g):
    """Only the re-striding torch.export emits (a pooled [N, C, 1, 1] given channels-last strides): the same
    elements in the same places, so the gradient passes through."""
    x, size, stride = ctx.args[:3]
    dense = [s for s in size if s != 1]
    row_major = [1] * len(dense)
    for i in range(len(dense) - 2, -1, -1):
        row_major[i] = row_major[i + 1] * dense[i + 1]
    if tuple(size) != x.meta.shape or [st for st, s in zip(stride, size) if s != 1] != row_major or ctx.args[3]:
        raise MissingVJPError(f"as_strided to size {list(size)}, stride {list(stride)} is more than a re-striding "
                              f"of its input (module '{ctx.node.module}'); only re-stridings are differentiable")
    return (g,)


@register(aten.expand.default)
def expand(ctx, g):
    x = ctx.node.args[0]
    return (ctx.sum_to(g, x.meta.shape),)


@register(aten.slice.Tensor)
def slice_(ctx, g):
    x, dim, start, end, step = ctx.args
    start = 0 if start is None else start
    end = sys.maxsize if end is None else end
    return (ctx(aten.slice_backward.default, g, list(x.meta.shape), dim, start, end, step),)


@register(aten.select.int)
def select(ctx, g):
    x, dim, index = ctx.node.args
    return (ctx(aten.select_backward.default, g, list(x.meta.shape), dim, index),)


@register(aten.cat.default)
def cat(ctx, g):
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
def split(ctx, g):
    return _join_split(ctx, g, ctx.args[2])


@register(aten.unbind.int)
def unbind(ctx, g):
    x, dim = ctx.args
    parts = [gi if gi is not None else ctx(aten.new_zeros.default, x, list(m.shape))
             for gi, m in zip(g, ctx.node.meta)]
    return (ctx(aten.stack.default, parts, dim),)


@register(aten.stack.default)
def stack(ctx, g):
    tensors, dim = ctx.args
    return ([ctx(aten.select.int, g, dim, i) if ctx.needs(x) else None for i, x in enumerate(tensors)],)


@register(aten.index.Tensor)
def index(ctx, g):
    x, indices = ctx.node.args
    zeros = ctx.zeros_like(x)
    return ctx(aten.index_put.default, zeros, indices, g, True), None


@register(aten.index_select.default)
def index_select(ctx, g):
    x, dim, idx = ctx.node.args
    return ctx(aten.index_add.default, ctx.zeros_like(x), dim, idx, g), None, None


@register(aten.gather.default)
def gather(ctx, g):
    x, dim, idx = ctx.node.args[:3]
    return ctx(aten.scatter_add.default, ctx.zeros_like(x), dim, idx, g), None, None


@register(aten.embedding.default)
def embedding(ctx, g):
    w, indices, padding_idx, scale, _sparse = ctx.args
    return ctx(aten.embedding_dense_backward.default, g, indices, w.meta.shape[0], padding_idx, scale), None


@register(aten.constant_pad_nd.default)
def constant_pad(ctx, g):
    pad = ctx.node.args[1]
    return (ctx(aten.constant_pad_nd.default, g, [-p for p in pad]),)


@register(aten.flip.default)
def flip(ctx, g):
    return (ctx(aten.flip.default, g, ctx.node.args[1]),)


@register(aten.repeat.default)
def repeat(ctx, g):
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
