"""VJP rules of elementwise ops: arithmetic, activations, selection, casts, dropout."""

import math

import torch

from pockengine.autodiff.registry import register
from pockengine.ir.graph import Node

aten = torch.ops.aten


def _shape(x):
    return x.meta.shape


def _reduce(ctx, g, x):
    return ctx.sum_to(g, _shape(x)) if ctx.needs(x) else None


@register(aten.add.Tensor)
def add(ctx, g):
    a, b = ctx.node.args[:2]
    alpha = ctx.kwarg("alpha")
    gb = g if alpha == 1 or not ctx.needs(b) else ctx(aten.mul.Tensor, g, alpha)
    return _reduce(ctx, g, a), _reduce(ctx, gb, b)


@register(aten.sub.Tensor)
def sub(ctx, g):
    a, b = ctx.node.args[:2]
    alpha = ctx.kwarg("alpha")
    gb = ctx.sum_to(ctx(aten.mul.Tensor, g, -alpha), _shape(b)) if ctx.needs(b) else None
    return _reduce(ctx, g, a), gb


@register(aten.add.Scalar, aten.sub.Scalar, aten.clone.default, aten.alias.default, aten.contiguous.default)
def identity(ctx, g):
    return (g,)


@register(aten.mul.Tensor)
def mul(ctx, g):
    a, b = ctx.node.args
    ga = ctx.sum_to(ctx(aten.mul.Tensor, g, b), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(ctx(aten.mul.Tensor, g, a), _shape(b)) if ctx.needs(b) else None
    return ga, gb


@register(aten.mul.Scalar)
def mul_scalar(ctx, g):
    return (ctx(aten.mul.Tensor, g, ctx.node.args[1]),)


@register(aten.div.Tensor)
def div(ctx, g):
    a, b = ctx.node.args
    ga = ctx.sum_to(ctx(aten.div.Tensor, g, b), _shape(a)) if ctx.needs(a) else None
    gb = None
    if ctx.needs(b):  # d(a/b)/db = -out/b
        gb = ctx.sum_to(ctx(aten.neg.default, ctx(aten.div.Tensor, ctx(aten.mul.Tensor, g, ctx.node), b)), _shape(b))
    return ga, gb


@register(aten.div.Scalar)
def div_scalar(ctx, g):
    return (ctx(aten.div.Tensor, g, ctx.node.args[1]),)


@register(aten.neg.default)
def neg(ctx, g):
    return (ctx(aten.neg.default, g),)


@register(aten.pow.Tensor_Scalar)
def pow_scalar(ctx, g):
    x, e = ctx.node.args
    if e == 0:
        return (ctx.zeros_like(x),)
    d = ctx(aten.mul.Tensor, ctx(aten.pow.Tensor_Scalar, x, e - 1), e) if e != 1 else None
    return (ctx(aten.mul.Tensor, g, d) if d is not None else g,)


@register(aten.pow.Tensor_Tensor)
def pow_tensor(ctx, g):
    x, e = ctx.node.args
    gx = ge = None
    if ctx.needs(x):
        d = ctx(aten.mul.Tensor, e, ctx(aten.pow.Tensor_Tensor, x, ctx(aten.sub.Tensor, e, 1)))
        gx = ctx.sum_to(ctx(aten.mul.Tensor, g, d), _shape(x))
    if ctx.needs(e):
        ge = ctx.sum_to(ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, g, ctx.node), ctx(aten.log.default, x)), _shape(e))
    return gx, ge


@register(aten.sqrt.default)
def sqrt(ctx, g):
    return (ctx(aten.div.Tensor, g, ctx(aten.mul.Tensor, ctx.node, 2)),)


@register(aten.rsqrt.default)
def rsqrt(ctx, g):  # d x^-1/2 = -1/2 x^-3/2 = -1/2 out^3
    return (ctx(aten.mul.Tensor, g, ctx(aten.mul.Tensor, ctx(aten.pow.Tensor_Scalar, ctx.node, 3), -0.5)),)


@register(aten.reciprocal.default)
def reciprocal(ctx, g):
    return (ctx(aten.neg.default, ctx(aten.mul.Tensor, g, ctx(aten.mul.Tensor, ctx.node, ctx.node))),)


@register(aten.exp.default)
def exp(ctx, g):
    return (ctx(aten.mul.Tensor, g, ctx.node),)


@register(aten.log.default)
def log(ctx, g):
    return (ctx(aten.div.Tensor, g, ctx.node.args[0]),)


@register(aten.sin.default)
def sin(ctx, g):
    return (ctx(aten.mul.Tensor, g, ctx(aten.cos.default, ctx.node.args[0])),)


@register(aten.cos.default)
def cos(ctx, g):
    return (ctx(aten.neg.default, ctx(aten.mul.Tensor, g, ctx(aten.sin.default, ctx.node.args[0]))),)


