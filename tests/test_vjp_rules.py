"""Every VJP rule against torch.autograd, in fp32, to a relative error of at most TOL = 1e-4.

Each case builds a tiny module whose forward calls the op under test; its trainable tensors are parameters (x0,
x1, ...) so that every differentiable input of the op gets a gradient. The loss is `sum_k (out_k * w_k).sum()`
with fixed random weights w_k, so the cotangent the rule receives is not trivial. The gradients of the engine
(capture -> differentiate -> generated code: the pipeline of `Trainer.gradients`, without also building the
training-step program that `pe.compile` builds, which would double the run time) are compared, parameter by
parameter, with torch.autograd on a copy of the module:

    rel_err = max|g - g_ref| / max(max|g_ref|, TINY) <= TOL

Ops that torch.export's core-ATen decompositions never leave in a captured graph (t, transpose, reshape, split,
unbind, stack, ...) still have rules, for graphs built by other front ends; they are checked on a hand-built
IR graph that calls the op directly (`direct` cases). Compiled cases assert that the op really is in the captured
graph, so a case never silently stops covering its rule. `test_every_rule_has_a_case` makes a new rule come with a
case here.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401  (registers transformers' grouped matmul op)

import pockengine as pe
from pockengine.autodiff import VJP, VJP_BY_NAME, ChannelSlice, differentiate, rule_for
from pockengine.backend import CompiledProgram
from pockengine.capture import capture
from pockengine.ir.graph import BATCH, CONST, PARAM, Graph, Node, TensorMeta, eliminate_dead_code
from pockengine.kernels import LINEAR_CROSS_ENTROPY
from pockengine.kernels.ctc import CTC_LOSS

aten = torch.ops.aten
GROUPED_MM = torch.ops.transformers.grouped_mm_fallback.default
TOL = 1e-4  # relative error, fp32
TINY = 1e-12


# ------------------------------------------------------------------------------------------------ the harness
def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return ((g - ref).abs().max() / ref.abs().max().clamp_min(TINY)).item()


def weighted_sum(out: Any, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The loss of every case: each output times its fixed random weights, summed."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = (outs[0] * weights[0]).sum()
    for o, w in zip(outs[1:], weights[1:]):
        loss = loss + (o * w).sum()
    return loss


def random_weights(out: Any) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(torch.randn(o.shape, generator=gen) for o in outs)


def _run(graph: Graph, loss: Node, wrt: dict[str, Node], values: dict[Node, Any],
         extra: dict[str, Node] | None = None, slices: dict[str, tuple[int, tuple[int, ...]]] | None = None
         ) -> dict[str, torch.Tensor]:
    """Differentiate `graph` and run it: {name: gradient} for `wrt`, plus the `extra` forward values.

    `slices` {name: (dim, channels)} asks for only those channels of a parameter's gradient (partial training).
    """
    channel_slices = {}
    for name, (dim, channels) in (slices or {}).items():
        index = graph.input(f"{name}.channels", CONST, TensorMeta((len(channels),), torch.int64))
        values[index] = torch.tensor(channels)
        channel_slices[wrt[name]] = ChannelSlice(dim, channels, index)
    grads = differentiate(graph, loss, list(wrt.values()), channel_slices)
    graph.outputs = {"loss": loss, **(extra or {})}
    graph.outputs.update({f"grad:{name}": g for name, node in wrt.items() if (g := grads[node]) is not None})
    eliminate_dead_code(graph)
    inputs = graph.inputs()
    program = CompiledProgram(graph, inputs, check_finite=None)
    with torch.no_grad():
        out = dict(zip(program.output_names, program(*[values[n] for n in inputs])))
    result = {k: v for k, v in out.items() if k in (extra or {})}
    for name, node in wrt.items():
        sl = channel_slices.get(node)
        result[name] = out.get(f"grad:{name}", torch.zeros(sl.shape(node.meta.shape) if sl else node.meta.shape))
    return result


def engine_gradients(model: nn.Module, inputs: tuple, weights: tuple,
                     slices: dict | None = None) -> tuple[dict[str, torch.Tensor], set]:
    """Gradients of weighted_sum(model(*inputs), weights) for every parameter, and the ops of the graph."""
    cap = capture(model, weighted_sum, (inputs, weights))
    ops = {n.target for n in cap.graph.nodes}
    values: dict[Node, Any] = {node: model.get_parameter(name) for name, node in cap.params.items()}
    values.update({node: model.get_buffer(name) for name, node in cap.buffers.items()})
    values.update(getattr(cap.graph, "constants", None) or getattr(cap, "constants", {}))  # lifted constants
    values.update(zip(cap.batch, [*inputs, *weights]))
    return _run(cap.graph, cap.loss, cap.params, values, slices=slices), ops


def autograd_gradients(model: nn.Module, inputs: tuple, weights: tuple) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    loss = weighted_sum(model(*inputs), weights)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


# ------------------------------------------------------------------------------------------------ the cases
EXPERT_OFFSETS = torch.tensor([2, 2, 5, 5], dtype=torch.int32)  # cumulative rows per expert of a grouped matmul
Spec = tuple | Callable[[], torch.Tensor]


def _make(spec: Spec) -> torch.Tensor:
    return torch.randn(spec) if isinstance(spec, tuple) else spec()


def pos(*shape: int) -> Callable[[], torch.Tensor]:
    """Positive values away from 0 (log, sqrt, division, fractional powers)."""
    return lambda: torch.rand(shape) + 0.5


def ties(*shape: int) -> Callable[[], torch.Tensor]:
    """Small integers: many exact ties (max/min/amax, clamp at its bounds)."""
    return lambda: torch.randint(-2, 3, shape).float()


def wide(*shape: int, scale: float = 4.0) -> Callable[[], torch.Tensor]:
    """Values spread wide enough to reach every piece of a piecewise activation."""
    return lambda: torch.randn(shape) * scale


def ints(high: int, *shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, high, shape)


def mask(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.rand(shape) > 0.5


class OpModule(nn.Module):
    """forward(*inputs) = fn(x0, x1, ..., *inputs), or sub(x0, ..., *inputs); x0, x1, ... are parameters."""

    def __init__(self, params: list[torch.Tensor], fn: Callable | None = None, sub: nn.Module | None = None):
        super().__init__()
        self.n = len(params)
        for i, p in enumerate(params):
            self.register_parameter(f"x{i}", nn.Parameter(p))
        self.fn = fn
        self.sub = sub

    def forward(self, *inputs: torch.Tensor) -> Any:
        xs = [getattr(self, f"x{i}") for i in range(self.n)]
        return (self.fn or self.sub)(*xs, *inputs)


@dataclass
class Case:
    op: Any
    id: str
    params: tuple = ()  # specs of the trainable tensors
    inputs: tuple = ()  # specs of the batch inputs (indices, masks, frozen tensors)
    fn: Callable | None = None  # compiled case: forward is fn(*params, *inputs)
    sub: Callable[[], nn.Module] | None = None  # compiled case: forward is sub()(*params, *inputs)
    mode: str = "train"
    args: tuple | None = None  # direct case: op(*args), with P(i) / I(i) standing for params / inputs
    kwargs: dict = field(default_factory=dict)
    use: tuple | None = None  # direct case: which outputs of a multi-output op feed the loss (default: all)

    @property
    def direct(self) -> bool:
        return self.args is not None

    def __str__(self) -> str:
        return f"{str(self.op).removeprefix('aten.')}-{self.id}"


class P(int):
    """Placeholder for trainable tensor i in the args of a direct case."""


class In(int):
    """Placeholder for batch input i in the args of a direct case."""


def fn(op, id, fn, *params, inputs=(), mode="train"):
    return Case(op, id, params, inputs, fn=fn, mode=mode)


def mod(op, id, sub, *params, inputs=(), mode="train"):
    return Case(op, id, params, inputs, sub=sub, mode=mode)


def direct(op, id, args, *params, inputs=(), use=None, **kwargs):
    return Case(op, id, params, inputs, args=args, kwargs=kwargs, use=use)


def _bn(cls, c, affine=True, random_stats=True):
    def build():
        bn = cls(c, affine=affine)
        if affine:
            nn.init.normal_(bn.weight, 1.0, 0.5)
            nn.init.normal_(bn.bias, 0.0, 0.5)
        if random_stats:  # eval mode must use these, not batch statistics
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        return bn
    return build


def _affine(m: nn.Module) -> nn.Module:
    """Non-trivial affine parameters for a norm layer (the defaults 1 and 0 would hide mix-ups)."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.5, 1.0)
    return m


UPSAMPLE = [  # (op, align_corners if it takes it, scale factors, input shape)
    ("upsample_nearest1d", (), [2.0], (1, 2, 3)),
    ("upsample_nearest2d", (), [1.5, 2.0], (1, 2, 3, 3)),
    ("upsample_nearest3d", (), [2.0, 1.0, 1.5], (1, 1, 2, 3, 2)),
    ("_upsample_nearest_exact1d", (), [1.7], (1, 2, 3)),
    ("_upsample_nearest_exact2d", (), [1.5, 2.0], (1, 2, 3, 3)),
    ("_upsample_nearest_exact3d", (), [2.0, 1.0, 1.5], (1, 1, 2, 3, 2)),
    ("upsample_linear1d", (False,), [2.5], (1, 2, 3)),
    ("upsample_bilinear2d", (True,), [1.5, 2.0], (1, 2, 3, 3)),
    ("upsample_bicubic2d", (False,), [2.0, 1.5], (1, 2, 3, 3)),
    ("upsample_trilinear3d", (False,), [2.0, 1.0, 1.5], (1, 1, 2, 3, 2)),
]
UPSAMPLE_TO_SIZE = [(name, extra, [int(s * f) + 1 for s, f in zip(shape[2:], scales)], shape)
                    for name, extra, scales, shape in UPSAMPLE]

