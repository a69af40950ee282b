"""VJP rules of elementwise ops: arithmetic, activations, selection, casts, dropout."""

import math

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.errors import MissingVJPError
from pockengine.ir.graph import Node

aten = torch.ops.aten


def _shape(x):
    return x.meta.shape


def _reduce(ctx, g, x):
    return ctx.sum_to(g, _shape(x)) if ctx.needs(x) else None


@register(aten.add.Tensor)
def add(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args[:2]
    alpha = ctx.kwarg("alpha")
    gb = g if alpha == 1 or not ctx.needs(b) else ctx(aten.mul.Tensor, g, alpha)
    return _reduce(ctx, g, a), _reduce(ctx, gb, b)


@register(aten.sub.Tensor)
def sub(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args[:2]
    alpha = ctx.kwarg("alpha")
    gb = ctx.sum_to(ctx(aten.mul.Tensor, g, -alpha), _shape(b)) if ctx.needs(b) else None
    return _reduce(ctx, g, a), gb


@register(aten.add.Scalar, aten.sub.Scalar, aten.clone.default, aten.alias.default, aten.contiguous.default)
def identity(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (g,)


@register(aten.mul.Tensor)
def mul(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args
    ga = _complex_to(ctx, ctx.sum_to(ctx(aten.mul.Tensor, g, _conj(ctx, b)), _shape(a)), a) if ctx.needs(a) else None
    gb = _complex_to(ctx, ctx.sum_to(ctx(aten.mul.Tensor, g, _conj(ctx, a)), _shape(b)), b) if ctx.needs(b) else None
    return ga, gb


def _is_complex(x) -> bool:
    return isinstance(x, Node) and x.meta.dtype.is_complex


def _conj(ctx, x):
    """The conjugate of a complex factor: PyTorch's cotangent of a complex tensor is conj(d out / d x) * g."""
    return ctx(aten.conj_physical.default, x) if _is_complex(x) else x


@register(aten._conj.default, aten.conj_physical.default)
def conj(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Conjugation is its own adjoint (real-linear): the cotangent conjugated (unchanged for a real tensor)."""
    return (_conj(ctx, g),)


def _complex_to(ctx, g, x):
    """The cotangent of a real `x` from a complex product with it: the real part."""
    return ctx(aten.real.default, g) if _is_complex(g) and not _is_complex(x) else g


@register(aten.mul.Scalar)
def mul_scalar(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.mul.Tensor, g, ctx.node.args[1]),)


@register(aten.div.Tensor)
def div(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args
    ga = ctx.sum_to(ctx(aten.div.Tensor, g, b), _shape(a)) if ctx.needs(a) else None
    gb = None
    if ctx.needs(b):  # d(a/b)/db = -out/b
        gb = ctx.sum_to(ctx(aten.neg.default, ctx(aten.div.Tensor, ctx(aten.mul.Tensor, g, ctx.node), b)), _shape(b))
    return ga, gb


@register(aten.div.Scalar)
def div_scalar(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.div.Tensor, g, ctx.node.args[1]),)


@register(aten.neg.default)
def neg(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.neg.default, g),)


@register(aten.pow.Tensor_Scalar)
def pow_scalar(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, e = ctx.node.args
    if e == 0:
        return (ctx.zeros_like(x),)
    d = ctx(aten.mul.Tensor, ctx(aten.pow.Tensor_Scalar, x, e - 1), e) if e != 1 else None
    return (ctx(aten.mul.Tensor, g, d) if d is not None else g,)


@register(aten.pow.Tensor_Tensor)
def pow_tensor(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, e = ctx.node.args
    gx = ge = None
    if ctx.needs(x):
        d = ctx(aten.mul.Tensor, e, ctx(aten.pow.Tensor_Tensor, x, ctx(aten.sub.Tensor, e, 1)))
        gx = ctx.sum_to(ctx(aten.mul.Tensor, g, d), _shape(x))
    if ctx.needs(e):
        ge = ctx.sum_to(ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, g, ctx.node), ctx(aten.log.default, x)), _shape(e))
    return gx, ge


@register(aten.sqrt.default)
def sqrt(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.div.Tensor, g, ctx(aten.mul.Tensor, ctx.node, 2)),)


@register(aten.rsqrt.default)
def rsqrt(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:  # d x^-1/2 = -1/2 x^-3/2 = -1/2 out^3
    return (ctx(aten.mul.Tensor, g, ctx(aten.mul.Tensor, ctx(aten.pow.Tensor_Scalar, ctx.node, 3), -0.5)),)


@register(aten.reciprocal.default)
def reciprocal(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.neg.default, ctx(aten.mul.Tensor, g, ctx(aten.mul.Tensor, ctx.node, ctx.node))),)


@register(aten.exp.default)
def exp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.mul.Tensor, g, ctx.node),)


@register(aten.log.default)
def log(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.div.Tensor, g, ctx.node.args[0]),)


@register(aten.sin.default)
def sin(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.mul.Tensor, g, ctx(aten.cos.default, ctx.node.args[0])),)


@register(aten.cos.default)
def cos(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.neg.default, ctx(aten.mul.Tensor, g, ctx(aten.sin.default, ctx.node.args[0]))),)


@register(aten.abs.default)
def abs_(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.mul.Tensor, g, ctx(aten.sign.default, ctx.node.args[0])),)


@register(aten.erf.default)
def erf(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    d = ctx(aten.mul.Tensor, ctx(aten.exp.default, ctx(aten.neg.default, ctx(aten.mul.Tensor, x, x))),
            2 / math.sqrt(math.pi))
    return (ctx(aten.mul.Tensor, g, d),)


@register(aten.tanh.default)
def tanh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.tanh_backward.default, g, ctx.node),)


@register(aten.sigmoid.default)
def sigmoid(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.sigmoid_backward.default, g, ctx.node),)


@register(aten.relu.default)
def relu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.threshold_backward.default, g, ctx.node, 0),)


@register(aten.gelu.default)
def gelu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    approximate = ctx.kwarg("approximate")
    return (ctx(aten.gelu_backward.default, g, ctx.node.args[0], approximate=approximate),)


@register(aten.silu.default)
def silu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.silu_backward.default, g, ctx.node.args[0]),)


@register(aten.hardtanh.default)
def hardtanh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Reads the output, not the input (lo < x < hi exactly where lo < out < hi): the output is usually kept for
    the next layer's weight gradient anyway, so the input need not be."""
    _, lo, hi = ctx.args
    return (ctx(aten.hardtanh_backward.default, g, ctx.node, lo, hi),)


@register(aten.hardswish.default)
def hardswish(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.hardswish_backward.default, g, ctx.node.args[0]),)


@register(aten.hardsigmoid.default)
def hardsigmoid(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.hardsigmoid_backward.default, g, ctx.node.args[0]),)


@register(aten.leaky_relu.default)
def leaky_relu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, slope = ctx.args
    return (ctx(aten.leaky_relu_backward.default, g, x, slope, False),)


@register(aten.rrelu_with_noise_functional.default)
def rrelu_with_noise(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Randomized leaky ReLU: the slopes drawn in the forward pass (its second output; `noise`'s old values are
    only overwritten) scale the negative part, as eval mode's mean slope does (ATen's backward covers both)."""
    x, _noise, lower, upper, training = ctx.args[:5]
    return ctx(aten.rrelu_with_noise_backward.default, g[0], x, ctx.graph.getitem(ctx.node, 1), lower, upper,
               training, False), None


@register(aten.normal.Tensor_Tensor, aten.normal.Tensor_float, aten.normal.float_Tensor)
def normal(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """torch.normal(mean, std) is a draw: autograd gives its mean and std a zero gradient (not the
    reparameterization mean + std * eps, which a model writes out when it wants that gradient)."""
    return None, None


def _masked(ctx, g, keep: Node):
    """g where `keep` holds, 0 elsewhere (a select, so that inf/nan in the dropped part never leak)."""
    zero = ctx(aten.scalar_tensor.default, 0.0, dtype=g.meta.dtype)
    return ctx(aten.where.self, keep, g, zero)


@register(aten.where.self)
def where(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    cond, a, b = ctx.node.args
    ga = ctx.sum_to(_masked(ctx, g, cond), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, cond)), _shape(b)) if ctx.needs(b) else None
    return None, ga, gb


@register(aten.masked_fill.Scalar)
def masked_fill(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, mask = ctx.node.args[:2]
    return ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, mask)), _shape(x)), None


@register(aten.clamp.default)
def clamp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, lo, hi = ctx.args
    keep = _within(ctx, x, lo, hi, aten.ge.Scalar, aten.le.Scalar)
    return (g if keep is None else _masked(ctx, g, keep),)


def _within(ctx, x, lo, hi, ge, le):
    """Where lo <= x <= hi (a bound of None is no bound; None where neither is given): clamp passes x's gradient."""
    keep = None
    if lo is not None:
        keep = ctx(ge, x, lo)
    if hi is not None:
        upper = ctx(le, x, hi)
        keep = upper if keep is None else ctx(aten.logical_and.default, keep, upper)
    return keep


@register(aten.maximum.default, aten.minimum.default)
def maximum_minimum(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
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
def to_copy(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    if g.meta.dtype.is_complex and not x.meta.dtype.is_complex:  # a real tensor made complex: its real part
        g = ctx(aten.real.default, g)
    return (g if g.meta.dtype == x.meta.dtype else ctx(aten._to_copy.default, g, dtype=x.meta.dtype),)


@register(aten.native_dropout.default)
def native_dropout(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    _x, p, train = ctx.args
    mask = ctx.graph.getitem(ctx.node, 1)
    # As in PyTorch: no scaling when not training (the output is the input), and p = 1 keeps nothing.
    scale = 1.0 if not train else 0.0 if p == 1 else 1.0 / (1.0 - p)
    return (ctx(aten.native_dropout_backward.default, g[0], mask, scale),)


def _times(ctx, g, d):
    return (ctx(aten.mul.Tensor, g, d),)


@register(aten.log1p.default)
def log1p(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.div.Tensor, g, ctx(aten.add.Tensor, ctx.node.args[0], 1)),)


@register(aten.expm1.default)
def expm1(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.add.Tensor, ctx.node, 1))


@register(aten.log2.default, aten.log10.default)
def log_base(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    base = 2.0 if ctx.node.target is aten.log2.default else 10.0
    return (ctx(aten.div.Tensor, g, ctx(aten.mul.Tensor, ctx.node.args[0], math.log(base))),)


@register(aten.exp2.default)
def exp2(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.mul.Tensor, ctx.node, math.log(2.0)))


@register(aten.sinh.default)
def sinh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.cosh.default, ctx.node.args[0]))


@register(aten.cosh.default)
def cosh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.sinh.default, ctx.node.args[0]))


