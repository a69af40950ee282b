"""Fold frozen BatchNorm into the convolution before it.

`bn(conv(x, W, b))` with frozen statistics is `conv(x, W * s, (b - mean) * s + beta)` where
`s = gamma / sqrt(var + eps)`. When W and gamma are not trained this removes the normalization from both the
forward and the backward pass, and the backward keeps nothing of the convolution's output. beta may be trained:
its gradient flows through the folded bias. The folded weight is recomputed each step (a few element-wise ops on
the weights), so it always follows the model's current parameters. The replaced nodes are left for dead-code elimination.
"""

from __future__ import annotations

import operator

import torch

from pockengine.ir.graph import Graph, Node

aten = torch.ops.aten


def fold_frozen_batchnorm(graph: Graph, trained: set[Node]) -> Graph:
    users = graph.users()
    for bn in [n for n in graph.nodes if n.target is aten._native_batch_norm_legit_no_training.default]:
        conv, gamma, beta, mean, var, _momentum, eps = bn.args
        if conv.target is not aten.convolution.default or len(users[conv]) != 1 or conv.args[6]:
            continue  # not a (non-transposed) convolution feeding only this BatchNorm
        weight, bias = conv.args[1], conv.args[2]
        if weight in trained or gamma in trained or gamma is None:
            continue  # folding would make the weight's or gamma's gradient need the convolution's input
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