CASES = [
    # ---------------------------------------------------------------- arithmetic, with broadcasting
    fn(aten.add.Tensor, "same-shape", torch.add, (3, 4), (3, 4)),
    fn(aten.add.Tensor, "broadcast", torch.add, (2, 3, 4), (3, 1)),
    fn(aten.add.Tensor, "broadcast-lhs", torch.add, (4,), (2, 3, 4)),
    fn(aten.add.Tensor, "0d", torch.add, (3, 4), ()),
    fn(aten.add.Tensor, "alpha", lambda a, b: torch.add(a, b, alpha=2.5), (3, 4), (2, 1, 4)),
    fn(aten.add.Tensor, "self", lambda a: a + a, (3, 4)),
    fn(aten.add.Tensor, "python-scalar", lambda a: a + 2, (3, 4)),
    fn(aten.add.Tensor, "frozen-operand", torch.add, (3, 4), inputs=((4,),)),
    fn(aten.sub.Tensor, "broadcast", torch.sub, (2, 3, 4), (1, 4)),
    fn(aten.sub.Tensor, "alpha", lambda a, b: torch.sub(a, b, alpha=0.5), (3, 1), (3, 4)),
    fn(aten.add.Scalar, "alpha", lambda a: aten.add.Scalar(a, 2.0, 3), (3, 4)),
    fn(aten.sub.Scalar, "plain", lambda a: aten.sub.Scalar(a, 2.0), (3, 4)),
    fn(aten.clone.default, "plain", lambda a: a.clone() * a, (3, 4)),
    fn(aten.alias.default, "plain", aten.alias.default, (3, 4)),
    direct(aten.contiguous.default, "plain", (P(0),), (3, 4)),
    direct(aten.as_strided.default, "restride-pooled", (P(0), [2, 3, 1, 1], [3, 1, 3, 3]), (2, 3, 1, 1)),
    # Longformer's overlapping chunks, [B, 2n-1, 2w, H] windows with stride w*H over the B*n*2w*H elements of
    # [B, n, 2w, H] (rows read twice), read from a flat value (capture/strided_windows.py)
    direct(aten.as_strided.default, "overlapping-windows", (P(0), [2, 3, 4, 3], [24, 6, 3, 1]), (48,)),
    direct(aten.as_strided.default, "every-other-element", (P(0), [2, 3], [6, 2], 1), (12,)),
    fn(aten.mul.Tensor, "broadcast", torch.mul, (2, 3, 4), (3, 1)),
    fn(aten.mul.Tensor, "0d", torch.mul, (), (3, 4)),
    fn(aten.mul.Tensor, "square", lambda a: a * a, (3, 4)),
    fn(aten.mul.Tensor, "python-scalar", lambda a: a * 2.5, (3, 4)),
    fn(aten.mul.Scalar, "plain", lambda a: aten.mul.Scalar(a, 2.5), (3, 4)),
    fn(aten.div.Tensor, "broadcast", torch.div, (2, 3, 4), pos(4)),
    fn(aten.div.Tensor, "broadcast-both", torch.div, (3, 1), pos(2, 1, 4)),
    fn(aten.div.Tensor, "python-scalar", lambda a: a / 3.0, (3, 4)),
    fn(aten.div.Scalar, "plain", lambda a: aten.div.Scalar(a, 4.0), (3, 4)),
    fn(aten.neg.default, "plain", torch.neg, (3, 4)),
    fn(aten.pow.Tensor_Scalar, "cube", lambda a: a ** 3, (3, 4)),
    fn(aten.pow.Tensor_Scalar, "square", lambda a: a ** 2, (3, 4)),
    fn(aten.pow.Tensor_Scalar, "sqrt", lambda a: a ** 0.5, pos(3, 4)),
    fn(aten.pow.Tensor_Scalar, "negative", lambda a: a ** -1.5, pos(3, 4)),
    fn(aten.pow.Tensor_Scalar, "one", lambda a: aten.pow.Tensor_Scalar(a, 1), (3, 4)),
    fn(aten.pow.Tensor_Scalar, "zero", lambda a: aten.pow.Tensor_Scalar(a, 0) * a, (3, 4)),
    fn(aten.pow.Tensor_Tensor, "broadcast", torch.pow, pos(3, 4), (4,)),
    fn(aten.pow.Tensor_Tensor, "0d-exponent", torch.pow, pos(3, 4), ()),
    # ---------------------------------------------------------------- unary math and activations
    fn(aten.sqrt.default, "plain", torch.sqrt, pos(3, 4)),
    fn(aten.rsqrt.default, "plain", torch.rsqrt, pos(3, 4)),
    fn(aten.reciprocal.default, "plain", torch.reciprocal, pos(3, 4)),
    fn(aten.exp.default, "plain", torch.exp, (3, 4)),
    fn(aten.log.default, "plain", torch.log, pos(3, 4)),
    fn(aten.sin.default, "plain", torch.sin, (3, 4)),
    fn(aten.cos.default, "plain", torch.cos, (3, 4)),
    fn(aten.abs.default, "plain", torch.abs, (3, 4)),
    fn(aten.erf.default, "plain", torch.erf, (3, 4)),
    fn(aten.tanh.default, "plain", torch.tanh, (3, 4)),
    fn(aten.sigmoid.default, "plain", torch.sigmoid, (3, 4)),
    fn(aten.relu.default, "plain", torch.relu, (3, 4)),
    fn(aten.gelu.default, "erf", F.gelu, (3, 4)),
    fn(aten.gelu.default, "tanh", lambda a: F.gelu(a, approximate="tanh"), (3, 4)),
    fn(aten.silu.default, "plain", F.silu, wide(3, 4)),
    fn(aten.hardtanh.default, "bounds", lambda a: F.hardtanh(a, -0.5, 0.5), (3, 4)),
    fn(aten.hardtanh.default, "relu6", F.relu6, wide(3, 4)),
    fn(aten.hardswish.default, "plain", F.hardswish, wide(3, 4)),
    fn(aten.hardsigmoid.default, "plain", F.hardsigmoid, wide(3, 4)),
    fn(aten.leaky_relu.default, "slope", lambda a: F.leaky_relu(a, 0.2), (3, 4)),
    fn(aten.leaky_relu.default, "default-slope", F.leaky_relu, (3, 4)),
    # the mean slope; train mode's drawn slopes: test_rrelu_gradient_is_the_drawn_slope
    fn(aten.rrelu_with_noise_functional.default, "eval", lambda a: F.rrelu(a, training=False), wide(3, 4)),
    # a draw: autograd gives mean and std zero gradients (the values differ, the gradients do not)
    fn(aten.normal.Tensor_Tensor, "tensors", torch.normal, (3, 4), pos(3, 4)),
    fn(aten.normal.Tensor_float, "tensor-mean", lambda m: torch.normal(m, 2.0), (3, 4)),
    fn(aten.normal.float_Tensor, "tensor-std", lambda s: torch.normal(0.5, s), pos(3, 4)),
    fn(aten.dist.default, "p2-broadcast", lambda a, b: torch.dist(a, b), (3, 4), (4,)),
    fn(aten.dist.default, "p1", lambda a, b: torch.dist(a, b, p=1), (3, 4), (3, 4)),
    fn(aten.dist.default, "inf", lambda a, b: torch.dist(a, b, p=float("inf")), (3, 4), (3, 4)),
    fn(aten.logcumsumexp.default, "dim1", lambda a: torch.logcumsumexp(a, 1), (3, 5)),
    fn(aten.logcumsumexp.default, "large-values", lambda a: torch.logcumsumexp(a * 100, 0), (6, 2)),
    fn(aten.special_i0e.default, "both-signs", torch.special.i0e, wide(3, 4)),
    fn(aten.frexp.Tensor, "mantissa", lambda a: torch.frexp(a * 10).mantissa, (3, 4)),
    fn(aten._pdist_forward.default, "p2", lambda a: torch.pdist(a), (5, 3)),
    fn(aten._pdist_forward.default, "p1", lambda a: torch.pdist(a, p=1), (4, 3)),
    fn(aten.unbind_copy.int, "dim1", lambda a: torch.unbind_copy(a, 1)[0] * torch.unbind_copy(a, 1)[2], (3, 4)),
    fn(aten.fractional_max_pool2d.default, "2x2", lambda a, samples: torch.nn.functional.fractional_max_pool2d(
        a, 2, output_size=3, _random_samples=samples), (2, 3, 7, 7), inputs=(lambda: torch.rand(2, 3, 2),)),
    fn(aten._upsample_bilinear2d_aa.default, "antialias-down", lambda a: torch.nn.functional.interpolate(
        a, size=(3, 4), mode="bilinear", antialias=True), (2, 3, 7, 9)),
    fn(aten._upsample_bicubic2d_aa.default, "antialias-down", lambda a: torch.nn.functional.interpolate(
        a, scale_factor=0.5, mode="bicubic", antialias=True), (1, 2, 8, 8)),
    direct(aten._upsample_bilinear2d_aa.vec, "scale-factors", (P(0), None, False, [0.5, 0.75]), (2, 3, 8, 8)),
    direct(aten._upsample_bicubic2d_aa.vec, "output-size", (P(0), [3, 5], True, None), (1, 2, 7, 9)),
    fn(aten.put.default, "overwrite", lambda a, b: a.put(torch.tensor([0, 5, 7]), b), (3, 4), (3,)),
    fn(aten.put.default, "accumulate-repeats", lambda a, b: a.put(torch.tensor([[1, 1], [4, 0]]), b, accumulate=True),
       (3, 4), (2, 2)),
    mod(aten._trilinear.default, "bilinear-layer", lambda: nn.Bilinear(3, 4, 5), (6, 3), inputs=((6, 4),)),
    fn(aten._trilinear.default, "bilinear-all-operands", lambda x, y, w: torch.nn.functional.bilinear(x, y, w),
       (2, 7, 3), (2, 7, 4), (5, 3, 4)),
    fn(aten._conj.default, "hfft", lambda a: torch.fft.hfft(a, n=6), (3, 4)),
    direct(aten.conj_physical.default, "real", (P(0),), (3, 4)),
    fn(aten.index_reduce.default, "prod-with-zeros", lambda a, b: a.index_reduce(
        0, torch.tensor([0, 2, 0]), b * (b > -0.5), "prod"), (3, 4), (3, 4)),
    fn(aten.index_reduce.default, "mean-exclude-self", lambda a, b: a.index_reduce(
        1, torch.tensor([1, 1]), b, "mean", include_self=False), (3, 4), (3, 2)),
    fn(aten.index_reduce.default, "amax-ties", lambda a, b: a.index_reduce(
        0, torch.tensor([0, 1, 0]), b, "amax"), ties(3, 4), ties(3, 4)),
    fn(aten.index_reduce.default, "amin", lambda a, b: a.index_reduce(0, torch.tensor([2, 2]), b, "amin"),
       (3, 4), (2, 4)),
    fn(aten.segment_reduce.default, "sum-lengths", lambda a: torch.segment_reduce(
        a, "sum", lengths=torch.tensor([2, 0, 3])), (5, 3)),
    fn(aten.segment_reduce.default, "max-offsets-axis1", lambda a: torch.segment_reduce(
        a, "max", offsets=torch.tensor([[0, 1, 4], [0, 3, 4]]), axis=1, initial=-10.0), (2, 4)),
    fn(aten.segment_reduce.default, "mean", lambda a: torch.segment_reduce(
        a, "mean", lengths=torch.tensor([1, 3])), (4,)),
    fn(aten.special_i1.default, "at-zero", torch.special.i1, ties(4, 5)),  # small integers: zeros among them
    fn(aten.special_i1e.default, "at-zero", torch.special.i1e, ties(4, 5)),
    fn(aten.special_ndtri.default, "probabilities", lambda a: torch.special.ndtri(torch.sigmoid(a)), (3, 4)),
    # ---------------------------------------------------------------- selection, casts
    fn(aten.where.self, "broadcast", lambda a, b, c: torch.where(c, a, b), (3, 4), (4,), inputs=(mask(3, 1),)),
    fn(aten.where.self, "scalar-other", lambda a, c: torch.where(c, a, 0.0), (3, 4), inputs=(mask(3, 4),)),
    direct(aten.masked_fill.Scalar, "broadcast-mask", (P(0), In(0), 2.0), (3, 4), inputs=(mask(4),)),
    fn(aten.clamp.default, "both", lambda a: a.clamp(-0.5, 0.5), (3, 4)),
    fn(aten.clamp.default, "min", lambda a: a.clamp(min=0.1), (3, 4)),
    fn(aten.clamp.default, "max", lambda a: a.clamp(max=0.1), (3, 4)),
    fn(aten.clamp.default, "at-bounds", lambda a: a.clamp(-1.0, 1.0), ties(4, 5)),
    fn(aten.maximum.default, "broadcast", torch.maximum, (3, 4), (4,)),
    fn(aten.maximum.default, "ties", torch.maximum, ties(4, 5), ties(4, 5)),
    fn(aten.minimum.default, "broadcast", torch.minimum, (2, 1, 4), (3, 4)),
    fn(aten.minimum.default, "ties", torch.minimum, ties(4, 5), ties(5,)),
    # The cotangent of a bfloat16 value is rounded to bfloat16, as autograd's engine does, though mul computes it
    # in float32 (the bfloat16 operand is promoted).
    fn(aten._to_copy.default, "bfloat16-operand", lambda a, b: a.bfloat16() * b, (3, 4), (3, 4)),
    fn(aten._to_copy.default, "float64-roundtrip", lambda a, b: (a.double() * b.double()).float(), (3, 4), (3, 4)),
    # ---------------------------------------------------------------- matrix products, convolution
    # ---------------------------------------------------------------- Fourier transforms, complex views (FNet)
    fn(aten._fft_c2c.default, "fftn-real-part", lambda a: torch.fft.fftn(a, dim=(1, 2)).real, (2, 3, 4)),
    fn(aten._fft_c2c.default, "ifft-ortho", lambda a: torch.view_as_real(torch.fft.ifft(a.to(torch.complex64),
                                                                                        norm="ortho")), (3, 5)),
    fn(aten._fft_r2c.default, "full", lambda a: torch.view_as_real(torch.fft.fft(a, dim=0, norm="ortho")), (4, 3)),
    fn(aten._fft_r2c.default, "onesided", lambda a: torch.view_as_real(torch.fft.rfftn(a, dim=(0, 1))), (4, 5, 2)),
    fn(aten._fft_c2r.default, "irfft-even", lambda a: torch.fft.irfft(torch.fft.rfft(a, dim=1), n=6, dim=1), (3, 6)),
    fn(aten._fft_c2r.default, "irfftn-odd", lambda a: torch.fft.irfftn(torch.fft.rfftn(a), s=(4, 5)), (4, 5)),
    fn(aten.view_as_real.default, "imaginary-part", lambda a: torch.fft.fft(a, dim=0).imag * a, (4, 3)),
    # ---------------------------------------------------------------- linear algebra (on well-conditioned matrices)
    fn(aten._linalg_eigh.default, "values-and-vectors", lambda a: torch.linalg.eigh(a + a.mT), (2, 4, 4)),
    fn(aten._linalg_eigh.default, "values", lambda a: torch.linalg.eigvalsh(a + a.mT, UPLO="U"), (4, 4)),
    fn(aten._linalg_slogdet.default, "logabsdet", lambda a: torch.linalg.slogdet(a + 4 * torch.eye(3))[1], (2, 3, 3)),
    fn(aten.cholesky.default, "upper", lambda a: torch.cholesky(a @ a.mT + torch.eye(4), upper=True), (4, 4)),
    fn(aten.linalg_cholesky_ex.default, "lower", lambda a: torch.linalg.cholesky(a @ a.mT + torch.eye(3)), (2, 3, 3)),
    fn(aten._linalg_svd.default, "tall-all-factors", lambda a: torch.linalg.svd(a, full_matrices=False), (5, 3)),
    fn(aten._linalg_svd.default, "wide-full-matrices",  # the rows of V^T past min(m, n) are arbitrary
       lambda a: (lambda u, s, vh: (u, s, vh[..., :2, :]))(*torch.linalg.svd(a)), (2, 2, 4)),
    fn(aten._linalg_svd.default, "values", lambda a: torch.linalg.svdvals(a), (4, 4)),
    fn(aten.linalg_qr.default, "tall-reduced", lambda a: torch.linalg.qr(a), (2, 5, 3)),
    fn(aten.linalg_qr.default, "wide", lambda a: torch.linalg.qr(a), (3, 5)),
    fn(aten.linalg_qr.default, "square-complete-r", lambda a: torch.linalg.qr(a, mode="complete")[1], (4, 4)),
    fn(aten.linalg_pinv.atol_rtol_tensor, "tall", lambda a: torch.linalg.pinv(a), (5, 3)),
    fn(aten.linalg_pinv.atol_rtol_tensor, "wide", lambda a: torch.linalg.pinv(a), (2, 3, 5)),
    fn(aten.linalg_inv_ex.default, "batched", lambda a: torch.linalg.inv(a + 3 * torch.eye(3)), (2, 3, 3)),
    fn(aten._linalg_solve_ex.default, "matrix-broadcast", lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3), b),
       (3, 3), (2, 3, 4)),
    fn(aten._linalg_solve_ex.default, "vector", lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3), b),
       (2, 3, 3), (2, 3)),
    fn(aten._linalg_solve_ex.default, "right-broadcast", lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3), b,
                                                                                          left=False), (3, 3), (2, 4, 3)),
    fn(aten.cholesky_solve.default, "lower", lambda a, b: torch.cholesky_solve(
        b, torch.linalg.cholesky(a @ a.mT + torch.eye(3))), (3, 3), (3, 2)),
    fn(aten.cholesky_inverse.default, "upper", lambda a: torch.cholesky_inverse(
        torch.linalg.cholesky(a @ a.mT + torch.eye(3), upper=True), upper=True), (3, 3)),
    fn(aten.linalg_lu_factor_ex.default, "square", lambda a: torch.linalg.lu_factor(a)[0], (2, 4, 4)),
    fn(aten.linalg_lu_factor_ex.default, "wide", lambda a: torch.linalg.lu_factor_ex(a)[0], (3, 5)),
    fn(aten.linalg_lu.default, "tall", lambda a: torch.linalg.lu(a)[1:], (5, 3)),
    fn(aten.lu_unpack.default, "upper-only", lambda a: torch.lu_unpack(*torch.linalg.lu_factor(a))[2], (3, 3)),
    fn(aten.linalg_lu_solve.default, "left", lambda a, b: torch.linalg.lu_solve(
        *torch.linalg.lu_factor(a + 3 * torch.eye(3)), b), (3, 3), (2, 3, 2)),
    fn(aten.linalg_lu_solve.default, "right-adjoint", lambda a, b: torch.linalg.lu_solve(
        *torch.linalg.lu_factor(a + 3 * torch.eye(3)), b, left=False, adjoint=True), (3, 3), (2, 3)),
    fn(aten._linalg_det.default, "batched", lambda a: torch.linalg.det(a + 2 * torch.eye(3)), (2, 3, 3)),
    fn(aten._linalg_det.default, "1x1", lambda a: torch.linalg.det(a), (4, 1, 1)),
    fn(aten.linalg_matrix_exp.default, "batched", lambda a: torch.linalg.matrix_exp(a), (2, 3, 3)),
    fn(aten.triangular_solve.default, "upper", lambda a, b: torch.triangular_solve(
        b, a.triu() + 3 * torch.eye(3))[0], (3, 3), (3, 2)),
    fn(aten.triangular_solve.default, "lower-transpose-unit-broadcast", lambda a, b: torch.triangular_solve(
        b, a, upper=False, transpose=True, unitriangular=True)[0], (3, 3), (2, 3, 4)),
    fn(aten.linalg_solve_triangular.default, "upper-left-broadcast", lambda a, b: torch.linalg.solve_triangular(
        a.triu() + 3 * torch.eye(3), b, upper=True), (3, 3), (2, 3, 2)),
    fn(aten.linalg_solve_triangular.default, "lower-right-unit", lambda a, b: torch.linalg.solve_triangular(
        a, b, upper=False, left=False, unitriangular=True), (3, 3), (4, 3)),
    fn(aten.view_as_complex.default, "fft-of-pairs",
       lambda a: torch.view_as_real(torch.fft.fft(torch.view_as_complex(a), norm="forward")), (3, 4, 2)),
    fn(aten.mul.Tensor, "complex-rotation", lambda a, b: torch.view_as_real(
        torch.view_as_complex(a) * torch.view_as_complex(b)), (3, 4, 2), (4, 2)),
    fn(aten.mul.Tensor, "real-by-complex", lambda a, b: torch.view_as_real(a * torch.view_as_complex(b)),
       (3, 1), (4, 2)),
    fn(aten.mm.default, "plain", torch.mm, (3, 4), (4, 5)),
    mod(aten.mm.default, "linear-3d-input", lambda: nn.Linear(4, 5, bias=False), (2, 3, 4)),
    fn(aten.bmm.default, "plain", torch.bmm, (2, 3, 4), (2, 4, 5)),
    fn(aten.bmm.default, "matmul-broadcast-batch", torch.matmul, (2, 1, 3, 4), (3, 4, 5)),
    mod(aten.addmm.default, "linear", lambda: nn.Linear(4, 5), (3, 4)),
    fn(aten.addmm.default, "beta-alpha", lambda b, x, y: torch.addmm(b, x, y, beta=0.5, alpha=2.0), (5,), (3, 4),
       (4, 5)),
    mod(aten.convolution.default, "plain", lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    mod(aten.convolution.default, "stride-padding", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7)),
    mod(aten.convolution.default, "groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5)),
    mod(aten.convolution.default, "depthwise", lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False), (2, 4, 5, 5)),
    mod(aten.convolution.default, "dilation-no-bias", lambda: nn.Conv2d(3, 2, 3, dilation=2, bias=False),
        (2, 3, 7, 7)),
    mod(aten.convolution.default, "asymmetric", lambda: nn.Conv2d(3, 2, (1, 3), stride=(2, 1), padding=(0, 2)),
        (2, 3, 5, 6)),
    mod(aten.convolution.default, "conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 8)),
    mod(aten.convolution.default, "transposed", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1,
                                                                           output_padding=1), (2, 3, 4, 4)),
    mod(aten.convolution.default, "transposed-groups", lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
        (2, 4, 3, 3)),
    fn(aten.convolution.default, "frozen-input", lambda w, x: F.conv2d(x, w), (4, 3, 3, 3), inputs=((2, 3, 5, 5),)),
    # ---------------------------------------------------------------- normalization, softmax
    fn(aten._softmax.default, "last-dim", lambda a: a.softmax(-1), (2, 3, 4)),
    fn(aten._softmax.default, "dim0", lambda a: a.softmax(0), (2, 3, 4)),
    fn(aten._softmax.default, "float64-output", lambda a: a.softmax(-1, dtype=torch.float64), (2, 3, 4)),
    fn(aten._safe_softmax.default, "masked-row",
       lambda a, m: aten._safe_softmax.default(a.masked_fill(m, -math.inf), 1), (2, 3, 4),
       inputs=(lambda: torch.arange(4) < 3,)),  # columns 0-2 masked along dim 1 entirely
    fn(aten._log_softmax.default, "last-dim", lambda a: a.log_softmax(-1), (2, 3, 4)),
    fn(aten._log_softmax.default, "dim1", lambda a: a.log_softmax(1), (2, 3, 4)),
    # the rule's two kernel pairs, one case each at every option, are in tests/test_attention.py
    fn(aten.scaled_dot_product_attention.default, "causal",
       lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (2, 2, 5, 4), (2, 2, 5, 4),
       (2, 2, 5, 4)),
    fn(aten.scaled_dot_product_attention.default, "gqa-float-mask",
       lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True), (2, 4, 5, 4),
       (2, 2, 6, 4), (2, 2, 6, 4), inputs=((2, 1, 5, 6),)),
    mod(aten.native_layer_norm.default, "affine", lambda: _affine(nn.LayerNorm(4)), (2, 3, 4)),
    mod(aten.native_layer_norm.default, "2d-shape", lambda: _affine(nn.LayerNorm([3, 4])), (2, 3, 4)),
    mod(aten.native_layer_norm.default, "no-bias", lambda: _affine(nn.LayerNorm(4, bias=False)), (2, 3, 4)),
    mod(aten.native_layer_norm.default, "no-affine", lambda: nn.LayerNorm(4, elementwise_affine=False), (2, 3, 4)),
    mod(aten.native_layer_norm.default, "eval", lambda: _affine(nn.LayerNorm(4)), (2, 3, 4), mode="eval"),
    mod(aten._native_batch_norm_legit_functional.default, "2d", _bn(nn.BatchNorm2d, 3), (4, 3, 3, 3)),
    mod(aten._native_batch_norm_legit_functional.default, "1d", _bn(nn.BatchNorm1d, 3), (4, 3, 5)),
    mod(aten._native_batch_norm_legit_functional.default, "features", _bn(nn.BatchNorm1d, 3), (4, 3)),
    mod(aten._native_batch_norm_legit_functional.default, "no-affine", _bn(nn.BatchNorm2d, 3, affine=False),
        (4, 3, 3, 3)),
    mod(aten._native_batch_norm_legit_no_training.default, "2d", _bn(nn.BatchNorm2d, 3), (4, 3, 3, 3),
        mode="eval"),
    mod(aten._native_batch_norm_legit_no_training.default, "1d", _bn(nn.BatchNorm1d, 3), (4, 3), mode="eval"),
    mod(aten._native_batch_norm_legit_no_training.default, "no-affine", _bn(nn.BatchNorm2d, 3, affine=False),
        (4, 3, 3, 3), mode="eval"),
    mod(aten.native_group_norm.default, "train", lambda: _affine(nn.GroupNorm(2, 4)), (2, 4, 3, 3)),
    mod(aten.native_group_norm.default, "eval", lambda: _affine(nn.GroupNorm(2, 4)), (2, 4, 3, 3), mode="eval"),
    mod(aten.native_group_norm.default, "no-affine-1d", lambda: nn.GroupNorm(4, 4, affine=False), (2, 4, 5)),
    # The cotangent arrives expanded (stride 0) from the mean: the kernel must get it dense.
    fn(aten.native_group_norm.default, "expanded-cotangent", lambda x, w, b: F.group_norm(x, 2, w, b).mean(-1),
       (3, 6, 5), (6,), (6,)),
    fn(aten.native_group_norm.default, "permuted-cotangent",
       lambda x, w, b: F.group_norm(x, 2, w, b).transpose(1, 2).contiguous(), (3, 6, 5), (6,), (6,)),
    direct(aten.native_group_norm.default, "mean-rstd-outputs", (P(0), P(1), P(2), 2, 6, 5, 3, 1e-5),
           (2, 6, 5), (6,), (6,)),
    direct(aten._native_batch_norm_legit_functional.default, "training-false",
           (P(0), P(1), P(2), In(0), In(1), False, 0.1, 1e-5), (4, 3, 5), (3,), (3,), inputs=((3,), pos(3)),
           use=(0,)),
    direct(aten._native_batch_norm_legit.default, "train", (P(0), P(1), P(2), In(0), In(1), True, 0.1, 1e-5),
           (4, 3, 5), (3,), (3,), inputs=((3,), pos(3)), use=(0,)),
    direct(aten._native_batch_norm_legit.default, "training-false",
           (P(0), P(1), P(2), In(0), In(1), False, 0.1, 1e-5), (4, 3, 5), (3,), (3,), inputs=((3,), pos(3)),
           use=(0,)),
    fn(aten._native_batch_norm_legit.no_stats, "instance-norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
       (2, 3, 5), (3,), (3,)),
    fn(aten._native_batch_norm_legit.no_stats, "functional-no-buffers",
       lambda x: F.batch_norm(x, None, None, training=True), (4, 3, 2, 2)),
    # ---------------------------------------------------------------- reductions, scans, pooling
    fn(aten.sum.dim_IntList, "dim", lambda a: a.sum(1), (2, 3, 4)),
    fn(aten.sum.dim_IntList, "negative-dims-keepdim", lambda a: a.sum((-1, 0), keepdim=True), (2, 3, 4)),
    fn(aten.sum.dim_IntList, "all", lambda a: a.sum(), (2, 3, 4)),
    fn(aten.sum.dim_IntList, "float64-accumulator", lambda a: a.sum(-1, dtype=torch.float64), (2, 3, 4)),
    direct(aten.sum.default, "plain", (P(0),), (2, 3, 4)),
    direct(aten.sum.default, "float64-accumulator", (P(0),), (2, 3, 4), dtype=torch.float64),
    fn(aten.mean.dim, "negative-dim", lambda a: a.mean(-2), (2, 3, 4)),
    fn(aten.mean.dim, "dims-keepdim", lambda a: a.mean((0, 2), keepdim=True), (2, 3, 4)),
    fn(aten.mean.default, "plain", lambda a: aten.mean.default(a), (2, 3, 4)),
    fn(aten.mean.default, "float64-accumulator", lambda a: aten.mean.default(a, dtype=torch.float64), (2, 3, 4)),
    fn(aten.mean.dim, "float64-accumulator", lambda a: a.mean(0, dtype=torch.float64), (2, 3, 4)),
    fn(aten.mean.dim, "0d-keepdim", lambda a: a.mean(dim=0, keepdim=True) * a, ()),
    fn(aten.mean.dim, "0d-negative-dim", lambda a: a.mean(dim=-1), ()),
    fn(aten.cumsum.default, "last-dim", lambda a: a.cumsum(-1), (2, 3, 4)),
    fn(aten.cumsum.default, "dim0", lambda a: a.cumsum(0), (2, 3, 4)),
    fn(aten.cumsum.default, "float64-accumulator", lambda a: a.cumsum(1, dtype=torch.float64), (2, 3, 4)),
    fn(aten.cumprod.default, "no-zeros", lambda a: a.cumprod(-1), pos(2, 3, 4)),
    # zeros: one per line, two in a line (the first gets the gradient, after it nothing), none in the last line
    fn(aten.cumprod.default, "zeros", lambda a: a.cumprod(1),
       lambda: torch.tensor([[1.5, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 2.0], [0.5, -2.0, 1.5, 3.0]])),
    fn(aten.amax.default, "dim", lambda a: a.amax(1), (2, 3, 4)),
    fn(aten.amax.default, "negative-dims-keepdim", lambda a: a.amax((-1, 0), keepdim=True), (2, 3, 4)),
    fn(aten.amax.default, "ties", lambda a: a.amax(-1), ties(3, 6)),
    fn(aten.amax.default, "all-ties", lambda a: a.amax(), ties(3, 4)),
    fn(aten.max_pool2d_with_indices.default, "k2", lambda a: F.max_pool2d(a, 2), (2, 3, 4, 4)),
    fn(aten.max_pool2d_with_indices.default, "k3-s2-p1", lambda a: F.max_pool2d(a, 3, 2, 1), (2, 3, 5, 5)),
    fn(aten.max_pool2d_with_indices.default, "ceil-dilation",
       lambda a: F.max_pool2d(a, 2, 2, dilation=2, ceil_mode=True), (1, 2, 7, 7)),
    fn(aten.max_pool2d_with_indices.default, "overlapping-ties", lambda a: F.max_pool2d(a, 3, 1), ties(1, 2, 5, 5)),
    fn(aten.avg_pool2d.default, "k2", lambda a: F.avg_pool2d(a, 2), (2, 3, 4, 4)),
    fn(aten.avg_pool2d.default, "k3-s2-p1-exclude-pad",
       lambda a: F.avg_pool2d(a, 3, 2, 1, count_include_pad=False), (2, 3, 5, 5)),
    fn(aten.avg_pool2d.default, "ceil-divisor", lambda a: F.avg_pool2d(a, 2, ceil_mode=True, divisor_override=3),
       (1, 2, 5, 5)),
    fn(aten._adaptive_avg_pool2d.default, "divisible", lambda a: F.adaptive_avg_pool2d(a, 2), (2, 3, 4, 4)),
    fn(aten._adaptive_avg_pool2d.default, "uneven", lambda a: F.adaptive_avg_pool2d(a, (3, 2)), (2, 3, 5, 5)),
    fn(aten.var.correction, "unbiased-last-dim", lambda a: a.var(-1), (2, 3, 4)),
    fn(aten.var.correction, "population-keepdim", lambda a: a.var((0, 2), correction=0, keepdim=True), (2, 3, 4)),
    fn(aten.var.correction, "all", lambda a: a.var(), (2, 3, 4)),
    fn(aten.var.correction, "std", lambda a: a.std(1), (2, 3, 4)),
    fn(aten.var.correction, "0d", lambda a: a.var(dim=0, correction=0) + a, ()),
    # ---------------------------------------------------------------- views, slicing, joining, indexing
    fn(aten.view.default, "plain", lambda a: a.view(4, 6), (2, 3, 4)),
    direct(aten._unsafe_view.default, "plain", (P(0), [6, 4]), (2, 3, 4)),
    direct(aten.reshape.default, "inferred", (P(0), [4, -1]), (2, 3, 4)),
    direct(aten.flatten.using_ints, "negative-end", (P(0), 1, -1), (2, 3, 4, 5)),
    fn(aten.squeeze.dims, "plain", lambda a: a.squeeze(1), (3, 1, 4)),
    direct(aten.squeeze.dim, "negative", (P(0), -2), (3, 1, 4)),
    direct(aten.squeeze.default, "all", (P(0),), (3, 1, 4, 1)),
    fn(aten.unsqueeze.default, "negative", lambda a: a.unsqueeze(-1), (3, 4)),
    fn(aten.permute.default, "negative-dims", lambda a: a.permute(2, -3, 1), (2, 3, 4)),
    direct(aten.transpose.int, "negative", (P(0), 0, -1), (2, 3, 4)),
    direct(aten.t.default, "plain", (P(0),), (3, 4)),
    fn(aten.expand.default, "new-lead-dims", lambda a: a.expand(2, 3, 4), (3, 1)),
    fn(aten.expand.default, "keep", lambda a: a.expand(-1, 4, -1), (2, 1, 3)),
    fn(aten.slice.Tensor, "step", lambda a: a[:, ::2], (3, 5)),
    fn(aten.slice.Tensor, "negative-start-step", lambda a: a[..., -4::3], (2, 3, 7)),
    fn(aten.slice.Tensor, "range", lambda a: a[1:3], (4, 3)),
    fn(aten.slice.Tensor, "negative-end", lambda a: a[:, 1:-1], (4, 5)),
    fn(aten.select.int, "negative-index", lambda a: a[:, -1], (3, 4)),
    fn(aten.cat.default, "negative-dim", lambda a, b, c: torch.cat([a, b, c], -1), (2, 3), (2, 1),
       inputs=((2, 2),)),
    fn(aten.cat.default, "dim0-reused", lambda a, b: torch.cat([a, b, a]), (2, 3), (1, 3)),
    fn(aten.cat.default, "legacy-empty", lambda e, a, b, f: torch.cat([e, a, f, b], -2), (0,), (2, 3, 4),
       (2, 1, 4), inputs=((0,),)),
    fn(aten.split_with_sizes.default, "sizes", lambda a: torch.split(a, [1, 3], 1), (2, 4, 3)),
    fn(aten.split_with_sizes.default, "chunks-one-unused", lambda a: torch.split(a, 2, -1)[::2], (3, 5)),
    direct(aten.split.Tensor, "one-unused", (P(0), 2, -1), (3, 5), use=(0, 2)),
    direct(aten.unbind.int, "one-unused", (P(0), 1), (2, 3, 4), use=(0, 2)),
    direct(aten.unbind.int, "negative-dim", (P(0), -1), (2, 3)),
    direct(aten.stack.default, "negative-dim", ([P(0), In(0), P(1)], -1), (2, 3), (2, 3), inputs=((2, 3),)),
    direct(aten.stack.default, "dim0", ([P(0), P(0)],), (3,)),
    fn(aten.index.Tensor, "repeated-rows", lambda a, i: a[i], (4, 3), inputs=(lambda: torch.tensor([1, 0, 1, 3]),)),
    fn(aten.index.Tensor, "second-dim", lambda a, i: a[:, i], (2, 4, 3), inputs=(lambda: torch.tensor([3, 3, 0]),)),
    fn(aten.index.Tensor, "two-index-tensors", lambda a, i, j: a[i, j], (3, 4),
       inputs=(lambda: torch.tensor([0, 2, 0]), lambda: torch.tensor([1, 1, 1]))),
    fn(aten.index_select.default, "repeated", lambda a, i: a.index_select(1, i), (2, 4, 3),
       inputs=(lambda: torch.tensor([2, 0, 2]),)),
    fn(aten.gather.default, "last-dim", lambda a, i: a.gather(-1, i), (3, 4), inputs=(ints(4, 3, 6),)),
    fn(aten.gather.default, "dim0", lambda a, i: torch.gather(a, 0, i), (3, 4), inputs=(ints(3, 5, 4),)),
    mod(aten.embedding.default, "repeated-ids", lambda: nn.Embedding(5, 3), inputs=(ints(5, 2, 6),)),
    mod(aten.embedding.default, "padding-idx", lambda: nn.Embedding(5, 3, padding_idx=0),
        inputs=(lambda: torch.tensor([[0, 1, 0, 4]]),)),
    mod(aten.embedding.default, "scale-grad-by-freq", lambda: nn.Embedding(5, 3, scale_grad_by_freq=True),
        inputs=(lambda: torch.tensor([[1, 1, 3], [1, 0, 3]]),)),
    fn(aten.constant_pad_nd.default, "pad", lambda a: F.pad(a, (1, 2, 0, 1), value=0.5), (2, 3, 4)),
    fn(aten.constant_pad_nd.default, "crop", lambda a: F.pad(a, (-1, 1)), (2, 3, 4)),
    fn(aten.flip.default, "dims", lambda a: a.flip(0, -1), (2, 3, 4)),
    fn(aten.repeat.default, "same-rank", lambda a: a.repeat(2, 1, 3), (2, 3, 4)),
    fn(aten.repeat.default, "new-lead-dims", lambda a: a.repeat(2, 2, 1), (3, 4)),
    # ---------------------------------------------------------------- more unary math (direct: fast, no export)
    fn(aten.log1p.default, "plain", torch.log1p, pos(3, 4)),
    fn(aten.expm1.default, "plain", torch.expm1, (3, 4)),
    direct(aten.log2.default, "plain", (P(0),), pos(3, 4)),
    direct(aten.log10.default, "plain", (P(0),), pos(3, 4)),
    direct(aten.exp2.default, "plain", (P(0),), (3, 4)),
    direct(aten.sinh.default, "plain", (P(0),), (3, 4)),
    direct(aten.cosh.default, "plain", (P(0),), (3, 4)),
    direct(aten.tan.default, "plain", (P(0),), (3, 4)),
    direct(aten.asin.default, "plain", (P(0),), lambda: torch.rand(3, 4) * 1.6 - 0.8),
    direct(aten.acos.default, "plain", (P(0),), lambda: torch.rand(3, 4) * 1.6 - 0.8),
    direct(aten.asinh.default, "plain", (P(0),), (3, 4)),
    direct(aten.acosh.default, "plain", (P(0),), lambda: torch.rand(3, 4) + 1.5),
    direct(aten.atan.default, "plain", (P(0),), (3, 4)),
    direct(aten.atanh.default, "plain", (P(0),), lambda: torch.rand(3, 4) * 1.6 - 0.8),
    fn(aten.atan2.default, "broadcast", torch.atan2, (3, 4), (4,)),
    fn(aten.hypot.default, "broadcast", torch.hypot, (3, 4), (4,)),
    fn(aten.angle.default, "real", lambda a: torch.angle(a) * a, (3, 4)),
    direct(aten.erfc.default, "plain", (P(0),), (3, 4)),
    direct(aten.erfinv.default, "plain", (P(0),), lambda: torch.rand(3, 4) * 1.6 - 0.8),
    direct(aten.i0.default, "plain", (P(0),), (3, 4)),
    direct(aten.lgamma.default, "plain", (P(0),), pos(3, 4)),
    direct(aten.digamma.default, "plain", (P(0),), pos(3, 4)),
    direct(aten.polygamma.default, "n2", (2, P(0)), pos(3, 4)),
    direct(aten.view_copy.default, "plain", (P(0), [4, 3]), (3, 4)),
    direct(aten.permute_copy.default, "plain", (P(0), [2, 0, 1]), (2, 3, 4)),
    direct(aten.narrow_copy.default, "plain", (P(0), 1, 1, 2), (3, 4)),
    direct(aten.special_erfcx.default, "plain", (P(0),), (3, 4)),
    fn(aten.special_log_ndtr.default, "both-tails", torch.special.log_ndtr,
       lambda: torch.linspace(-9, 5, 12).view(3, 4)),  # below -6 the decomposition's log1p(-erfc/2) is -inf
    direct(aten.sign.default, "plain", (P(0),), (3, 4)),
    direct(aten.floor.default, "plain", (P(0),), (3, 4)),
    direct(aten.ceil.default, "plain", (P(0),), (3, 4)),
    direct(aten.round.default, "plain", (P(0),), (3, 4)),
    direct(aten.round.decimals, "plain", (P(0),), (3, 4), decimals=1),
    direct(aten.trunc.default, "plain", (P(0),), (3, 4)),
    direct(aten.fmod.Scalar, "plain", (P(0), 0.7), (3, 4)),
    direct(aten.remainder.Scalar, "plain", (P(0), 0.7), (3, 4)),
    direct(aten.fmod.Tensor, "broadcast", (P(0), P(1)), (3, 4), pos(4)),
    direct(aten.remainder.Tensor, "broadcast", (P(0), P(1)), (3, 4), pos(3, 1)),
    direct(aten.div.Tensor_mode, "floor", (P(0), P(1)), (3, 4), pos(4), rounding_mode="floor"),
    direct(aten.div.Tensor_mode, "true", (P(0), P(1)), (3, 4), pos(4), rounding_mode=None),
    fn(aten.elu.default, "elu", F.elu, wide(3, 4)),
    fn(aten.elu.default, "selu", F.selu, wide(3, 4)),
    direct(aten.elu.default, "alpha-scales", (P(0), 0.5, 1.2, 2.0), wide(3, 4)),
    fn(aten.clamp.Tensor, "both", lambda a, lo, hi: torch.clamp(a, lo, hi), ties(3, 4), ties(4,),
       lambda: torch.randint(-1, 3, (3, 1)).float()),
    fn(aten.clamp.Tensor, "min-only", lambda a, lo: torch.clamp(a, min=lo), (3, 4), (3, 4)),
    direct(aten.fmax.default, "ties-nan", (P(0), P(1)), ties(3, 4), lambda: torch.tensor([0.0, float("nan"), 1, 2])),
    direct(aten.fmin.default, "broadcast", (P(0), P(1)), (3, 4), (4,)),
    # ---------------------------------------------------------------- more reductions, selections, pooling
    fn(aten.amin.default, "ties", lambda a: a.amin(-1), ties(3, 6)),
    direct(aten.max.default, "ties", (P(0),), ties(3, 4)),
    direct(aten.min.default, "plain", (P(0),), (3, 4)),
    direct(aten.median.default, "plain", (P(0),), (3, 5)),
    direct(aten.nanmedian.default, "plain", (P(0),), (3, 5)),
    fn(aten.max.dim, "keepdim", lambda a: a.max(1, keepdim=True)[0], (3, 4)),
    fn(aten.min.dim, "negative-dim", lambda a: a.min(-1)[0], (3, 4)),
    direct(aten.kthvalue.default, "dim0", (P(0), 2, 0), (3, 4), use=(0,)),
    direct(aten.mode.default, "plain", (P(0),), ties(3, 6), use=(0,)),
    direct(aten.median.dim, "plain", (P(0), 1), (3, 5), use=(0,)),
    direct(aten.nanmedian.dim, "keepdim", (P(0), 1, True), (3, 5), use=(0,)),
    fn(aten.sort.default, "descending", lambda a: a.sort(1, descending=True)[0], (3, 4)),
    direct(aten.sort.stable, "stable", (P(0),), ties(3, 6), use=(0,), stable=True, dim=0),
    fn(aten.topk.default, "k2", lambda a: a.topk(2, 0)[0], (3, 4)),
    fn(aten.cummax.default, "plain", lambda a: a.cummax(1)[0], (3, 4)),
    fn(aten.cummin.default, "dim0", lambda a: a.cummin(0)[0], (3, 4)),
    fn(aten.prod.dim_int, "with-zeros", lambda a: a.prod(1), lambda: torch.randn(3, 4) * (torch.rand(3, 4) > 0.3)),
    fn(aten.prod.dim_int, "keepdim", lambda a: a.prod(0, keepdim=True), (3, 4)),
    fn(aten.prod.default, "one-zero", lambda a: a.prod(), lambda: torch.randn(3, 4).index_fill(1, torch.tensor(2), 0)),
    fn(aten.linalg_vector_norm.default, "l2-dim", lambda a: torch.linalg.vector_norm(a, dim=1), (3, 4)),
    fn(aten.linalg_vector_norm.default, "l2-all-zero-row", lambda a: torch.linalg.vector_norm(a * torch.tensor(
        [[0.0], [1.0], [1.0]]), dim=-1), (3, 4)),
    fn(aten.linalg_vector_norm.default, "l1", lambda a: torch.linalg.vector_norm(a, 1), (3, 4)),
    fn(aten.linalg_vector_norm.default, "l3-keepdim", lambda a: torch.linalg.vector_norm(a, 3, 0, True), (3, 4)),
    fn(aten.linalg_vector_norm.default, "l0.5", lambda a: torch.linalg.vector_norm(a, 0.5, 1), (3, 4)),
    fn(aten.linalg_vector_norm.default, "inf-ties", lambda a: torch.linalg.vector_norm(a, float("inf"), 1),
       ties(3, 4)),
    fn(aten.linalg_vector_norm.default, "l0", lambda a: torch.linalg.vector_norm(a, 0, 1, True) * a, (3, 4)),
    fn(aten.var_mean.correction, "both", lambda a: torch.var_mean(a, 1), (3, 4)),
    fn(aten.max_pool3d_with_indices.default, "k2", lambda a: F.max_pool3d(a, 2), (1, 2, 4, 4, 4)),
    fn(aten.avg_pool3d.default, "k2-s1", lambda a: F.avg_pool3d(a, 2, 1), (1, 2, 3, 3, 3)),
    fn(aten._adaptive_avg_pool3d.default, "uneven", lambda a: F.adaptive_avg_pool3d(a, (2, 1, 3)), (1, 2, 3, 3, 4)),
    fn(aten.adaptive_max_pool2d.default, "uneven", lambda a: F.adaptive_max_pool2d(a, (2, 3)), (1, 2, 5, 5)),
    fn(aten.adaptive_max_pool3d.default, "plain", lambda a: F.adaptive_max_pool3d(a, 2), (1, 2, 4, 4, 4)),
    # ---------------------------------------------------------------- scatter, index updates, diagonals, upsampling
    fn(aten.index_put.default, "overwrite", lambda a, v, i: a.index_put((i,), v), (4, 3), (2, 3),
       inputs=(lambda: torch.tensor([0, 2]),)),
    fn(aten.index_put.default, "accumulate-broadcast", lambda a, v, i: a.index_put((i,), v, accumulate=True), (4, 3),
       (3,), inputs=(lambda: torch.tensor([1, 1, 3]),)),
    fn(aten.scatter.src, "dim0", lambda a, s, i: a.scatter(0, i, s), (3, 4), (2, 4),
       inputs=(lambda: torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1]]),)),
    fn(aten.scatter.value, "dim1", lambda a, i: a.scatter(1, i, 2.0), (3, 4), inputs=(ints(4, 3, 2),)),
    fn(aten.scatter_add.default, "dim1", lambda a, s, i: a.scatter_add(1, i, s), (3, 4), (3, 2),
       inputs=(ints(4, 3, 2),)),
    fn(aten.scatter_reduce.two, "sum-exclude-self",
       lambda a, s, i: a.scatter_reduce(0, i, s, "sum", include_self=False), (3, 4), (2, 4), inputs=(ints(3, 2, 4),)),
    *[fn(aten.scatter_reduce.two, f"{reduce}-{'include' if include else 'exclude'}-self",
         lambda a, s, i, reduce=reduce, include=include: a.scatter_reduce(0, i, s, reduce, include_self=include),
         ties(3, 4), ties(4, 4), inputs=(lambda: torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1], [0, 1, 2, 2], [2, 0, 0, 1]]),))
      for reduce in ("prod", "mean", "amax", "amin") for include in (True, False)],
    direct(aten.index_add.default, "alpha", (P(0), 1, In(0), P(1)), (3, 4), (3, 2),
           inputs=(lambda: torch.tensor([3, 3]),), alpha=2.0),
    fn(aten.diagonal.default, "offset", lambda a: torch.diagonal(a, 1, -1, 0), (4, 2, 3)),
    fn(aten.unfold.default, "overlapping", lambda a: a.unfold(1, 3, 2), (2, 7)),
    fn(aten.diagonal_scatter.default, "plain", torch.diagonal_scatter, (3, 4), (3,)),
    direct(aten.select_scatter.default, "plain", (P(0), P(1), 1, 2), (3, 4), (3,)),
    fn(aten.slice_scatter.default, "step", lambda a, s: torch.slice_scatter(a, s, 1, 0, 4, 2), (3, 4), (3, 2)),
    fn(aten._cdist_forward.default, "p2", torch.cdist, (2, 3, 4), (2, 5, 4)),
    fn(aten._cdist_forward.default, "p1", lambda a, b: torch.cdist(a, b, p=1), (3, 4), (5, 4)),
    mod(aten._embedding_bag.default, "mean-2d", lambda: nn.EmbeddingBag(5, 3), inputs=(ints(5, 2, 4),)),
    fn(aten._embedding_bag.default, "per-sample-weights",
       lambda w, psw, i, o: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=psw), (5, 3), (6,),
       inputs=(ints(5, 6), lambda: torch.tensor([0, 2, 2]))),
    mod(aten._embedding_bag.default, "max", lambda: nn.EmbeddingBag(5, 3, mode="max"), inputs=(ints(5, 3, 2),)),
    *[direct(getattr(aten, name).vec, "scale", (P(0), None, *extra, scales), shape)
      for name, extra, scales, shape in UPSAMPLE],
    *[direct(getattr(aten, name).default, "size", (P(0), size, *extra, *[None] * len(size)), shape)
      for name, extra, size, shape in UPSAMPLE_TO_SIZE],
    fn(aten.copy.default, "broadcast-src", lambda a, s: (a * 2).copy_(s) * a, (3, 4), (4,)),
    direct(aten.copysign.Tensor, "broadcast", (P(0), P(1)), (3, 4), (4,)),
    direct(aten.ldexp.Tensor, "plain", (P(0), P(1)), (3, 4), (3, 4)),
    direct(aten.masked_scatter.default, "broadcast-mask", (P(0), In(0), P(1)), (3, 4), (3, 5), inputs=(mask(4),)),
    fn(aten.addmv.default, "beta-alpha", lambda b, m, v: torch.addmv(b, m, v, beta=0.5, alpha=2.0), (1,), (3, 4),
       (4,)),
    fn(aten.addbmm.default, "plain", torch.addbmm, (3, 5), (2, 3, 4), (2, 4, 5)),
    # transformers' grouped matmul: 4 experts over 7 rows, expert 1 and 3 own none, rows 5-6 lie past the last
    fn(GROUPED_MM, "empty-experts-and-tail", GROUPED_MM, (7, 3), (4, 3, 5), inputs=(lambda: EXPERT_OFFSETS,)),
    fn(GROUPED_MM, "transposed-weight", lambda x, w, offs: GROUPED_MM(x, w.transpose(-2, -1), offs), (7, 3),
       (4, 5, 3), inputs=(lambda: EXPERT_OFFSETS,)),
    fn(GROUPED_MM, "frozen-input", lambda w, x, offs: GROUPED_MM(x, w, offs), (4, 3, 5),
       inputs=((7, 3), lambda: EXPERT_OFFSETS)),
    # pockengine's fused head and loss: the rule runs the op again in the backward pass with the gradient outputs
    # on (the forward here computed none); 3-row chunks over 7 rows, rows 1 and 5 ignored
    direct(LINEAR_CROSS_ENTROPY, "mean-recomputed", (P(0), P(1), P(2), In(0), -100, True, 3, False, False),
           (7, 4), (9, 4), (9,), inputs=(lambda: torch.tensor([3, -100, 0, 8, 2, -100, 5]),), use=(0,)),
    direct(LINEAR_CROSS_ENTROPY, "sum-no-bias-recomputed", (P(0), P(1), None, In(0), -100, False, 3, False, False),
           (7, 4), (9, 4), inputs=(lambda: torch.tensor([3, -100, 0, 8, 2, -100, 5]),), use=(0,)),
    # CTC loss with tensor lengths (traced as pockengine's op): frames (time 8, batch 2, classes 5), padded targets
    fn(CTC_LOSS, "mean", lambda x, t, il, tl: F.ctc_loss(x.log_softmax(-1), t, il, tl), (8, 2, 5),
       inputs=(lambda: torch.tensor([[1, 2, 3], [4, 1, 0]]), lambda: torch.tensor([8, 6]), lambda: torch.tensor([3, 2]))),
    fn(CTC_LOSS, "sum-zero-infinity", lambda x, t, il, tl: F.ctc_loss(x.log_softmax(-1), t, il, tl, reduction="sum",
                                                                      zero_infinity=True), (8, 2, 5),
       inputs=(lambda: torch.tensor([[1, 1, 1, 1, 1], [4, 1, 0, 0, 0]]), lambda: torch.tensor([8, 6]),
               lambda: torch.tensor([5, 2]))),  # the first needs 9 frames: its loss and gradient are 0
    direct(aten._batch_norm_with_update_functional.default, "train", (P(0), P(1), P(2), In(0), In(1), 0.1, 1e-5),
           (4, 3, 5), (3,), (3,), inputs=((3,), pos(3)), use=(0,)),
    fn(aten.grid_sampler_2d.default, "bilinear", lambda a, grid: F.grid_sample(a, grid, align_corners=False),
       (2, 3, 4, 5), lambda: torch.rand(2, 3, 2, 2) * 2 - 1),
    fn(aten.grid_sampler_3d.default, "nearest-border",
       lambda a, grid: F.grid_sample(a, grid, mode="nearest", padding_mode="border", align_corners=True),
       (1, 2, 3, 3, 3), lambda: torch.rand(1, 2, 2, 2, 3) * 2 - 1),
    fn(aten.upsample_nearest2d.vec, "interpolate", lambda a: F.interpolate(a, scale_factor=1.5), (1, 2, 3, 4)),
    fn(aten.upsample_bilinear2d.vec, "interpolate-align-corners",
       lambda a: F.interpolate(a, size=(5, 7), mode="bilinear", align_corners=True), (1, 2, 3, 4)),
]
DROPOUT = aten.native_dropout.default  # checked by the dedicated tests below, against its mask


