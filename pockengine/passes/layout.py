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
statistics and its backward's per-channel sums in float, the contiguous kernels eager autograd runs in double. Its
forward and backward become pockengine's own (pockengine/kernels/batch_norm.py: the same arguments and results,
C kernels summing in double on the CPU, the ATen op elsewhere).
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import BATCH, Graph, Node
from pockengine.ir.ops import STRICT_VIEWS
from pockengine.kernels.batch_norm import PRECISE

aten = torch.ops.aten


def uses_convolution(graph: Graph) -> bool:
    return any(n.target is aten.convolution.default and len(n.meta.shape) == 4 for n in graph.nodes)


def to_channels_last(graph: Graph) -> Graph:
    for x in graph.inputs(BATCH):
        if x.meta.is_float and len(x.meta.shape) == 4:
            converted = graph.call(aten.clone.default, (x,), {"memory_format": torch.channels_last},
                                   after=graph.inputs()[-1])
            graph.replace_all_uses(x, converted)
            converted.args = (x,)
    for n in list(graph.nodes):
        if n.target in PRECISE and _batch_statistics(n) and len(n.args[0].meta.shape) == 4:
            n.target = PRECISE[n.target]
        elif n.target in STRICT_VIEWS:
            n.target = aten.reshape.default
        elif n.target is aten.expand.default and n.section == "backward" and len(n.meta.shape) == 4:
            dense = graph.call(aten.clone.default, (n,), {"memory_format": torch.channels_last}, after=n,
                               module=n.module, section=n.section)
            graph.replace_all_uses(n, dense)
            dense.args = (n,)
    return graph


def _batch_statistics(n: Node) -> bool:
    """Whether batch norm node `n` (forward or backward) normalizes with the batch's statistics: its `training` or
    `train` argument."""
    names = [a.name for a in n.target._schema.arguments]
    return bool(n.args[names.index("training" if "training" in names else "train")])
