"""Fold frozen BatchNorm into the convolution before it.

`bn(conv(x, W, b))` with frozen statistics is `conv(x, W * s, (b - mean) * s + beta)` where
`s = gamma / sqrt(var + eps)`. This removes the normalization from the forward and the backward pass; the
gradients of W, b, gamma and beta flow through the few element-wise ops on the weights that compute the folded
ones, recomputed each step so they always follow the current parameters. It is not done where it would cost
more than it saves or lose precision: a trained gamma would get its gradient from the convolution's weight
gradient (which needs the saved input when W is frozen, and when W is trained sums products that largely cancel,
about 4e-4 relative error on a small ResNet against autograd); and a partially trained W keeps its own
convolution so that only its selected channels are computed. The replaced nodes are left for dead-code elimination.
"""

from __future__ import annotations

import operator

import torch

from pockengine.ir.graph import Graph, Node

aten = torch.ops.aten


def fold_frozen_batchnorm(graph: Graph, trained: set[Node], partial: set[Node] = frozenset()) -> Graph:
    users = graph.users()
    for bn in [n for n in graph.nodes if n.target is aten._native_batch_norm_legit_no_training.default]:
        conv, gamma, beta, mean, var, _momentum, eps = bn.args
        if conv.target is not aten.convolution.default or len(users[conv]) != 1 or conv.args[6]:
            continue  # not a (non-transposed) convolution feeding only this BatchNorm
        weight, bias = conv.args[1], conv.args[2]
        if gamma is None or weight in partial or gamma in trained:
            continue
        outputs = [u for u in users[bn] if u.target is operator.getitem]
        if len(outputs) != len(users[bn]) or any(u.args[1] != 0 for u in outputs):
            continue  # the saved statistics are used: leave it

        at = graph.emitter(conv, bn.module, bn.section)
        scale = at(aten.mul.Tensor, gamma, at(aten.rsqrt.default, at(aten.add.Tensor, var, eps)))
        view = [weight.meta.shape[0]] + [1] * (len(weight.meta.shape) - 1)
        folded_w = at(aten.mul.Tensor, weight, at(aten.view.default, scale, view))
        shift = at(aten.neg.default, mean) if bias is None else at(aten.sub.Tensor, bias, mean)
        folded_b = at(aten.mul.Tensor, shift, scale)
        if beta is not None:
            folded_b = at(aten.add.Tensor, folded_b, beta)
        args = list(conv.args)
        args[1], args[2] = folded_w, folded_b
        folded = at(aten.convolution.default, *args)
        for out in outputs:
            graph.replace_all_uses(out, folded)
    return graph