def _tensors(specs: tuple) -> list[torch.Tensor]:
    return [_make(s) for s in specs]


def _check(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == ref.keys()
    for name, r in ref.items():
        assert grads[name].shape == r.shape and grads[name].dtype == r.dtype, name
        err = rel_err(grads[name], r)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def _check_compiled(case: Case) -> None:
    params, inputs = _tensors(case.params), tuple(_tensors(case.inputs))
    model = OpModule(params, fn=case.fn, sub=case.sub() if case.sub else None)
    getattr(model, case.mode)()
    ref_model = copy.deepcopy(model)
    weights = random_weights(ref_model(*inputs))
    ref = autograd_gradients(ref_model, inputs, weights)
    grads, ops = engine_gradients(model, inputs, weights)
    assert case.op in ops, f"{case.op} is not in the captured graph; make this a direct case"
    _check(grads, ref)


def _subst(a: Any, params: list, inputs: list) -> Any:
    if isinstance(a, P):
        return params[a]
    if isinstance(a, In):
        return inputs[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_subst(x, params, inputs) for x in a)
    return a


def _direct_graph(op: Any, args: tuple, kwargs: dict, params: list[torch.Tensor], inputs: list[torch.Tensor],
                  use: tuple | None, weights: tuple):
    """A graph computing weighted_sum(op(*args)[use], weights); returns it, its loss, the param nodes and values."""
    graph = Graph()
    meta = lambda t: TensorMeta(tuple(t.shape), t.dtype)  # noqa: E731
    pnodes = [graph.input(f"x{i}", PARAM, meta(p)) for i, p in enumerate(params)]
    inodes = [graph.input(f"in{i}", BATCH, meta(t)) for i, t in enumerate(inputs)]
    wnodes = [graph.input(f"w{i}", BATCH, meta(w)) for i, w in enumerate(weights)]
    out = graph.call(op, _subst(args, pnodes, inodes), kwargs)
    outs = [graph.getitem(out, i) for i in use or range(len(out.meta))] if isinstance(out.meta, tuple) else [out]
    loss = None
    for o, w in zip(outs, wnodes):
        term = graph.call(aten.sum.default, (graph.call(aten.mul.Tensor, (o, w)),))
        loss = term if loss is None else graph.call(aten.add.Tensor, (loss, term))
    values = dict(zip(pnodes + inodes + wnodes, [*params, *inputs, *weights]))
    return graph, loss, {f"x{i}": n for i, n in enumerate(pnodes)}, values, outs


def _check_direct(case: Case) -> None:
    params, inputs = _tensors(case.params), _tensors(case.inputs)
    leaves = [p.clone().requires_grad_() for p in params]
    out = case.op(*_subst(case.args, leaves, inputs), **case.kwargs)
    if isinstance(out, (tuple, list)):
        out = tuple(out[i] for i in case.use or range(len(out)))
    weights = random_weights(out)
    ref = torch.autograd.grad(weighted_sum(out, weights), leaves, allow_unused=True)
    ref = {f"x{i}": torch.zeros_like(p) if g is None else g for i, (p, g) in enumerate(zip(params, ref))}
    graph, loss, wrt, values, _ = _direct_graph(case.op, case.args, case.kwargs, params, inputs, case.use, weights)
    _check(_run(graph, loss, wrt, values), ref)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vjp_rule_matches_autograd(case: Case):
    torch.manual_seed(0)
    (_check_direct if case.direct else _check_compiled)(case)


def _rule_ops() -> set:
    """The ops whose rule ships with pockengine (tests elsewhere may register rules of their own); those of other
    libraries' ops are registered by name, and this module imports the libraries."""
    by_name = {torch._library.utils.lookup_op(name.replace(".", "::", 1)): rule for name, rule in VJP_BY_NAME.items()}
    return {op for op, rule in {**VJP, **by_name}.items() if rule.__module__.startswith("pockengine.autodiff.rules")}


def test_every_rule_has_a_case():
    # The marker of a custom autograd.Function runs the Function's own backward: its cases are in
    # tests/test_custom_functions.py.
    custom_functions = {torch.ops.pockengine.autograd_function.default}
    tested = {c.op for c in CASES} | {DROPOUT} | custom_functions
    untested = sorted(str(op) for op in _rule_ops() - tested)
    assert not untested, f"VJP rules without a case in tests/test_vjp_rules.py: {untested}"
    unregistered = sorted(str(op) for op in tested if rule_for(op) is None)
    assert not unregistered, f"cases for ops with no rule: {unregistered}"


# ------------------------------------------------------------------------------------------------ partial weights
# A partially trained weight wants the gradient of some channels only (`ChannelSlice`). The matmul and convolution
# rules compute just that (from the selected input channels); for the other slices the engine cuts the full
# gradient. Either way it must equal autograd's gradient restricted to the channels.
SLICED = [  # (id, op, layer, input shape, dim of weight, channels)
    ("linear-in-prefix", aten.addmm.default, lambda: nn.Linear(4, 5), (3, 4), 1, (0, 1)),
    ("linear-in-scattered", aten.addmm.default, lambda: nn.Linear(4, 5), (3, 4), 1, (1, 3)),
    ("linear-3d-in", aten.mm.default, lambda: nn.Linear(4, 5, bias=False), (2, 3, 4), 1, (0, 2, 3)),
    ("linear-out", aten.addmm.default, lambda: nn.Linear(4, 5), (3, 4), 0, (1, 4)),
    ("conv-in-prefix", aten.convolution.default, lambda: nn.Conv2d(4, 6, 3), (2, 4, 5, 5), 1, (0, 1)),
    ("conv-in-scattered-strided", aten.convolution.default, lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
     (2, 4, 5, 5), 1, (0, 2, 3)),
    ("depthwise", aten.convolution.default, lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 5, 5), 0,
     (1, 2)),
    ("conv-out", aten.convolution.default, lambda: nn.Conv2d(4, 6, 3), (2, 4, 5, 5), 0, (0, 5)),
    ("conv-groups", aten.convolution.default, lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 5, 5), 1, (1,)),
    ("transposed", aten.convolution.default, lambda: nn.ConvTranspose2d(4, 3, 3, stride=2), (2, 4, 3, 3), 1,
     (0, 2)),
    ("experts-contraction", GROUPED_MM, lambda: _Experts(4, 3, 5), (7, 3), 1, (0, 2)),
    ("experts-out-scattered", GROUPED_MM, lambda: _Experts(4, 3, 5), (7, 3), 2, (1, 3, 4)),
    ("experts-hf-layout", GROUPED_MM, lambda: _Experts(4, 5, 3, transposed=True), (7, 3), 1, (0, 1)),
    ("experts-chosen", GROUPED_MM, lambda: _Experts(4, 3, 5), (7, 3), 0, (1, 2)),
]


