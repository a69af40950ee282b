"""Run convolutions in channels-last layout.

On CPUs, oneDNN convolutions on the default NCHW layout reorder their input and output to a blocked layout and
back, which costs time and an extra output-sized buffer inside every convolution; in channels-last (NHWC) layout
they run directly, two to four times faster here and without the hidden buffer. Element-wise ops keep the layout
of their input, so it is enough to convert the image batch once at the top of the program (the trainer converts
the convolution weights) and to give the backward pass channels-last gradients where they are first broadcast to
image shape (the backward of a global pooling). Views of activations may not be expressible on the new strides,
so this pass turns `view` into `reshape`, which is the same view when one exists and a copy when not. It runs on
the whole training program, after differentiation.

Train-mode batch norm is the one op whose numerics the layout changes: ATen's channels-last CPU kernels sum its
statistics and its backward's per-channel sums one element after another in float (relative error growing with
batch x height x width: 6e-6 on the mean at 8x64x64, against 4e-8 for the contiguous kernels autograd runs, which
sum in double), and the backward pass amplifies it past fp32 autograd's own error (Hugging Face's MobileNetV2 in
train mode). On the CPU these sums are computed here in double by ATen's reductions, as the contiguous kernels do
(`precise_batch_norms`); the element-wise parts stay channels-last. ATen's cascaded float sum (error growing with
the log of the count) is not enough: MobileNetV2 at 32x32 (batch statistics over 2 values in its last layers)
then still ends up further from float64 than fp32 autograd.
"""

from __future__ import annotations

import operator

import torch

from pockengine.ir.graph import BATCH, Graph, Node
from pockengine.ir.ops import STRICT_VIEWS

aten = torch.ops.aten


def uses_convolution(graph: Graph) -> bool:
    return any(n.target is aten.convolution.default and len(n.meta.shape) == 4 for n in graph.nodes)


def to_channels_last(graph: Graph, device: torch.device) -> Graph:
    if device.type == "cpu":
        precise_batch_norms(graph)
    for x in graph.inputs(BATCH):
        if x.meta.is_float and len(x.meta.shape) == 4:
            converted = graph.call(aten.clone.default, (x,), {"memory_format": torch.channels_last},
                                   after=graph.inputs()[-1])
            graph.replace_all_uses(x, converted)
            converted.args = (x,)
    for n in list(graph.nodes):
        if n.target in STRICT_VIEWS:
            n.target = aten.reshape.default
        elif n.target is aten.expand.default and n.section == "backward" and len(n.meta.shape) == 4:
            dense = graph.call(aten.clone.default, (n,), {"memory_format": torch.channels_last}, after=n,
                               module=n.module, section=n.section)
            graph.replace_all_uses(n, dense)
            dense.args = (n,)
    return graph


# Train-mode batch norms (batch statistics): op -> (its arguments' names, index of the running statistics outputs).
_TRAIN_BATCH_NORMS = {
    aten._native_batch_norm_legit_functional.default: (("x", "w", "b", "running_mean", "running_var", "training",
                                                        "momentum", "eps"), 3),
    aten._batch_norm_with_update_functional.default: (("x", "w", "b", "running_mean", "running_var", "momentum",
                                                       "eps"), 4),
    aten._native_batch_norm_legit.no_stats: (("x", "w", "b", "training", "momentum", "eps"), None),
}


def precise_batch_norms(graph: Graph) -> None:
    """Rewrite each train-mode batch norm over a 4-d tensor, forward and backward, so that its per-channel sums
    accumulate in double (see the module docstring)."""
    for n in list(graph.nodes):
        if n.target in _TRAIN_BATCH_NORMS and len(n.args[0].meta.shape) == 4:
            names, running = _TRAIN_BATCH_NORMS[n.target]
            a = dict(zip(names, n.args))
            if a.get("training", True):
                _precise_forward(graph, n, a, running)
        elif (n.target is aten.native_batch_norm_backward.default and n.args[7]
              and len(n.args[1].meta.shape) == 4):
            _precise_backward(graph, n)


def _channel_sum(emit, t: Node) -> Node:
    """Per-channel sum of a 4-d tensor, accumulated in double (a double result)."""
    return emit(aten.sum.dim_IntList, t, [0, 2, 3], dtype=torch.float64)


def _per_channel(emit, t: Node, dtype: torch.dtype) -> Node:
    """A per-channel vector (double) rounded to `dtype` and shaped to broadcast over a 4-d tensor."""
    return emit(aten.view.default, emit(aten._to_copy.default, t, dtype=dtype), [1, -1, 1, 1])


