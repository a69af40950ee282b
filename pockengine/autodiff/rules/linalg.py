"""VJP rules of matrix products and convolution."""

import operator

import torch

from pockengine.autodiff.registry import register

aten = torch.ops.aten


def _t(ctx, x):
    """Swap the last two dimensions."""
    n = len(x.meta.shape)
    return ctx(aten.permute.default, x, list(range(n - 2)) + [n - 1, n - 2])


@register(aten.mm.default)
def mm(ctx, g):
    a, b = ctx.node.args
    return (ctx(aten.mm.default, g, _t(ctx, b)) if ctx.needs(a) else None,
            ctx(aten.mm.default, _t(ctx, a), g) if ctx.needs(b) else None)


@register(aten.bmm.default)
def bmm(ctx, g):
    a, b = ctx.node.args
    return (ctx(aten.bmm.default, g, _t(ctx, b)) if ctx.needs(a) else None,
            ctx(aten.bmm.default, _t(ctx, a), g) if ctx.needs(b) else None)


@register(aten.addmm.default)
def addmm(ctx, g):
    bias, a, b = ctx.node.args
    beta, alpha = ctx.node.kwargs.get("beta", 1), ctx.node.kwargs.get("alpha", 1)
    scaled = g if alpha == 1 else ctx(aten.mul.Tensor, g, alpha)
    gbias = None
    if ctx.needs(bias):
        gbias = ctx.sum_to(g if beta == 1 else ctx(aten.mul.Tensor, g, beta), bias.meta.shape)
    return (gbias,
            ctx(aten.mm.default, scaled, _t(ctx, b)) if ctx.needs(a) else None,
            ctx(aten.mm.default, _t(ctx, a), scaled) if ctx.needs(b) else None)


@register(aten.convolution.default)
def convolution(ctx, g):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = ctx.node.args
    mask = [ctx.needs(x), ctx.needs(w), ctx.needs(b)]
    bias_sizes = list(b.meta.shape) if b is not None else None
    out = ctx(aten.convolution_backward.default, g, x, w, bias_sizes, stride, padding, dilation, transposed,
              output_padding, groups, mask)
    grads = [ctx(operator.getitem, out, i) if m else None for i, m in enumerate(mask)]
    return tuple(grads)