class _Experts(nn.Module):
    """x @ weight[e] for the rows of expert e, as transformers' experts layers run it; `transposed`: the weight is
    stored (experts, out, in) and transposed on the way, as transformers stores it (the scheme's dim 1 then selects
    output channels)."""

    def __init__(self, experts: int, k: int, n: int, transposed: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, k, n))
        self.transposed = transposed
        self.register_buffer("offs", EXPERT_OFFSETS.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GROUPED_MM(x, self.weight.transpose(-2, -1) if self.transposed else self.weight, self.offs)


@pytest.mark.parametrize("id,op,layer,shape,dim,channels", SLICED, ids=[c[0] for c in SLICED])
def test_partial_weight_gradient_matches_autograd(id, op, layer, shape, dim, channels):
    torch.manual_seed(0)
    model = OpModule([torch.randn(shape)], sub=layer())
    ref_model = copy.deepcopy(model)
    weights = random_weights(ref_model())
    ref = autograd_gradients(ref_model, (), weights)
    ref["sub.weight"] = ref["sub.weight"].index_select(dim, torch.tensor(channels))
    grads, ops = engine_gradients(model, (), weights, slices={"sub.weight": (dim, channels)})
    assert op in ops
    _check(grads, ref)


def _per_expert_matmuls(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped matmul written as one matmul per expert, rows past the last offset 0."""
    bounds = [0, *offs.tolist()]
    rows = [x[start:end] @ w[e] for e, (start, end) in enumerate(zip(bounds, bounds[1:]))]
    return torch.cat(rows + [x.new_zeros(len(x) - bounds[-1], w.shape[2])])


def test_grouped_mm_gradients_are_those_of_per_expert_matmuls():
    """The cases above compare with autograd through transformers' own backward of the op; this compares with
    autograd through plain matmuls, one per expert, an oracle independent of transformers."""
    torch.manual_seed(0)
    x, w = torch.randn(7, 3), torch.randn(4, 3, 5)
    model = OpModule([x, w], fn=GROUPED_MM)
    ref_model = OpModule([x.clone(), w.clone()], fn=_per_expert_matmuls)
    weights = random_weights(ref_model(EXPERT_OFFSETS))
    grads, _ = engine_gradients(model, (EXPERT_OFFSETS,), weights)
    _check(grads, autograd_gradients(ref_model, (EXPERT_OFFSETS,), weights))


def test_rules_of_other_libraries_ops_need_no_import_of_them():
    """pockengine registers the grouped matmul's rule by name: importing it loads no transformers, and the rule is
    found once transformers defines the op."""
    script = ("import sys, torch, pockengine.autodiff as ad; assert 'transformers' not in sys.modules; "
              "import transformers.integrations.moe; "
              "assert ad.rule_for(torch.ops.transformers.grouped_mm_fallback.default) is ad.rules.linalg.grouped_mm")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)


# ------------------------------------------------------------------------------------------------ dropout
def _dropout_program(p: float, train: bool | None, shape=(64, 32)):
    """native_dropout(x, p, train) on a hand-built graph; returns x, w, the output and the gradient of x."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    (weights,) = random_weights(x)
    graph, loss, wrt, values, (y,) = _direct_graph(DROPOUT, (P(0), p, train), {}, [x], [], (0,), (weights,))
    out = _run(graph, loss, wrt, values, extra={"y": y})
    return x, weights, out["y"], out["x0"]


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_dropout_gradient_is_mask_times_scale(p):
    x, w, y, grad = _dropout_program(p, True)
    kept = y != 0  # the mask, read off the output (x has no zeros)
    scale = 1.0 / (1.0 - p)
    assert 0.5 * (1 - p) < kept.float().mean().item() < 1.5 * (1 - p)  # some dropped, some kept
    assert rel_err(y, x * kept * scale) <= TOL
    assert rel_err(grad, w * kept * scale) <= TOL


def test_dropout_not_training_is_identity():
    x, w, y, grad = _dropout_program(0.5, False)
    assert torch.equal(y, x)
    assert rel_err(grad, w) <= TOL


def test_dropout_p_one_drops_everything():
    x, w, y, grad = _dropout_program(1.0, True)
    assert not y.any() and not grad.any()


class _RReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.randn(64, 32))

    def forward(self):
        return F.rrelu(self.x, 0.1, 0.3, training=True)


def test_rrelu_gradient_is_the_drawn_slope():
    """Train mode draws a slope per negative entry: its gradient is w there (w where the entry is positive), the
    slope read off the output, each within [lower, upper]."""
    torch.manual_seed(0)
    model = _RReLU()
    weights = random_weights(model.x)
    grads, ops = engine_gradients(model, (), weights)
    assert aten.rrelu_with_noise_functional.default in ops
    x = model.x.detach()
    slope = grads["x"] / weights[0]
    assert torch.allclose(slope[x > 0], torch.ones(()))
    negative = slope[x < 0]
    assert 0.1 - 1e-6 <= negative.min() and negative.max() <= 0.3 + 1e-6 and negative.std() > 0.03


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.randn(64, 32))

    def forward(self):
        return F.dropout(self.x, 0.25, self.training)


