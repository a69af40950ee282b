"""VJP rules of normalizations and (log-)softmax."""

import operator

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.errors import MissingVJPError

aten = torch.ops.aten


def _unpack(ctx, out, mask):
    return [ctx(operator.getitem, out, i) if m else None for i, m in enumerate(mask)]


@register(aten._softmax.default)
def softmax(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, dim = ctx.node.args[:2]
    return (ctx(aten._softmax_backward_data.default, g, ctx.node, dim, x.meta.dtype),)


@register(aten._safe_softmax.default)
def safe_softmax(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Softmax whose fully masked (all -inf) rows are 0 instead of NaN: the same backward, on that output."""
    x, dim = ctx.args[:2]
    return (ctx(aten._softmax_backward_data.default, g, ctx.node, dim, x.meta.dtype),)


@register(aten._log_softmax.default)
def log_softmax(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """g - exp(out) * sum(g), written as ops rather than ATen's fused `_log_softmax_backward_data`, so that the
    in-place pass runs them in the memory of the output and of g, which usually die there: a language model's
    (tokens x vocabulary) log-probabilities are the largest tensors of its step, and the fused kernel needs a third
    one at the step's peak. (The fused kernel where the output's dtype is not the input's.)"""
    x, dim = ctx.node.args[:2]
    if x.meta.dtype != ctx.node.meta.dtype:
        return (ctx(aten._log_softmax_backward_data.default, g, ctx.node, dim, x.meta.dtype),)
    total = ctx(aten.sum.dim_IntList, g, [dim], True)
    return (ctx(aten.sub.Tensor, g, ctx(aten.mul.Tensor, ctx(aten.exp.default, ctx.node), total)),)


def _refuse_stat_cotangents(ctx, g, stats: str) -> None:
    """PyTorch defines no derivative for these statistics outputs (autograd treats them as constants): a loss
    that reads them is refused rather than silently given a partial gradient."""
    if any(gi is not None for gi in g[1:]):
        raise MissingVJPError(
            f"{ctx.node.op_name} (node %{ctx.node.name}, module '{ctx.node.module or '<top level>'}'): the loss "
            f"depends on its {stats} outputs, which PyTorch does not differentiate. Compute the statistics with "
            "mean/var ops instead, or detach them.")


@register(aten.native_layer_norm.default)
def layer_norm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, shape, w, b = ctx.node.args[:4]
    _refuse_stat_cotangents(ctx, g, "mean/rstd")
    mean, rstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    out = ctx(aten.native_layer_norm_backward.default, g[0], x, shape, mean, rstd, w, b, mask)
    gx, gw, gb = _unpack(ctx, out, mask)
    return gx, None, gw, gb  # one entry per argument: normalized_shape sits between input and weight


def _batch_norm_train(ctx, g, x, w, b, running_mean, running_var, eps):
    """Batch statistics: one fused kernel, reading the statistics the forward op saved (outputs 1 and 2)."""
    _refuse_stat_cotangents(ctx, g, "statistics")
    save_mean, save_invstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    out = ctx(aten.native_batch_norm_backward.default, g[0], x, w, running_mean, running_var, save_mean,
              save_invstd, True, eps, mask)
    return _unpack(ctx, out, mask)


def _batch_norm_frozen(ctx, g, x, w, b, running_mean, running_var, eps):
    """With frozen statistics the normalization is a per-channel affine map. Only gamma's gradient reads the
    input: then one fused kernel computes everything asked; otherwise the gradients are element-wise and the
    input need not be saved."""
    _refuse_stat_cotangents(ctx, g, "statistics")
    g = g[0]
    if ctx.needs(w):
        mask = [ctx.needs(x), True, ctx.needs(b)]
        # The op's two (empty) statistics outputs, as autograd passes them: CUDA's kernel refuses None there.
        save_mean, save_invstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
        out = ctx(aten.native_batch_norm_backward.default, g, x, w, running_mean, running_var, save_mean,
                  save_invstd, False, eps, mask)
        return _unpack(ctx, out, mask)
    channel = [1, x.meta.shape[1]] + [1] * (len(x.meta.shape) - 2)
    gx = gb = None
    if ctx.needs(x):
        invstd = ctx(aten.rsqrt.default, ctx(aten.add.Tensor, running_var, eps))
        scale = invstd if w is None else ctx(aten.mul.Tensor, w, invstd)
        gx = ctx(aten.mul.Tensor, g, ctx(aten.view.default, scale, channel))
    if ctx.needs(b):
        gb = ctx(aten.sum.dim_IntList, g, [0] + list(range(2, len(x.meta.shape))))
    return [gx, None, gb]


@register(aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default)
def batch_norm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, w, b, running_mean, running_var, training, _momentum, eps = ctx.args
    rule = _batch_norm_train if training else _batch_norm_frozen
    return (*rule(ctx, g, x, w, b, running_mean, running_var, eps), None, None)


@register(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The newer training-mode batch norm (always batch statistics; outputs 1 and 2 are the saved ones)."""
    x, w, b, running_mean, running_var, _momentum, eps = ctx.args
    return (*_batch_norm_train(ctx, g, x, w, b, running_mean, running_var, eps), None, None)


@register(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Batch statistics without running ones (instance norm, F.batch_norm without buffers): the op cannot run
    with training=False, so this is always the training form."""
    x, w, b, _training, _momentum, eps = ctx.args
    return _batch_norm_train(ctx, g, x, w, b, None, None, eps)


@register(aten._native_batch_norm_legit_no_training.default)
def batch_norm_no_training(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, w, b, running_mean, running_var, _momentum, eps = ctx.args
    return (*_batch_norm_frozen(ctx, g, x, w, b, running_mean, running_var, eps), None, None)


def _group_stat_grad(ctx, g, x, groups):
    """The cotangent of x from those of the per-group mean and rstd (outputs 1 and 2, shape [N, groups]), which
    PyTorch differentiates: d mean/dx = 1/M, d rstd/dx = -rstd^3 (x - mean)/M over the M elements of a group."""
    n = x.meta.shape[0]
    grouped = ctx(aten.reshape.default, x, [n, groups, -1])
    size = grouped.meta.shape[2]
    mean, rstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    total = None
    if g[1] is not None:
        total = ctx(aten.expand.default, ctx(aten.unsqueeze.default, ctx(aten.div.Tensor, g[1], size), -1),
                    list(grouped.meta.shape))
    if g[2] is not None:
        coef = ctx(aten.mul.Tensor, g[2], ctx(aten.mul.Tensor, ctx(aten.pow.Tensor_Scalar, rstd, 3), -1.0 / size))
        centered = ctx(aten.sub.Tensor, grouped, ctx(aten.unsqueeze.default, mean, -1))
        term = ctx(aten.mul.Tensor, ctx(aten.unsqueeze.default, coef, -1), centered)
        total = term if total is None else ctx(aten.add.Tensor, total, term)
    return ctx(aten.reshape.default, total, list(x.meta.shape))


@register(aten.native_group_norm.default)
def group_norm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, w, b, n, c, hxw, groups, _eps = ctx.node.args
    mean, rstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    gx = gw = gb = None
    if g[0] is not None:
        # The kernel reads its gradient and input as dense arrays of one layout (autograd makes both contiguous
        # in the input's layout); the gradient may come expanded (after a mean) or permuted, and a channels-last
        # input beside a contiguous gradient gives garbage, or a segmentation fault.
        dense = ctx(aten.contiguous.default, g[0])
        x_dense = ctx(aten.contiguous.default, x)
        out = ctx(aten.native_group_norm_backward.default, dense, x_dense, mean, rstd, w, n, c, hxw, groups, mask)
        gx, gw, gb = _unpack(ctx, out, mask)
    if ctx.needs(x) and (g[1] is not None or g[2] is not None):
        stat = _group_stat_grad(ctx, g, x, groups)
        gx = stat if gx is None else ctx(aten.add.Tensor, gx, stat)
    return gx, gw, gb
