"""VJP rules of normalizations and (log-)softmax."""

import operator

import torch

from pockengine.autodiff.registry import register

aten = torch.ops.aten


def _unpack(ctx, out, mask):
    return [ctx(operator.getitem, out, i) if m else None for i, m in enumerate(mask)]


@register(aten._softmax.default)
def softmax(ctx, g):
    x, dim = ctx.node.args[:2]
    return (ctx(aten._softmax_backward_data.default, g, ctx.node, dim, x.meta.dtype),)


@register(aten._log_softmax.default)
def log_softmax(ctx, g):
    x, dim = ctx.node.args[:2]
    return (ctx(aten._log_softmax_backward_data.default, g, ctx.node, dim, x.meta.dtype),)


@register(aten.native_layer_norm.default)
def layer_norm(ctx, g):
    x, shape, w, b = ctx.node.args[:4]
    mean, rstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    out = ctx(aten.native_layer_norm_backward.default, g[0], x, shape, mean, rstd, w, b, mask)
    gx, gw, gb = _unpack(ctx, out, mask)
    return gx, None, gw, gb  # one entry per argument: normalized_shape sits between input and weight


@register(aten._native_batch_norm_legit_functional.default)
def batch_norm_train(ctx, g):
    x, w, b, running_mean, running_var, _training, _momentum, eps = ctx.node.args
    save_mean, save_invstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    out = ctx(aten.native_batch_norm_backward.default, g[0], x, w, running_mean, running_var, save_mean,
              save_invstd, True, eps, mask)
    return tuple(_unpack(ctx, out, mask))


@register(aten._native_batch_norm_legit_no_training.default)
def batch_norm_frozen(ctx, g):
    """With frozen statistics the normalization is a per-channel affine map. Only gamma's gradient reads the
    input: then one fused kernel computes everything asked; otherwise the gradients are element-wise and the
    input need not be saved."""
    x, w, b, running_mean, running_var, _momentum, eps = ctx.node.args
    g = g[0]
    if ctx.needs(w):
        mask = [ctx.needs(x), True, ctx.needs(b)]
        # The op's two (empty) statistics outputs, as autograd passes them: CUDA's kernel refuses None there.
        save_mean, save_invstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
        out = ctx(aten.native_batch_norm_backward.default, g, x, w, running_mean, running_var, save_mean,
                  save_invstd, False, eps, mask)
        return (*_unpack(ctx, out, mask), None, None)
    channel = [1, x.meta.shape[1]] + [1] * (len(x.meta.shape) - 2)
    gx = gb = None
    if ctx.needs(x):
        invstd = ctx(aten.rsqrt.default, ctx(aten.add.Tensor, running_var, eps))
        scale = invstd if w is None else ctx(aten.mul.Tensor, w, invstd)
        gx = ctx(aten.mul.Tensor, g, ctx(aten.view.default, scale, channel))
    if ctx.needs(b):
        gb = ctx(aten.sum.dim_IntList, g, [0] + list(range(2, len(x.meta.shape))))
    return gx, None, gb, None, None


@register(aten.native_group_norm.default)
def group_norm(ctx, g):
    x, w, b, n, c, hxw, groups, _eps = ctx.node.args
    mean, rstd = ctx.graph.getitem(ctx.node, 1), ctx.graph.getitem(ctx.node, 2)
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    out = ctx(aten.native_group_norm_backward.default, g[0], x, mean, rstd, w, n, c, hxw, groups, mask)
    return tuple(_unpack(ctx, out, mask))