def test_dropout_through_the_trainer():
    """Through pe.compile: each gradient entry is either 0 (dropped) or w / (1 - p) (kept)."""
    torch.manual_seed(0)
    model = _Dropout()
    weights = random_weights(model.x)
    batch = ((), weights)
    trainer = pe.compile(model, weighted_sum, batch)
    assert DROPOUT in {n.target for n in trainer.program(gradients=True).graph.nodes}
    grad = trainer.gradients(batch)["x"]
    kept = grad != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    assert rel_err(grad, weights[0] * kept / 0.75) <= TOL


# ------------------------------------------------------------------------------------------------ norm statistics
def test_group_norm_rstd_output_alone():
    """The per-group rstd output differentiated alone. autograd drops this term unless the mean output is used
    too (its kernel adds the statistics' terms only when both are), so the reference is rstd written out."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    (weights,) = random_weights(torch.empty(2, 3))
    graph, loss, wrt, values, _ = _direct_graph(aten.native_group_norm.default, (P(0), None, None, 2, 6, 5, 3, 1e-5),
                                                {}, [x], [], (2,), (weights,))
    leaf = x.clone().requires_grad_()
    rstd = (leaf.reshape(2, 3, -1).var(-1, correction=0) + 1e-5).rsqrt()
    (ref,) = torch.autograd.grad((rstd * weights).sum(), leaf)
    _check(_run(graph, loss, wrt, values), {"x0": ref})


@pytest.mark.parametrize("op,args,shapes", [
    (aten.native_layer_norm.default, (P(0), [5], None, None, 1e-5), [(2, 3, 5)]),
    (aten._native_batch_norm_legit_functional.default, (P(0), None, None, In(0), In(1), True, 0.1, 1e-5),
     [(4, 3, 5)]),
])
def test_undifferentiable_norm_statistics_are_refused(op, args, shapes):
    """PyTorch does not differentiate the statistics outputs of layer and batch norm: a loss reading them is
    refused with a clear error, not given a gradient that leaves them out."""
    params = [torch.randn(s) for s in shapes]
    inputs = [torch.zeros(3), torch.ones(3)]
    out = op(*_subst(args, params, inputs))
    graph, loss, wrt, values, _ = _direct_graph(op, args, {}, params, inputs, (0, 1), random_weights(out[:2]))
    with pytest.raises(pe.errors.MissingVJPError, match="does not differentiate"):
        _run(graph, loss, wrt, values)


def test_group_norm_after_conv_through_the_trainer():
    """Conv1d -> GroupNorm -> mean -> Linear under cross-entropy, every parameter trained (the mean hands the
    group norm an expanded cotangent)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), _affine(nn.GroupNorm(2, 6)), _Mean(2), nn.Linear(6, 4))
    x, y = torch.randn(5, 3, 8), torch.randint(0, 4, (5,))
    ref_model = copy.deepcopy(model)
    names, params = zip(*ref_model.named_parameters())
    ref = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref_model(x), y), params)))
    trainer = pe.compile(model, pe.losses.cross_entropy(), ((x,), y), scheme=pe.Scheme.full())
    _check(trainer.gradients(((x,), y)), ref)


