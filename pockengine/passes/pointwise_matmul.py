"""Run 1x1 convolutions as matrix multiplies.

A 1x1 convolution with stride 1 and no padding mixes channels only: it is a matrix multiply of the activation,
read as an (N*H*W) x C_in matrix, by the C_out x C_in weight. In channels-last layout that matrix is the activation's
own memory, so the rewrite is views around one `addmm`/`mm`, and the result is channels-last again. On CPUs the
matrix multiply takes 20-45% less time than oneDNN's convolution for MobileNetV2's pointwise layers (fp32, 2
threads, batch 1 to 8), forward and backward alike: the backward pass carries the gradient to the input through a
transposed 1x1 convolution, which is the multiply by the weight itself. The weight gradient (`convolution_backward`,
for trained weights, whole or a slice of their channels) is the product of the transposed output gradient and the
input, both read as matrices: 1.4-5x faster than oneDNN's backward at MobileNetV2's late layers. Run last, on the
finished program, when activations are channels-last (in NCHW layout the views would be copies).
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph, Node

aten = torch.ops.aten


def _is_pointwise(x: Node, w: Node, stride, padding, dilation, output_padding, groups) -> bool:
    return (len(x.meta.shape) == 4 and tuple(w.meta.shape[2:]) == (1, 1) and list(stride) == [1, 1]
            and list(padding) == [0, 0] and list(dilation) == [1, 1] and list(output_padding) == [0, 0]
            and groups == 1 and x.meta.is_float)


def _rows(at, x: Node) -> Node:
    """The NCHW (channels-last) activation `x` as its (N*H*W) x C matrix: a view."""
    return at(aten.reshape.default, at(aten.permute.default, x, [0, 2, 3, 1]), [-1, x.meta.shape[1]])


def _weight_matrix(at, w: Node) -> Node:
    """The 1x1 convolution weight [A, B, 1, 1] as its A x B matrix: a view."""
    return at(aten.reshape.default, w, list(w.meta.shape[:2]))


def _become_nchw_view(at, node: Node, rows: Node, shape: tuple[int, ...]) -> None:
    """Turn `node` into the NCHW view of the matrix `rows` (same shape as before): its users need no rewiring."""
    batch, channels, height, width = shape
    node.target, node.kwargs = aten.permute.default, {}
    node.args = (at(aten.reshape.default, rows, [batch, height, width, channels]), [0, 3, 1, 2])


def pointwise_convolutions_as_matmul(graph: Graph) -> Graph:
    users = graph.users()

    def before(n: Node):
        return graph.emitter(graph.nodes[graph.nodes.index(n) - 1], n.module, n.section)

    for n in list(graph.nodes):
        if n.target is aten.convolution.default and _is_pointwise(n.args[0], n.args[1], *n.args[3:6], *n.args[7:]):
            at = before(n)
            x, w, bias, *_, transposed, _, _ = n.args
            # weight: [C_out, C_in, 1, 1] for a convolution, [C_in, C_out, 1, 1] for a transposed one
            matrix = _weight_matrix(at, w)
            if not transposed:
                matrix = at(aten.permute.default, matrix, [1, 0])
            rows = _rows(at, x)
            product = at(aten.mm.default, rows, matrix) if bias is None else at(aten.addmm.default, bias, rows, matrix)
            _become_nchw_view(at, n, product, n.meta.shape)
        elif n.target is aten.convolution_backward.default and not n.args[7] and not n.args[10][2] \
                and _is_pointwise(n.args[1], n.args[2], *n.args[4:7], *n.args[8:10]):
            at = before(n)
            g, x, w = n.args[:3]
            grad_rows = _rows(at, g)
            for item in users[n]:  # getitem 0: the input's gradient, 1: the weight's
                if item.args[1] == 0:
                    product = at(aten.mm.default, grad_rows, _weight_matrix(at, w))
                    _become_nchw_view(at, item, product, x.meta.shape)
                else:
                    product = at(aten.mm.default, at(aten.permute.default, grad_rows, [1, 0]), _rows(at, x))
                    item.target, item.args = aten.reshape.default, (product, list(w.meta.shape))
            graph.nodes.remove(n)
    return graph
