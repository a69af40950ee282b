"""VJP rule of pockengine's fused language-model head and loss (pockengine/kernels/cross_entropy.py)."""

import operator

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.ir.graph import Node
from pockengine.kernels import LINEAR_CROSS_ENTROPY

aten = torch.ops.aten


@register(LINEAR_CROSS_ENTROPY)
def linear_cross_entropy(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The op's forward pass computed the loss's gradients with respect to the hidden state, the weight and the
    bias (the pass that puts it in the program asks for those the backward needs): they only get scaled by the
    loss's cotangent (not at all when it is the seed, ones). Where the forward was not asked for one, the op runs
    again in the backward pass, with the same chunks."""
    hidden, weight, bias, target, ignore_index, mean, chunk, grad_hidden, grad_weight = ctx.args
    want_hidden, want_weight = ctx.needs(hidden), ctx.needs(weight) or ctx.needs(bias)
    if (want_hidden and not grad_hidden) or (want_weight and not grad_weight):
        source = ctx(LINEAR_CROSS_ENTROPY, hidden, weight, bias, target, ignore_index, mean, chunk, want_hidden,
                     want_weight)
        output = lambda i: ctx(operator.getitem, source, i)  # noqa: E731
    else:
        output = lambda i: ctx.graph.getitem(ctx.node, i)  # noqa: E731
    seed = g[0]

    def scaled(i: int) -> Node:
        d = output(i)
        return d if seed.target is aten.ones_like.default else ctx(aten.mul.Tensor, d, seed)

    return (scaled(1) if want_hidden else None, scaled(2) if ctx.needs(weight) else None,
            scaled(3) if ctx.needs(bias) else None) + (None,) * 6