@pytest.mark.parametrize("scheme", ["full", "last2"])
def test_group_norm_after_a_channels_last_conv2d_through_the_trainer(scheme):
    """Conv2d -> GroupNorm -> SiLU -> pool -> Linear: the trainer runs the convolution channels-last, so the group
    norm's input is channels-last while its cotangent is not (the kernel then gave wrong gradients, or crashed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,))
    ref_model = copy.deepcopy(model)
    names, params = zip(*ref_model.named_parameters())
    ref = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref_model(x), y), params)))
    scheme = pe.Scheme.full() if scheme == "full" else pe.Scheme.last(2)
    trainer = pe.compile(model, pe.losses.cross_entropy(), ((x,), y), scheme=scheme)
    grads = trainer.gradients(((x,), y))
    _check(grads, {n: ref[n] for n in grads})


def test_convolution_with_one_padding_value_for_both_dimensions():
    """ATen accepts padding=[1] for a 2-d convolution (EfficientNet's export has it); the input gradient reads one
    value per spatial dimension."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 7, 6), torch.randn(4, 3, 3, 3)

    class OnePadding(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 3, 1)
            self.weight = nn.Parameter(w.clone())

        def forward(self, x):
            return torch.ops.aten.convolution(self.first(x), self.weight, None, [2], [1], [1], False, [0], 1)

    model = OnePadding()
    ref_model = copy.deepcopy(model)
    names, params = zip(*ref_model.named_parameters())
    ref = dict(zip(names, torch.autograd.grad(ref_model(x).square().mean(), params)))
    trainer = pe.compile(model, lambda out, target: out.square().mean(), ((x,), None))
    _check(trainer.gradients(((x,), None)), ref)


class _Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dim)


