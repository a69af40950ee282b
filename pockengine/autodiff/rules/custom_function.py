"""The VJP of a custom torch.autograd.Function: its own backward (see pockengine/capture/functions.py), traced at
compile time into ATen ops for the call's shapes and for the inputs that need a gradient, and inlined."""

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.capture.export import decompositions
from pockengine.capture.functions import function_call, trace_backward


@register(torch.ops.pockengine.autograd_function.default)
def _function_backward(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    outputs, inputs, saved, _, call = ctx.args
    record = function_call(call)
    needs = [ctx.needs(x) for x in inputs]
    input_grads: list = [None] * len(inputs)
    if any(needs):
        # The cotangent of an output marked non-differentiable never reaches the backward, as in autograd.
        grads = [gi if differentiable else None for gi, differentiable in zip(g, record.differentiable)]
        backward = trace_backward(call, [gi is not None for gi in grads], needs, ctx.node.module, decompositions())
        traced = ctx.inline(backward, [*saved, *(gi for gi in grads if gi is not None)])
        for i, (x, gi) in enumerate(zip(inputs, traced)):
            if gi is not None:  # autograd sums a gradient of a broadcast shape down to the input's, as here
                input_grads[i] = ctx.sum_to(gi, x.meta.shape)
    return [None] * len(outputs), input_grads, [None] * len(saved), None, None
