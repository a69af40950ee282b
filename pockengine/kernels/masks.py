"""The two ops of compact activation masks, one bit per element (see pockengine/passes/activation_masks.py):

- `pockengine::pack_keep(x, lo, hi, order)`: where ReLU/hardtanh let the gradient through, as bits: bit k of byte i
  is 1 where lo < element 8i+k of `x` < hi (`hi` None: no upper bound; a NaN is outside), elements taken with
  the dimensions in `order` (the order they lie in memory, so no copy is needed);
- `pockengine::apply_keep_(grad, bits, order)`: zero `grad` in place where the bit is 0.

They replace `hardtanh_backward`/`threshold_backward` with the same results (+0.0 where the gradient is stopped),
from 1/32 of the memory. On CPU float32 tensors dense in `order` they run the C kernels of masks.c (one pass over
the activation or the gradient); elsewhere (other devices and dtypes, no compiler) ATen compositions of the same
arithmetic, on any device.
"""

from __future__ import annotations

import torch

from pockengine.kernels import native

_LIBRARY = torch.library.Library("pockengine", "DEF")
_LIBRARY.define("pack_keep(Tensor x, float lo, float? hi, int[] order) -> Tensor")
_LIBRARY.define("apply_keep_(Tensor(a!) grad, Tensor bits, int[] order) -> Tensor(a!)")

# The ATen compositions pack with two integer multiplies instead of eight shifts: eight 0/1 bytes read as one int64
# times _GATHER carry bit k of byte k into bit 56 + k, so the top byte is the packed byte; unpacking spreads a byte
# into all eight bytes of an int64 (times _SPREAD), keeps bit k in byte k, and turns each nonzero byte into 1 by a
# carry (+_CARRY, then bit 7). Every op works on one int64 per eight elements; the products wrap modulo 2^64, as
# PyTorch's integer kernels do, and only their low bits are used.
_GATHER = 0x0102040810204080  # byte k's lowest bit -> bit 56 + k
_SPREAD = 0x0101010101010101  # one byte -> all eight bytes
_BIT_OF_BYTE = 0x8040201008040201 - 2 ** 64  # bit k of byte k (as a signed int64)
_CARRY = 0x7F7F7F7F7F7F7F7F  # a nonzero byte (at most 0x80) + 0x7F sets its bit 7
_LOW_BITS = 0x0101010101010101


def _native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and native.library() is not None


def pack_keep_aten(x: torch.Tensor, lo: float, hi: float | None, order: list[int]) -> torch.Tensor:
    """`pack_keep` as ATen ops (any device and dtype; what Inductor traces and fuses)."""
    flat = x.permute(order).reshape(-1)
    keep = flat > lo
    if hi is not None:
        keep &= flat < hi
    # `to`, not a `view`, between bool and uint8: the same bytes, and Inductor cannot lower a view of a bool tensor
    # as another dtype on CUDA (torch 2.11: "torch.bool is not supported by torch.iinfo").
    padded = torch.constant_pad_nd(keep.to(torch.uint8), [0, -x.numel() % 8], 0)
    return torch.bitwise_right_shift(padded.view(torch.int64) * _GATHER, 56).to(torch.uint8)


def pack_keep(x: torch.Tensor, lo: float, hi: float | None, order: list[int]) -> torch.Tensor:
    in_order = x.permute(order)
    if x.dtype == torch.float32 and _native_ok(in_order):
        bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        native.library().pockengine_pack_keep_f32(in_order.data_ptr(), x.numel(), lo, hi is not None,
                                                  0.0 if hi is None else hi, bits.data_ptr())
        return bits
    return pack_keep_aten(x, lo, hi, order)


def apply_keep_aten_(grad: torch.Tensor, bits: torch.Tensor, order: list[int]) -> torch.Tensor:
    """`apply_keep_` as ATen ops (any device and dtype; what Inductor traces and fuses)."""
    in_order = grad.permute(order)
    words = bits.to(torch.int64) * _SPREAD
    words = torch.bitwise_and(torch.bitwise_right_shift(torch.bitwise_and(words, _BIT_OF_BYTE) + _CARRY, 7),
                              _LOW_BITS)
    keep = words.view(torch.uint8)[:grad.numel()].view(in_order.shape)  # one byte per element, 0 or 1
    in_order.masked_fill_(keep == 0, 0.0)
    return grad


def apply_keep_(grad: torch.Tensor, bits: torch.Tensor, order: list[int]) -> torch.Tensor:
    in_order = grad.permute(order)
    if grad.dtype == torch.float32 and _native_ok(in_order, bits):
        native.library().pockengine_apply_keep_f32(in_order.data_ptr(), grad.numel(), bits.data_ptr())
        return grad
    return apply_keep_aten_(grad, bits, order)


_LIBRARY.impl("pack_keep", pack_keep, "CompositeExplicitAutograd")
_LIBRARY.impl("apply_keep_", apply_keep_, "CompositeExplicitAutograd")


@torch.library.register_fake("pockengine::pack_keep")
def _pack_keep_shape(x: torch.Tensor, lo: float, hi: float | None, order: list[int]) -> torch.Tensor:
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("pockengine::apply_keep_")
def _apply_keep_shape(grad: torch.Tensor, bits: torch.Tensor, order: list[int]) -> torch.Tensor:
    return grad


PACK_KEEP = torch.ops.pockengine.pack_keep.default
APPLY_KEEP_ = torch.ops.pockengine.apply_keep_.default

# The ops as ATen compositions (pockengine.kernels.ATEN_COMPOSITIONS).
ATEN_COMPOSITIONS = {PACK_KEEP: pack_keep_aten, APPLY_KEEP_: apply_keep_aten_}