@register(aten.tan.default)
def tan(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:  # 1 + tan^2
    return _times(ctx, g, ctx(aten.add.Tensor, ctx(aten.mul.Tensor, ctx.node, ctx.node), 1))


def _inverse_sqrt(ctx, x, one_minus: bool, shift: float = 0.0):
    """1 / sqrt(1 - x^2) (one_minus), else 1 / sqrt(x^2 + shift)."""
    sq = ctx(aten.mul.Tensor, x, x)
    return ctx(aten.rsqrt.default, ctx(aten.rsub.Scalar, sq, 1) if one_minus else ctx(aten.add.Tensor, sq, shift))


@register(aten.asin.default)
def asin(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, _inverse_sqrt(ctx, ctx.node.args[0], True))


@register(aten.acos.default)
def acos(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.neg.default, ctx(aten.mul.Tensor, g, _inverse_sqrt(ctx, ctx.node.args[0], True))),)


@register(aten.asinh.default)
def asinh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, _inverse_sqrt(ctx, ctx.node.args[0], False, 1.0))


@register(aten.acosh.default)
def acosh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, _inverse_sqrt(ctx, ctx.node.args[0], False, -1.0))


@register(aten.atan.default)
def atan(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (ctx(aten.div.Tensor, g, ctx(aten.add.Tensor, ctx(aten.mul.Tensor, x, x), 1)),)


@register(aten.atanh.default)
def atanh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x = ctx.node.args[0]
    return (ctx(aten.div.Tensor, g, ctx(aten.rsub.Scalar, ctx(aten.mul.Tensor, x, x), 1)),)


@register(aten.atan2.default)
def atan2(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args
    r2 = ctx(aten.add.Tensor, ctx(aten.mul.Tensor, a, a), ctx(aten.mul.Tensor, b, b))
    shared = ctx(aten.div.Tensor, g, r2)
    ga = ctx.sum_to(ctx(aten.mul.Tensor, shared, b), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(ctx(aten.neg.default, ctx(aten.mul.Tensor, shared, a)), _shape(b)) if ctx.needs(b) else None
    return ga, gb


@register(aten.erfc.default)
def erfc(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (ctx(aten.neg.default, erf(ctx, g)[0]),)


@register(aten.erfinv.default)
def erfinv(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:  # sqrt(pi)/2 * exp(erfinv(x)^2)
    d = ctx(aten.mul.Tensor, ctx(aten.exp.default, ctx(aten.mul.Tensor, ctx.node, ctx.node)), math.sqrt(math.pi) / 2)
    return _times(ctx, g, d)


@register(aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default, aten.round.decimals,
          aten.trunc.default)
def piecewise_constant(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Piecewise-constant functions: a zero derivative almost everywhere, as autograd defines it."""
    return (None,)


@register(aten.fmod.Scalar, aten.remainder.Scalar)
def modulo_scalar(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return (g, None)


@register(aten.fmod.Tensor, aten.remainder.Tensor)
def modulo(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """a - q * b with q = trunc(a / b) (fmod) or floor(a / b) (remainder), q piecewise constant."""
    a, b = ctx.node.args
    gb = None
    if ctx.needs(b):
        rounding = "trunc" if ctx.node.target is aten.fmod.Tensor else "floor"
        q = ctx(aten.div.Tensor_mode, a, b, rounding_mode=rounding)
        gb = ctx.sum_to(ctx(aten.neg.default, ctx(aten.mul.Tensor, g, q)), _shape(b))
    return _reduce(ctx, g, a), gb


@register(aten.elu.default)
def elu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """elu, selu and celu: reads the input (the output would do, but not for alpha < 0)."""
    x, alpha, scale, input_scale = ctx.args
    return (ctx(aten.elu_backward.default, g, alpha, scale, input_scale, False, x),)


@register(aten.clamp.Tensor)
def clamp_tensor(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """As autograd: x's gradient where lo <= x <= hi; lo's where x < lo < hi; hi's where x > hi or hi < lo (the
    output is hi everywhere then)."""
    x, lo, hi = ctx.args
    gx = glo = ghi = None
    if ctx.needs(x):
        keep = _within(ctx, x, lo, hi, aten.ge.Tensor, aten.le.Tensor)
        gx = ctx.sum_to(g if keep is None else _masked(ctx, g, keep), _shape(x))
    if ctx.needs(lo):
        below = ctx(aten.lt.Tensor, x, lo)
        if hi is not None:
            below = ctx(aten.logical_and.default, below, ctx(aten.lt.Tensor, lo, hi))
        glo = ctx.sum_to(_masked(ctx, g, below), _shape(lo))
    if ctx.needs(hi):
        above = ctx(aten.gt.Tensor, x, hi)
        if lo is not None:
            above = ctx(aten.logical_or.default, above, ctx(aten.lt.Tensor, hi, lo))
        ghi = ctx.sum_to(_masked(ctx, g, above), _shape(hi))
    return gx, glo, ghi


@register(aten.div.Tensor_mode)
def div_mode(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """Rounded division (floor, trunc) is piecewise constant; rounding_mode=None is true division."""
    if ctx.kwarg("rounding_mode") is not None:
        return None, None
    return div(ctx, g)


@register(aten.fmax.default, aten.fmin.default)
def fmax_fmin(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """As autograd: the whole gradient to the operand picked (a on ties), the NaN-ignoring way."""
    a, b = ctx.node.args
    compare = aten.ge.Tensor if ctx.node.target is aten.fmax.default else aten.le.Tensor
    pick_a = ctx(aten.logical_or.default, ctx(compare, a, b), ctx(aten.isnan.default, b))
    ga = ctx.sum_to(_masked(ctx, g, pick_a), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, pick_a)), _shape(b)) if ctx.needs(b) else None
    return ga, gb


@register(aten.i0.default)
def i0(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.special_i1.default, ctx.node.args[0]))


@register(aten.special_i0e.default)
def i0e(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """i0e(x) = exp(-|x|) i0(x): its derivative is i1e(x) - sign(x) i0e(x)."""
    x = ctx.node.args[0]
    return _times(ctx, g, ctx(aten.sub.Tensor, ctx(aten.special_i1e.default, x),
                              ctx(aten.mul.Tensor, ctx(aten.sign.default, x), ctx.node)))


def _bessel_i1_derivative(ctx, x, i0_like, i1_like):
    """i0_like(x) - i1_like(x) / x, and 1/2 at x = 0 (the limit; the quotient would be NaN there), as autograd's
    i1_backward and i1e_backward."""
    eps = torch.finfo(x.meta.dtype).eps
    not_tiny = ctx(aten.gt.Scalar, ctx(aten.abs.default, x), eps)
    safe = ctx(aten.where.ScalarOther, not_tiny, x, eps)
    derivative = ctx(aten.sub.Tensor, i0_like(safe), ctx(aten.div.Tensor, i1_like(safe), safe))
    return ctx(aten.where.ScalarOther, not_tiny, derivative, 0.5)


@register(aten.special_i1.default)
def i1(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, _bessel_i1_derivative(ctx, ctx.node.args[0], lambda t: ctx(aten.i0.default, t),
                                                lambda t: ctx(aten.special_i1.default, t)))


@register(aten.special_i1e.default)
def i1e(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """i1e(x) = exp(-|x|) i1(x): i0e(x) - i1e(x) (sign(x) + 1/x)."""
    x = ctx.node.args[0]
    without_sign = _bessel_i1_derivative(ctx, x, lambda t: ctx(aten.special_i0e.default, t),
                                         lambda t: ctx(aten.special_i1e.default, t))
    return _times(ctx, g, ctx(aten.sub.Tensor, without_sign, ctx(aten.mul.Tensor, ctx(aten.sign.default, x),
                                                                 ctx.node)))


@register(aten.special_ndtri.default)
def ndtri(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The inverse of the normal CDF: sqrt(2 pi) exp(ndtri(p)^2 / 2)."""
    half_square = ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, ctx.node, ctx.node), 0.5)
    return _times(ctx, g, ctx(aten.mul.Tensor, ctx(aten.exp.default, half_square), math.sqrt(2 * math.pi)))


@register(aten.frexp.Tensor)
def frexp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """x = mantissa 2^exponent with the exponent piecewise constant: the mantissa's cotangent over 2^exponent."""
    if g[0] is None:
        return (None,)
    exponent = ctx(aten._to_copy.default, ctx.graph.getitem(ctx.node, 1), dtype=g[0].meta.dtype)
    return (ctx(aten.div.Tensor, g[0], ctx(aten.exp2.default, exponent)),)


@register(aten.copy.default)
def copy_(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """self is overwritten by src (broadcast to self's shape, cast to its dtype)."""
    _x, src = ctx.node.args[:2]
    if ctx.needs(src) and g.meta.dtype != src.meta.dtype:
        g = ctx(aten._to_copy.default, g, dtype=src.meta.dtype)
    return None, _reduce(ctx, g, src)


@register(aten.copysign.Tensor)
def copysign(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """|a| with b's sign: a's derivative is sign(a) * sign(out) (0 at a = 0, as autograd); b's is 0."""
    a = ctx.node.args[0]
    d = ctx(aten.mul.Tensor, ctx(aten.sign.default, a), ctx(aten.sign.default, ctx.node))
    return _reduce(ctx, ctx(aten.mul.Tensor, g, d), a), None


@register(aten.ldexp.Tensor)
def ldexp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """x * 2^e."""
    x, e = ctx.node.args
    gx = ge = None
    if ctx.needs(x):
        gx = ctx.sum_to(ctx(aten.mul.Tensor, g, ctx(aten.exp2.default, e)), _shape(x))
    if ctx.needs(e):
        ge = ctx.sum_to(ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, g, ctx.node), math.log(2.0)), _shape(e))
    return gx, ge


@register(aten.masked_scatter.default)
def masked_scatter(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, mask, src = ctx.node.args
    gx = ctx.sum_to(_masked(ctx, g, ctx(aten.logical_not.default, mask)), _shape(x)) if ctx.needs(x) else None
    gsrc = ctx(aten.masked_scatter_backward.default, g, mask, list(_shape(src))) if ctx.needs(src) else None
    return gx, None, gsrc


@register(aten.lgamma.default)
def lgamma(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.digamma.default, ctx.node.args[0]))


@register(aten.digamma.default)
def digamma(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    return _times(ctx, g, ctx(aten.polygamma.default, 1, ctx.node.args[0]))


@register(aten.polygamma.default)
def polygamma(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    n, x = ctx.node.args
    return None, ctx(aten.mul.Tensor, g, ctx(aten.polygamma.default, n + 1, x))


@register(aten.special_erfcx.default)
def erfcx(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # erfcx(x) = exp(x^2) erfc(x): its derivative is 2 x erfcx(x) - 2 / sqrt(pi)
    d = ctx(aten.sub.Tensor, ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, ctx.node.args[0], ctx.node), 2.0),
            2 / math.sqrt(math.pi))
    return _times(ctx, g, d)


@register(aten.special_log_ndtr.default)
def log_ndtr(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # the normal density over its CDF: exp(-x^2/2 - log_ndtr(x)) / sqrt(2 pi)
    x = ctx.node.args[0]
    exponent = ctx(aten.neg.default, ctx(aten.add.Tensor, ctx.node, ctx(aten.mul.Tensor, ctx(aten.mul.Tensor, x, x),
                                                                         0.5)))
    return _times(ctx, g, ctx(aten.mul.Tensor, ctx(aten.exp.default, exponent), 1 / math.sqrt(2 * math.pi)))


@register(aten.hypot.default)
def hypot(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """sqrt(a^2 + b^2): ga = g a / out, gb = g b / out (as autograd, infinite where both are 0)."""
    a, b = ctx.node.args
    shared = ctx(aten.div.Tensor, g, ctx.node)
    ga = ctx.sum_to(ctx(aten.mul.Tensor, shared, a), _shape(a)) if ctx.needs(a) else None
    gb = ctx.sum_to(ctx(aten.mul.Tensor, shared, b), _shape(b)) if ctx.needs(b) else None
    return ga, gb


@register(aten.angle.default)
def angle(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The angle of a real number is 0 or pi: piecewise constant."""
    x = ctx.node.args[0]
    if x.meta.dtype.is_complex:
        raise MissingVJPError(f"angle of a complex tensor (node %{ctx.node.name}) has no VJP rule, only real ones "
                              "have; freeze the parameters before it or register a rule")
    return (ctx.zeros_like(x),)
