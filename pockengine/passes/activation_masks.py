"""Keep a compact mask instead of the activation for ReLU-like backward ops.

The backward of ReLU, ReLU6 and hardtanh only asks, per element, whether the input was inside the linear range.
When the saved activation is wanted by nothing else in the backward pass, this pass computes that mask in the
forward pass right after the activation and saves it instead: one byte per element (`bool`) or one bit (`bits`,
packed eight to a byte), against four for the fp32 activation.
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph, Node

aten = torch.ops.aten
MASK_ACTIVATION_OPS = (aten.threshold_backward.default, aten.hardtanh_backward.default)
MODES = ("bits", "bool", "off")


def _pack(at, mask: Node, shifts: Node, order: list[int]) -> Node:
    """Eight booleans per byte: bit k of byte i is element 8i+k of the mask, its dimensions taken in `order` (the
    order they lie in memory, so that flattening is a view, not a copy)."""
    flat = at(aten.view.dtype, at(aten.reshape.default, at(aten.permute.default, mask, order), [-1]), torch.uint8)
    pad = -mask.meta.numel % 8
    if pad:
        flat = at(aten.constant_pad_nd.default, flat, [0, pad], 0)
    rows = at(aten.view.default, flat, [-1, 8])
    return at(aten.sum.dim_IntList, at(aten.bitwise_left_shift.Tensor, rows, shifts), [1], dtype=torch.uint8)


def _unpack(at, packed: Node, shifts: Node, shape: tuple[int, ...], numel: int, order: list[int]) -> Node:
    bits = at(aten.bitwise_right_shift.Tensor, at(aten.unsqueeze.default, packed, 1), shifts)
    flat = at(aten.view.dtype, at(aten.reshape.default, at(aten.bitwise_and.Scalar, bits, 1), [-1]), torch.bool)
    if flat.meta.numel != numel:
        flat = at(aten.slice.Tensor, flat, 0, 0, numel)
    stored = at(aten.view.default, flat, [shape[d] for d in order])
    return at(aten.permute.default, stored, [order.index(d) for d in range(len(order))])


def compact_activation_masks(graph: Graph, mode: str = "bits", channels_last: bool = False) -> Graph:
    """Replace ReLU-like backward ops by masks; `channels_last` says 4-d activations lie in NHWC order."""
    if mode not in MODES:
        raise ValueError(f"activation mask mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return graph
    weights = None
    users = graph.users()
    late = ("backward", "update")
    for saved in [n for n in graph.nodes if n.section not in late]:
        readers = [u for u in users[saved] if u.section in late]
        if not readers or any(u.target not in MASK_ACTIVATION_OPS or u.args[1] is not saved
                              or (u.target, u.args[2:]) != (readers[0].target, readers[0].args[2:])
                              for u in readers):
            continue  # kept for another reason anyway: a mask would only add memory
        first = readers[0]
        fwd = graph.emitter(saved, saved.module, saved.section)
        # Both ops zero the gradient unless lo < x < hi (ReLU: unless out > threshold).
        if first.target is aten.threshold_backward.default:
            drop = fwd(aten.le.Scalar, saved, first.args[2])
        else:
            drop = fwd(aten.logical_or.default, fwd(aten.le.Scalar, saved, first.args[2]),
                       fwd(aten.ge.Scalar, saved, first.args[3]))
        if mode == "bits" and weights is None:
            weights = graph.constant("bit_shifts", torch.arange(8, dtype=torch.uint8))
        ndim = len(saved.meta.shape)
        order = [0, 2, 3, 1] if channels_last and ndim == 4 else list(range(ndim))
        stored = _pack(fwd, drop, weights, order) if mode == "bits" else drop
        for reader in readers:
            bwd = graph.emitter(graph.nodes[graph.nodes.index(reader) - 1], reader.module, reader.section)
            mask = (_unpack(bwd, stored, weights, saved.meta.shape, saved.meta.numel, order) if mode == "bits"
                    else stored)
            graph.replace_all_uses(reader, bwd(aten.masked_fill.Scalar, reader.args[0], mask, 0.0))
    return graph