def _replace_outputs(graph: Graph, node: Node, values: dict[int, Node]) -> None:
    for item in [u for u in graph.nodes if u.target is operator.getitem and u.args[0] is node]:
        if item.args[1] in values:
            graph.replace_all_uses(item, values[item.args[1]])


def _precise_forward(graph: Graph, n: Node, a: dict, running: int | None) -> None:
    """mean = sum(x) / count, var = sum((x - mean)^2) / count with double sums (as ATen's contiguous kernel: the
    centered values in float, their squares summed in double); the output from them by the frozen-statistics
    kernel (element-wise, channels-last); the running statistics updated as ATen does (unbiased variance)."""
    x, dtype = a["x"], a["x"].meta.dtype
    shape = x.meta.shape
    count = shape[0] * shape[2] * shape[3]
    emit = graph.emitter(n, n.module, n.section)
    mean64 = emit(aten.div.Scalar, _channel_sum(emit, x), count)
    mean = emit(aten._to_copy.default, mean64, dtype=dtype)
    centered = emit(aten.sub.Tensor, x, emit(aten.view.default, mean, [1, -1, 1, 1]))
    var64 = emit(aten.div.Scalar, _channel_sum(emit, emit(aten.mul.Tensor, centered, centered)), count)
    var = emit(aten._to_copy.default, var64, dtype=dtype)
    invstd = emit(aten._to_copy.default, emit(aten.rsqrt.default, emit(aten.add.Scalar, var64, a["eps"])),
                  dtype=dtype)
    normalized = emit(aten._native_batch_norm_legit_no_training.default, x, a["w"], a["b"], mean, var,
                      a["momentum"], a["eps"])
    values = {0: graph.getitem(normalized, 0), 1: mean, 2: invstd}
    if running is not None:
        m = a["momentum"]
        unbiased = emit(aten._to_copy.default, emit(aten.mul.Scalar, var64, count / max(count - 1, 1)), dtype=dtype)
        for i, (old, new) in enumerate([(a["running_mean"], mean), (a["running_var"], unbiased)]):
            values[running + i] = emit(aten.add.Tensor, emit(aten.mul.Scalar, old, 1 - m),
                                       emit(aten.mul.Scalar, new, m))
    _replace_outputs(graph, n, values)


def _precise_backward(graph: Graph, n: Node) -> None:
    """native_batch_norm_backward (batch statistics) from double sums, as ATen's contiguous kernel:
    db = sum(g), dw = sum((x - mean) g) invstd, dx = (g - db/count - (x - mean) invstd^2 sum((x - mean) g)/count)
    invstd w."""
    g, x, w, _rm, _rv, mean, invstd, _train, _eps, mask = n.args
    dtype, shape = x.meta.dtype, x.meta.shape
    count = shape[0] * shape[2] * shape[3]
    emit = graph.emitter(n, n.module, n.section)
    channel = [1, -1, 1, 1]
    centered = emit(aten.sub.Tensor, x, emit(aten.view.default, mean, channel))
    grad_sum = _channel_sum(emit, g)
    dot = _channel_sum(emit, emit(aten.mul.Tensor, centered, g))
    invstd64 = emit(aten._to_copy.default, invstd, dtype=torch.float64)
    values = {}
    if mask[0]:
        scale64 = invstd64 if w is None else emit(aten.mul.Tensor, invstd64, w)
        # dx = g * scale + (x - mean) * (-scale invstd^2 dot / count) - scale db / count
        slope = emit(aten.mul.Tensor, scale64, emit(aten.mul.Scalar, emit(aten.mul.Tensor, dot, emit(
            aten.mul.Tensor, invstd64, invstd64)), -1 / count))
        offset = emit(aten.mul.Tensor, scale64, emit(aten.mul.Scalar, grad_sum, -1 / count))
        shifted = emit(aten.addcmul.default, _per_channel(emit, offset, dtype), centered,
                       _per_channel(emit, slope, dtype))
        values[0] = emit(aten.addcmul.default, shifted, g, _per_channel(emit, scale64, dtype))
    if mask[1]:
        values[1] = emit(aten._to_copy.default, emit(aten.mul.Tensor, dot, invstd64), dtype=dtype)
    if mask[2]:
        values[2] = emit(aten._to_copy.default, grad_sum, dtype=dtype)
    _replace_outputs(graph, n, values)
