"""VJP rules of reductions, scans and pooling."""

import math

import torch

from pockengine.autodiff.registry import register

aten = torch.ops.aten


def _dims(dims, ndim):
    """The reduced dimensions, non-negative and sorted; none or all of them means all. A 0-d tensor has no
    dimension to reduce, although PyTorch accepts dim 0 or -1 for it."""
    if dims is None or len(dims) == 0 or ndim == 0:
        return list(range(ndim))
    return sorted(d + ndim if d < 0 else d for d in dims)


def _like(ctx, g, x):
    """g in x's dtype: a reduction or scan may accumulate in another (`sum(x, dtype=torch.float64)`)."""
    return g if g.meta.dtype == x.meta.dtype else ctx(aten._to_copy.default, g, dtype=x.meta.dtype)


def _broadcast_back(ctx, g, x, dims, keepdim):
    shape = list(x.meta.shape)
    if not keepdim:
        kept = [1 if i in dims else s for i, s in enumerate(shape)]
        g = ctx(aten.reshape.default, g, kept)
    return ctx(aten.expand.default, g, shape)


@register(aten.sum.dim_IntList)
def sum_dims(ctx, g):
    x, dims, keepdim = ctx.args[:3]
    dims = _dims(dims, len(x.meta.shape))
    return (_broadcast_back(ctx, _like(ctx, g, x), x, dims, keepdim),)


@register(aten.sum.default)
def sum_all(ctx, g):
    x = ctx.node.args[0]
    return (ctx(aten.expand.default, _like(ctx, g, x), list(x.meta.shape)),)


@register(aten.mean.dim)
def mean_dims(ctx, g):
    x, dims, keepdim = ctx.args[:3]
    dims = _dims(dims, len(x.meta.shape))
    count = 1
    for d in dims:
        count *= x.meta.shape[d]
    return (_broadcast_back(ctx, ctx(aten.div.Tensor, _like(ctx, g, x), count), x, dims, keepdim),)


@register(aten.mean.default)
def mean_all(ctx, g):
    x = ctx.node.args[0]
    return (ctx(aten.expand.default, ctx(aten.div.Tensor, _like(ctx, g, x), x.meta.numel), list(x.meta.shape)),)


@register(aten.cumsum.default)
def cumsum(ctx, g):
    x, dim = ctx.node.args[:2]
    g = _like(ctx, g, x)
    return (ctx(aten.flip.default, ctx(aten.cumsum.default, ctx(aten.flip.default, g, [dim]), dim), [dim]),)


@register(aten.amax.default)
def amax(ctx, g):
    x, dims, keepdim = ctx.args
    dims = _dims(dims, len(x.meta.shape))
    out = _broadcast_back(ctx, ctx.node, x, dims, keepdim)
    hit = ctx(aten._to_copy.default, ctx(aten.eq.Tensor, x, out), dtype=g.meta.dtype)
    # Ties share the gradient equally, as in PyTorch.
    count = ctx(aten.sum.dim_IntList, hit, dims, True)
    share = ctx(aten.div.Tensor, hit, count)
    return (ctx(aten.mul.Tensor, share, _broadcast_back(ctx, g, x, dims, keepdim)),)


@register(aten.max_pool2d_with_indices.default)
def max_pool2d(ctx, g):
    x, kernel, stride, padding, dilation, ceil_mode = ctx.args
    indices = ctx.graph.getitem(ctx.node, 1)
    return (ctx(aten.max_pool2d_with_indices_backward.default, g[0], x, kernel, stride, padding, dilation,
                ceil_mode, indices),)


@register(aten.avg_pool2d.default)
def avg_pool2d(ctx, g):
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.args
    return (ctx(aten.avg_pool2d_backward.default, g, x, kernel, stride or kernel, padding, ceil_mode,
                count_include_pad, divisor),)


@register(aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(ctx, g):
    return (ctx(aten._adaptive_avg_pool2d_backward.default, g, ctx.node.args[0]),)


@register(aten.var.correction)
def var(ctx, g):
    x, dims = ctx.args
    dims = _dims(dims, len(x.meta.shape))
    correction = ctx.kwarg("correction")
    correction = 1 if correction is None else correction
    keepdim = ctx.kwarg("keepdim")
    n = 1
    for d in dims:
        n *= x.meta.shape[d]
    centered = ctx(aten.sub.Tensor, x, ctx(aten.mean.dim, x, dims, True))
    # As autograd: with no degrees of freedom left (n <= correction) the variance and its gradient are not finite.
    factor = 2.0 / (n - correction) if n != correction else math.inf
    scale = ctx(aten.mul.Tensor, _broadcast_back(ctx, g, x, dims, keepdim), factor)
    return (ctx(aten.mul.Tensor, scale, centered),)