# ------------------------------------------------------------------------------------------------ no-rule paths
def test_factory_ops_of_an_input_give_it_no_gradient():
    """full_like, zeros_like, ones_like, empty_like and new_* read their input for its shape only: autograd
    registers no derivative through them, so they need no rule and pass nothing back."""
    def f(a):
        made = torch.full_like(a, 2.0) + torch.zeros_like(a) + torch.ones_like(a) + torch.empty_like(a).fill_(1.0)
        return a * made + a.new_ones(a.shape) * a.new_zeros(a.shape[-1]) + torch.rand_like(a) * 0.0
    torch.manual_seed(0)
    model = OpModule([torch.randn(3, 4)], fn=f)
    weights = random_weights(torch.empty(3, 4))
    grads, ops = engine_gradients(model, (), weights)
    assert aten.full_like.default in ops and not {aten.full_like.default, aten.rand_like.default} & set(VJP)
    _check(grads, autograd_gradients(copy.deepcopy(model), (), weights))


class _Recurrent(nn.Module):
    """A recurrent layer over a sequence, or a cell applied twice (the second step from the first's state)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.layer, (nn.LSTMCell, nn.GRUCell)):
            return self.layer(x)[0]
        state = self.layer(x[0])
        return self.layer(x[1], state)[0] if isinstance(state, tuple) else self.layer(x[1], state)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [lambda: nn.LSTM(4, 5, num_layers=2), lambda: nn.GRU(4, 5, bidirectional=True),
                                   lambda: nn.LSTM(4, 5, batch_first=True, proj_size=3), lambda: nn.LSTMCell(4, 5),
                                   lambda: nn.GRUCell(4, 5)], ids=["lstm-2-layers", "gru-bidirectional",
                                                                   "lstm-projected", "lstm-cell", "gru-cell"])
def test_recurrent_layers_through_the_trainer(layer):
    """torch.export decomposes them into matmuls, sigmoid, tanh, split and cat: all have rules."""
    torch.manual_seed(0)
    model, x = _Recurrent(layer()), torch.randn(3, 2, 4)
    weights = random_weights(model(x))
    ref = autograd_gradients(copy.deepcopy(model), (x,), weights)
    trainer = pe.compile(model, weighted_sum, ((x,), weights), scheme=pe.Scheme.full())
    _check(trainer.gradients(((x,), weights)), ref)


def test_det_gradient_at_a_singular_matrix_is_the_cofactor_matrix():
    """At a rank n-1 matrix the gradient of det is the (nonzero) cofactor matrix, which det A A^-T cannot give.
    fp32 autograd returns zeros there (its singular branch), so the reference is float64 autograd."""
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    a[1] = 2 * a[0]  # rank 2, and a determinant exactly 0 in float
    model = OpModule([a], fn=torch.linalg.det)
    grads, ops = engine_gradients(model, (), (torch.ones(()),))
    assert aten._linalg_det.default in ops
    exact = a.double().requires_grad_()
    torch.linalg.det(exact).backward()
    assert exact.grad.abs().max() > 1  # the cofactors of the two independent rows
    assert rel_err(grads["x0"].double(), exact.grad) <= TOL
