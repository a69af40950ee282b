"""Keep a compact mask instead of the activation for ReLU-like backward ops.

The backward of ReLU, ReLU6 and hardtanh only asks, per element, whether the activation was inside the linear
range. When the saved activation is wanted by nothing else in the backward pass, this pass computes that mask in
the forward pass right after the activation and saves it instead: one byte per element (`bool`) or one bit (`bits`,
packed eight to a byte), against four for the fp32 activation.

The backward multiplies the gradient by the 0/1 mask, in place when nothing else reads the gradient: several times
faster than a select (`masked_fill`) on CPUs, and the mask's bytes are read as `uint8`, which converts several times
faster than `bool`. The multiply converts the mask to the gradient's dtype in a hidden buffer as large as its
operands (below the dispatcher, so outside the memory plan), so it runs on slices of the batch, each with a buffer
that small; where the gradient cannot be overwritten the select is used.

Bits are packed with two integer multiplies instead of eight shifts: eight mask bytes read as one int64 times
0x0102040810204080 carry bit k of byte k into bit 56 + k, so the top byte is the packed byte; unpacking spreads a
byte into all eight bytes of an int64 (times 0x0101010101010101), keeps bit k in byte k, and turns each nonzero
byte into 1 by a carry (+0x7F, then bit 7). Every op works on one int64 per eight elements; the products wrap
modulo 2^64, as PyTorch's integer kernels do, and only their low bits are used.
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph, Node
from pockengine.passes.inplace import VIEWS

aten = torch.ops.aten
MASK_ACTIVATION_OPS = (aten.threshold_backward.default, aten.hardtanh_backward.default)
MODES = ("bits", "bool", "off")

_GATHER = 0x0102040810204080  # byte k's lowest bit -> bit 56 + k
_SPREAD = 0x0101010101010101  # one byte -> all eight bytes
_BIT_OF_BYTE = 0x8040201008040201 - 2 ** 64  # bit k of byte k (as a signed int64)
_CARRY = 0x7F7F7F7F7F7F7F7F  # a nonzero byte (at most 0x80) + 0x7F sets its bit 7
_LOW_BITS = 0x0101010101010101
_PIECES = 8  # slices of the batch for the in-place multiply: its hidden buffer is 1/8 of the gradient


def _pack(at, mask: Node, order: list[int]) -> Node:
    """Eight booleans per byte: bit k of byte i is element 8i+k of the mask, its dimensions taken in `order` (the
    order they lie in memory, so that flattening is a view, not a copy)."""
    flat = at(aten.view.dtype, at(aten.reshape.default, at(aten.permute.default, mask, order), [-1]), torch.uint8)
    pad = -mask.meta.numel % 8
    if pad:
        flat = at(aten.constant_pad_nd.default, flat, [0, pad], 0)
    words = at(aten.view.dtype, flat, torch.int64)
    top = at(aten.bitwise_right_shift.Tensor_Scalar, at(aten.mul.Tensor, words, _GATHER), 56)
    return at(aten._to_copy.default, top, dtype=torch.uint8)


def _unpack(at, packed: Node, shape: tuple[int, ...], numel: int, order: list[int], invert: bool) -> Node:
    """The mask (or its negation) as booleans of `shape`, a view in memory order `order`."""
    words = at(aten.mul.Tensor, at(aten._to_copy.default, packed, dtype=torch.int64), _SPREAD)
    words = at(aten.add.Tensor, at(aten.bitwise_and.Scalar, words, _BIT_OF_BYTE), _CARRY)
    words = at(aten.bitwise_and.Scalar, at(aten.bitwise_right_shift.Tensor_Scalar, words, 7), _LOW_BITS)
    if invert:
        words = at(aten.bitwise_xor.Scalar, words, _LOW_BITS)
    flat = at(aten.view.dtype, words, torch.bool)  # bytes of 0 and 1
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
    users = graph.users()
    outputs = set(graph.outputs.values())
    late = ("backward", "update")
    for saved in [n for n in graph.nodes if n.section not in late]:
        readers = [u for u in users[saved] if u.section in late]
        if not readers or any(u.target not in MASK_ACTIVATION_OPS or u.args[1] is not saved
                              or (u.target, u.args[2:]) != (readers[0].target, readers[0].args[2:])
                              for u in readers):
            continue  # kept for another reason anyway: a mask would only add memory
        first = readers[0]
        fwd = graph.emitter(saved, saved.module, saved.section)
        # Both ops zero the gradient unless lo < x < hi (ReLU: unless x > threshold).
        drop = fwd(aten.le.Scalar, saved, first.args[2])
        if first.target is aten.hardtanh_backward.default:
            drop = fwd(aten.logical_or.default, drop, fwd(aten.ge.Scalar, saved, first.args[3]))
        ndim = len(saved.meta.shape)
        order = [0, 2, 3, 1] if channels_last and ndim == 4 else list(range(ndim))
        stored = _pack(fwd, drop, order) if mode == "bits" else drop
        for reader in readers:
            bwd = graph.emitter(graph.nodes[graph.nodes.index(reader) - 1], reader.module, reader.section)
            g = reader.args[0]
            # g may be overwritten when it is a value of its own that nothing but this op reads
            in_place = (not g.is_input and g.target not in VIEWS and not g.mutates and g not in outputs
                        and users[g] == [reader] and len(g.meta.shape) >= 1)
            if mode == "bits":
                mask = _unpack(bwd, stored, saved.meta.shape, saved.meta.numel, order, invert=in_place)
            else:
                mask = bwd(aten.logical_not.default, stored) if in_place else stored
            if not in_place:
                graph.replace_all_uses(reader, bwd(aten.masked_fill.Scalar, g, mask, 0.0))
                continue
            factor = bwd(aten.view.dtype, mask, torch.uint8)
            size = g.meta.shape[0]
            pieces = min(size, _PIECES)
            for i in range(pieces):
                start, stop = size * i // pieces, size * (i + 1) // pieces
                bwd(aten.mul_.Tensor, bwd(aten.slice.Tensor, g, 0, start, stop),
                    bwd(aten.slice.Tensor, factor, 0, start, stop))
            graph.replace_all_uses(reader, g)
    return graph