@register(aten.abs.default)
def abs_(ctx, g):
    return (ctx(aten.mul.Tensor, g, ctx(aten.sign.default, ctx.node.args[0])),)


@register(aten.erf.default)
def erf(ctx, g):
    x = ctx.node.args[0]
    d = ctx(aten.mul.Tensor, ctx(aten.exp.default, ctx(aten.neg.default, ctx(aten.mul.Tensor, x, x))),
            2 / math.sqrt(math.pi))
    return (ctx(aten.mul.Tensor, g, d),)


@register(aten.tanh.default)
def tanh(ctx, g):
    return (ctx(aten.tanh_backward.default, g, ctx.node),)


@register(aten.sigmoid.default)
def sigmoid(ctx, g):
    return (ctx(aten.sigmoid_backward.default, g, ctx.node),)


@register(aten.relu.default)
def relu(ctx, g):
    return (ctx(aten.threshold_backward.default, g, ctx.node, 0),)


@register(aten.gelu.default)
def gelu(ctx, g):
    approximate = ctx.kwarg("approximate")
    return (ctx(aten.gelu_backward.default, g, ctx.node.args[0], approximate=approximate),)


@register(aten.silu.default)
def silu(ctx, g):
    return (ctx(aten.silu_backward.default, g, ctx.node.args[0]),)


@register(aten.hardtanh.default)
def hardtanh(ctx, g):
    """Reads the output, not the input (lo < x < hi exactly where lo < out < hi): the output is usually kept for
    the next layer's weight gradient anyway, so the input need not be."""
    _, lo, hi = ctx.args
    return (ctx(aten.hardtanh_backward.default, g, ctx.node, lo, hi),)


@register(aten.hardswish.default)
def hardswish(ctx, g):
    return (ctx(aten.hardswish_backward.default, g, ctx.node.args[0]),)


@register(aten.hardsigmoid.default)
def hardsigmoid(ctx, g):
    return (ctx(aten.hardsigmoid_backward.default, g, ctx.node.args[0]),)


@register(aten.leaky_relu.default)
def leaky_relu(ctx, g):
    x, slope = ctx.args
    return (ctx(aten.leaky_relu_backward.default, g, x, slope, False),)


def _masked(ctx, g, keep: Node):
    """g where `keep` holds, 0 elsewhere (a select, so that inf/nan in the dropped part never leak)."""
    zero = ctx(aten.scalar_tensor.default, 0.0, dtype=g.meta.dtype)
    return ctx(aten.where.self, keep, g, zero)


@register(aten.where.self)
def where(ctx, g):
    cond, a, b = ctx.node.args
    ga = ctx.sum_to(_masked(ctx, g, cond), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, cond)), _shape(b)) if ctx.needs(b) else None
    return None, ga, gb


@register(aten.masked_fill.Scalar)
def masked_fill(ctx, g):
    x, mask = ctx.node.args[:2]
    return ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, mask)), _shape(x)), None


@register(aten.clamp.default)
def clamp(ctx, g):
    x, lo, hi = ctx.args
    keep = None
    if lo is not None:
        keep = ctx(aten.ge.Scalar, x, lo)
    if hi is not None:
        upper = ctx(aten.le.Scalar, x, hi)
        keep = upper if keep is None else ctx(aten.logical_and.default, keep, upper)
    return (g if keep is None else _masked(ctx, g, keep),)


@register(aten.maximum.default, aten.minimum.default)
def maximum_minimum(ctx, g):
    a, b = ctx.node.args
    # Ties split the gradient in half, as PyTorch does.
    pick_a = ctx(aten.eq.Tensor, ctx.node, a)
    pick_b = ctx(aten.eq.Tensor, ctx.node, b)
    share = ctx(aten.add.Tensor, ctx(aten._to_copy.default, pick_a, dtype=g.meta.dtype),
                ctx(aten._to_copy.default, pick_b, dtype=g.meta.dtype))
    half = ctx(aten.div.Tensor, g, share)
    ga = ctx.sum_to(_masked(ctx, half, pick_a), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(_masked(ctx, half, pick_b), _shape(b)) if ctx.needs(b) else None
    return ga, gb


@register(aten._to_copy.default)
def to_copy(ctx, g):
    x = ctx.node.args[0]
    return (g if g.meta.dtype == x.meta.dtype else ctx(aten._to_copy.default, g, dtype=x.meta.dtype),)


@register(aten.native_dropout.default)
def native_dropout(ctx, g):
    _x, p, train = ctx.args
    mask = ctx.graph.getitem(ctx.node, 1)
    # As in PyTorch: no scaling when not training (the output is the input), and p = 1 keeps nothing.
    scale = 1.0 if not train else 0.0 if p == 1 else 1.0 / (1.0 - p)
    return (ctx(aten.native_dropout_backward.default, g[0], mask, scale),)
