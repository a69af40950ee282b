"""VJP rules of reductions, scans and pooling."""

import math

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register

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
def sum_dims(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims, keepdim = ctx.args[:3]
    dims = _dims(dims, len(x.meta.shape))
    return (_broadcast_back(ctx, _like(ctx, g, x), x, dims, keepdim),)


@register(aten.sum.default)
def sum_all(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (ctx(aten.expand.default, _like(ctx, g, x), list(x.meta.shape)),)


@register(aten.mean.dim)
def mean_dims(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims, keepdim = ctx.args[:3]
    dims = _dims(dims, len(x.meta.shape))
    count = 1
    for d in dims:
        count *= x.meta.shape[d]
    return (_broadcast_back(ctx, ctx(aten.div.Tensor, _like(ctx, g, x), count), x, dims, keepdim),)


@register(aten.mean.default)
def mean_all(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (ctx(aten.expand.default, ctx(aten.div.Tensor, _like(ctx, g, x), x.meta.numel), list(x.meta.shape)),)


@register(aten.cumsum.default)
def cumsum(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim = ctx.node.args[:2]
    g = _like(ctx, g, x)
    return (ctx(aten.flip.default, ctx(aten.cumsum.default, ctx(aten.flip.default, g, [dim]), dim), [dim]),)


def _reverse_cumsum(ctx, t, dim):
    return ctx(aten.flip.default, ctx(aten.cumsum.default, ctx(aten.flip.default, t, [dim]), dim), [dim])


@register(aten.cumprod.default)
def cumprod(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """d out_j / d x_k = prod_{i <= j, i != k} x_i for j >= k. Up to the first zero of x along `dim` that is
    out_j / x_k (the usual sum_{j >= k} g_j out_j / x_k: the out_j past the zero are 0); past it every product
    holds that zero; at it, the products are those of x with that one zero replaced by 1. All three are computed
    and picked per element, so the graph does not depend on where the zeros are (PyTorch branches on it)."""
    x, dim = ctx.node.args[:2]
    g = _like(ctx, g, x)
    if len(x.meta.shape) == 0:
        return (g,)
    is_zero = ctx(aten.eq.Scalar, x, 0)
    zeros_so_far = ctx(aten.cumsum.default, is_zero, dim)
    first_zero = ctx(aten.logical_and.default, is_zero, ctx(aten.eq.Scalar, zeros_so_far, 1))
    before_zero = ctx(aten.eq.Scalar, zeros_so_far, 0)
    one_zero_lifted = ctx(aten.where.ScalarSelf, first_zero, 1.0, x)  # x with its first zero replaced by 1
    out = _like(ctx, ctx.node, x)
    up_to_zero = ctx(aten.div.Tensor, _reverse_cumsum(ctx, ctx(aten.mul.Tensor, g, out), dim), one_zero_lifted)
    at_zero = _reverse_cumsum(ctx, ctx(aten.mul.Tensor, g, ctx(aten.cumprod.default, one_zero_lifted, dim)), dim)
    return (ctx(aten.where.self, before_zero, up_to_zero, ctx(aten.where.ScalarOther, first_zero, at_zero, 0.0)),)


@register(aten.amax.default)
def amax(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims, keepdim = ctx.args
    dims = _dims(dims, len(x.meta.shape))
    out = _broadcast_back(ctx, ctx.node, x, dims, keepdim)
    hit = ctx(aten._to_copy.default, ctx(aten.eq.Tensor, x, out), dtype=g.meta.dtype)
    # Ties share the gradient equally, as in PyTorch.
    count = ctx(aten.sum.dim_IntList, hit, dims, True)
    share = ctx(aten.div.Tensor, hit, count)
    return (ctx(aten.mul.Tensor, share, _broadcast_back(ctx, g, x, dims, keepdim)),)


@register(aten.max_pool2d_with_indices.default)
def max_pool2d(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, kernel, stride, padding, dilation, ceil_mode = ctx.args
    indices = ctx.graph.getitem(ctx.node, 1)
    return (ctx(aten.max_pool2d_with_indices_backward.default, g[0], x, kernel, stride, padding, dilation,
                ceil_mode, indices),)


@register(aten.fractional_max_pool2d.default)
def fractional_max_pool2d(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The maxima's places are the forward's indices, as in max pooling (the random samples take no gradient). The
    3-d op has no rule: its backward has no meta kernel, so no program can be built around it."""
    x, kernel, output_size, _samples = ctx.args
    return ctx(aten.fractional_max_pool2d_backward.default, g[0], x, kernel, output_size,
               ctx.graph.getitem(ctx.node, 1)), None


@register(aten.segment_reduce.default)
def segment_reduce(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """ATen's backward kernel, given the segments as lengths or offsets (`indices` is not implemented by ATen)."""
    data, reduce = ctx.args
    return (ctx(aten._segment_reduce_backward.default, g, ctx.node, data, reduce, lengths=ctx.kwarg("lengths"),
                offsets=ctx.kwarg("offsets"), axis=ctx.kwarg("axis"), initial=ctx.kwarg("initial")), None)


@register(aten._pdist_forward.default)
def pdist(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, p = ctx.args
    return (ctx(aten._pdist_backward.default, g, x, p, ctx.node),)


@register(aten.avg_pool2d.default)
def avg_pool2d(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.args
    return (ctx(aten.avg_pool2d_backward.default, g, x, kernel, stride or kernel, padding, ceil_mode,
                count_include_pad, divisor),)


@register(aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default)
def adaptive_avg_pool(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    backward = (aten._adaptive_avg_pool2d_backward.default if ctx.node.target is aten._adaptive_avg_pool2d.default
                else aten._adaptive_avg_pool3d_backward.default)
    return (ctx(backward, g, ctx.node.args[0]),)


def _var_grad(ctx, g, x, dims, keepdim, correction):
    n = 1
    for d in dims:
        n *= x.meta.shape[d]
    centered = ctx(aten.sub.Tensor, x, ctx(aten.mean.dim, x, dims, True))
    # As autograd: with no degrees of freedom left (n <= correction) the variance and its gradient are not finite.
    factor = 2.0 / (n - correction) if n != correction else math.inf
    return ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, _broadcast_back(ctx, g, x, dims, keepdim), factor), centered)


@register(aten.var.correction)
def var(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims = ctx.args
    correction = ctx.kwarg("correction")
    return (_var_grad(ctx, g, x, _dims(dims, len(x.meta.shape)), ctx.kwarg("keepdim"),
                      1 if correction is None else correction),)


@register(aten.var_mean.correction)
def var_mean(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims = ctx.args
    dims = _dims(dims, len(x.meta.shape))
    correction, keepdim = ctx.kwarg("correction"), ctx.kwarg("keepdim")
    gvar = gmean = None
    if g[0] is not None:
        gvar = _var_grad(ctx, g[0], x, dims, keepdim, 1 if correction is None else correction)
    if g[1] is not None:
        count = math.prod(x.meta.shape[d] for d in dims)
        gmean = _broadcast_back(ctx, ctx(aten.div.Tensor, g[1], count), x, dims, keepdim)
    return (gvar if gmean is None else gmean if gvar is None else ctx(aten.add.Tensor, gvar, gmean),)


def _ties_share(ctx, g, x, out, dims, keepdim):
    """The gradient of a max/min over `dims`: shared equally among the entries equal to the result."""
    hit = ctx(aten._to_copy.default, ctx(aten.eq.Tensor, x, _broadcast_back(ctx, out, x, dims, keepdim)),
              dtype=g.meta.dtype)
    share = ctx(aten.div.Tensor, hit, ctx(aten.sum.dim_IntList, hit, dims, True))
    return ctx(aten.mul.Tensor, share, _broadcast_back(ctx, g, x, dims, keepdim))


@register(aten.amin.default)
def amin(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dims, keepdim = ctx.args
    return (_ties_share(ctx, g, x, ctx.node, _dims(dims, len(x.meta.shape)), keepdim),)


@register(aten.max.default, aten.min.default, aten.median.default, aten.nanmedian.default)
def max_min_all(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (_ties_share(ctx, g, x, ctx.node, _dims(None, len(x.meta.shape)), False),)


def _scatter_back(ctx, g, x, dim, indices, keepdim):
    """The gradient of values picked at `indices` along `dim` (max.dim, sort, topk...): scattered back there."""
    return ctx(aten.value_selecting_reduction_backward.default, g, dim, indices, list(x.meta.shape), keepdim)


@register(aten.max.dim, aten.min.dim, aten.kthvalue.default, aten.mode.default, aten.median.dim,
          aten.nanmedian.dim)
def value_selecting(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, *rest = ctx.args
    dim = ctx.args[2] if ctx.node.target is aten.kthvalue.default else rest[0]
    keepdim = ctx.args[-1]
    return (_scatter_back(ctx, g[0], x, dim, ctx.graph.getitem(ctx.node, 1), keepdim),)


@register(aten.sort.default, aten.sort.stable, aten.topk.default)
def sort_topk(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    if ctx.node.target is aten.sort.stable:
        dim = ctx.kwarg("dim")
    else:
        dim = ctx.args[1] if ctx.node.target is aten.sort.default else ctx.args[2]
    return (_scatter_back(ctx, g[0], x, dim, ctx.graph.getitem(ctx.node, 1), True),)


@register(aten.cummax.default, aten.cummin.default)
def cummax_cummin(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim = ctx.args
    indices = ctx.graph.getitem(ctx.node, 1)
    return (ctx(aten.scatter_add.default, ctx.zeros_like(x), dim, indices, g[0]),)


def _exclusive_product(ctx, x, dim):
    """prod over `dim` of every entry but the one in place, without dividing (exact where x has zeros): the
    product of the entries before it times that of the entries after it."""
    n = x.meta.shape[dim]
    one = ctx(aten.ones_like.default, ctx(aten.slice.Tensor, x, dim, 0, 1))

    def shifted_cumprod(t):
        c = ctx(aten.cumprod.default, t, dim)
        return ctx(aten.cat.default, [one, ctx(aten.slice.Tensor, c, dim, 0, n - 1)], dim)

    before = shifted_cumprod(x)
    after = ctx(aten.flip.default, shifted_cumprod(ctx(aten.flip.default, x, [dim])), [dim])
    return ctx(aten.mul.Tensor, before, after)


@register(aten.prod.dim_int)
def prod_dim(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim, keepdim = ctx.args[:3]
    if len(x.meta.shape) == 0:
        return (_like(ctx, g, x),)
    dim = _dims([dim], len(x.meta.shape))[0]
    others = _exclusive_product(ctx, x, dim)
    return (ctx(aten.mul.Tensor, _broadcast_back(ctx, _like(ctx, g, x), x, [dim], keepdim), others),)


@register(aten.prod.default)
def prod_all(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    flat = ctx(aten.reshape.default, x, [-1])
    others = _exclusive_product(ctx, flat, 0) if x.meta.numel > 0 else flat
    gx = ctx(aten.mul.Tensor, _like(ctx, g, x), others)
    return (ctx(aten.reshape.default, gx, list(x.meta.shape)),)


@register(aten.linalg_vector_norm.default)
def vector_norm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, p, dims, keepdim = ctx.args[:4]
    return (_norm_grad(ctx, g, x, ctx.node, p, _dims(dims, len(x.meta.shape)), keepdim),)


def _norm_grad(ctx, g, x, norm, p, dims, keepdim):
    """The gradient of the p-norm `norm` of x over `dims`, as autograd's linalg_vector_norm_backward: sign(x)
    |x|^(p-1) / norm^(p-1), 0 where the norm is 0; the max/min norms share the gradient among the entries that
    reach them. None for p = 0 (piecewise constant)."""
    g = _like(ctx, g, x)
    norm = _like(ctx, norm, x)
    if p == 0:
        return None
    if math.isinf(p):
        ax = ctx(aten.abs.default, x)
        return ctx(aten.mul.Tensor, ctx(aten.sign.default, x), _ties_share(ctx, g, ax, norm, dims, keepdim))
    g = _broadcast_back(ctx, g, x, dims, keepdim)
    norm = _broadcast_back(ctx, norm, x, dims, keepdim)
    if p == 2:
        scaled = x
    else:
        scaled = ctx(aten.mul.Tensor, ctx(aten.sign.default, x), ctx(aten.pow.Tensor_Scalar, ctx(aten.abs.default, x),
                                                                         p - 1))
    if p < 1:  # |x|^(p-1) is infinite at 0, where autograd puts 0
        zero = ctx(aten.scalar_tensor.default, 0.0, dtype=x.meta.dtype)
        scaled = ctx(aten.where.self, ctx(aten.eq.Scalar, x, 0), zero, scaled)
        return ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, scaled, g), ctx(aten.pow.Tensor_Scalar, norm, 1 - p))
    scale = ctx(aten.div.Tensor, g, norm if p == 2 else ctx(aten.pow.Tensor_Scalar, norm, p - 1))
    zero = ctx(aten.scalar_tensor.default, 0.0, dtype=x.meta.dtype)
    scale = ctx(aten.where.self, ctx(aten.eq.Scalar, norm, 0), zero, scale)
    return ctx(aten.mul.Tensor, scaled, scale)


@register(aten.dist.default)
def dist(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """dist(a, b, p) = the p-norm of a - b (broadcast) over all of it: the norm's gradient, summed back to a and
    to b with its sign."""
    a, b, p = ctx.args
    difference = ctx(aten.sub.Tensor, a, b)
    grad = _norm_grad(ctx, g, difference, ctx.node, float(p), list(range(len(difference.meta.shape))), False)
    if grad is None:
        return None, None
    return (ctx.sum_to(grad, a.meta.shape) if ctx.needs(a) else None,
            ctx.sum_to(ctx(aten.neg.default, grad), b.meta.shape) if ctx.needs(b) else None)


def _reverse_logcumsumexp(ctx, t, dim):
    return ctx(aten.flip.default, ctx(aten.logcumsumexp.default, ctx(aten.flip.default, t, [dim]), dim), [dim])


@register(aten.logcumsumexp.default)
def logcumsumexp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """y_j = log sum_{i<=j} exp(x_i): gx_i = sum_{j>=i} g_j exp(x_i - y_j), summed in log space with the positive
    and the negative part of g apart so that nothing overflows (PyTorch's logcumsumexp_backward)."""
    x, dim = ctx.node.args[0], ctx.args[1]
    dim = dim + len(x.meta.shape) if dim < 0 else dim
    if len(x.meta.shape) == 0:
        return (g,)
    out = ctx.node
    minus_inf = ctx(aten.scalar_tensor.default, -math.inf, dtype=x.meta.dtype)

    def part(sign_test, magnitude):
        log_g = ctx(aten.where.self, sign_test, ctx(aten.log.default, magnitude), minus_inf)
        return ctx(aten.exp.default, ctx(aten.add.Tensor, _reverse_logcumsumexp(
            ctx, ctx(aten.sub.Tensor, log_g, out), dim), x))

    positive = part(ctx(aten.gt.Scalar, g, 0), g)
    negative = part(ctx(aten.lt.Scalar, g, 0), ctx(aten.neg.default, g))
    return (ctx(aten.sub.Tensor, positive, negative),)


def _pool_backward(backward, *extra_outputs: int):
    """A pooling op whose ATen backward takes (grad, input, *the op's arguments[, its indices output])."""

    def rule(ctx, g):
        x, kernel, stride, *args = ctx.args
        args = [kernel, stride or kernel, *args]  # an empty stride means the kernel size
        saved = [ctx.graph.getitem(ctx.node, i) for i in extra_outputs]
        return (ctx(backward, g[0] if extra_outputs else g, x, *args, *saved),)

    return rule


register(aten.max_pool3d_with_indices.default)(_pool_backward(aten.max_pool3d_with_indices_backward.default, 1))
register(aten.avg_pool3d.default)(_pool_backward(aten.avg_pool3d_backward.default))


@register(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    backward = (aten.adaptive_max_pool2d_backward.default if ctx.node.target is aten.adaptive_max_pool2d.default
                else aten.adaptive_max_pool3d_backward.default)
    return (ctx(backward, g[0], ctx.node.args[0], ctx.graph.getitem(ctx.node, 1)),)
