"""Train-mode batch norm in channels-last layout as precise as eager PyTorch's: `pockengine::batch_norm` (with
running statistics, and its `no_stats` overload) and `pockengine::batch_norm_backward`, with the schemas and the
results of ATen's `_native_batch_norm_legit_functional`, `_native_batch_norm_legit.no_stats` and
`native_batch_norm_backward`; the layout pass puts them in place of those in train mode (batch statistics).

Why: ATen's channels-last CPU kernels sum a batch norm's statistics and its backward's per-channel sums element by
element in float, while the contiguous kernels eager autograd runs sum in double; over many rows (8x64x64) that puts
the statistics 100x further from float64, and through a network, gradients further from float64 autograd's than
fp32 autograd's are (Hugging Face's MobileNetV2 and SwiftFormer in train mode from their default configs). Where a
channel's statistics come from a few values (a 1x1 feature map at batch 2) the backward's
`dy - mean(dy) - (x - mean) k` cancels almost entirely, and float element-wise arithmetic, the contiguous kernels'
too, leaves mostly rounding.

On the CPU, for float32 tensors whose channels are the innermost dimension, the C kernels of batch_norm.c run: every
sum in double, the element-wise parts in double from the float inputs, the rows split over torch's thread count.
Elsewhere (other devices, dtypes and layouts, `POCKENGINE_NATIVE=0`, no C compiler) the ATen op runs, which is what
Inductor and the ONNX export see too (`ATEN_EQUIVALENTS`).
"""

from __future__ import annotations

import torch

from pockengine.kernels import native

aten = torch.ops.aten

_LIBRARY = torch.library.Library("pockengine", "FRAGMENT")
# ATen's schemas, argument for argument.
_LIBRARY.define("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
                "bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIBRARY.define("batch_norm.no_stats(Tensor input, Tensor? weight, Tensor? bias, bool training, float momentum, "
                "float eps) -> (Tensor, Tensor, Tensor)")
_LIBRARY.define("batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? running_mean, "
                "Tensor? running_var, Tensor? save_mean, Tensor? save_invstd, bool train, float eps, "
                "bool[3] output_mask) -> (Tensor, Tensor, Tensor)")

MIN_ELEMENTS_PER_THREAD = 131072  # below this a thread costs more to start than it saves


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (batch, channels, ...) as the (rows x channels) matrix it is in memory, channels innermost; a view."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _native(x: torch.Tensor, training: bool) -> bool:
    return (training and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0
            and x.movedim(1, -1).is_contiguous() and native.library() is not None)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _parts(x: torch.Tensor) -> int:
    return max(1, min(torch.get_num_threads(), x.numel() // MIN_ELEMENTS_PER_THREAD))


def _float_params(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(torch.float32).contiguous() for t in ts]


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float
             ) -> tuple[torch.Tensor, ...]:
    channels = x.shape[1]
    weight, bias, running_mean, running_var = _float_params(weight, bias, running_mean, running_var)
    out = torch.empty_like(x)  # x's strides: channels innermost too
    mean, invstd = x.new_empty(channels), x.new_empty(channels)
    new_mean = None if running_mean is None else torch.empty_like(running_mean)
    new_var = None if running_var is None else torch.empty_like(running_var)
    rows = _rows(x)
    status = native.library().pockengine_batch_norm_f32(
        rows.data_ptr(), rows.shape[0], channels, _pointer(weight), _pointer(bias), _pointer(running_mean),
        _pointer(running_var), momentum, eps, _parts(x), out.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
        _pointer(new_mean), _pointer(new_var))
    if status != 0:
        raise MemoryError(f"pockengine::batch_norm: no memory for the per-thread sums of {channels} channels")
    return out, mean, invstd, new_mean, new_var


def batch_norm(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float, eps: float
               ) -> tuple[torch.Tensor, ...]:
    if not _native(input, training):
        return aten._native_batch_norm_legit_functional.default(input, weight, bias, running_mean, running_var,
                                                                training, momentum, eps)
    out, mean, invstd, new_mean, new_var = _forward(input, weight, bias, running_mean, running_var, momentum, eps)
    return out, mean, invstd, new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def batch_norm_no_stats(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        training: bool, momentum: float, eps: float) -> tuple[torch.Tensor, ...]:
    if not _native(input, training):
        return aten._native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps)
    return _forward(input, weight, bias, None, None, momentum, eps)[:3]


def batch_norm_backward(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        save_mean: torch.Tensor | None, save_invstd: torch.Tensor | None, train: bool, eps: float,
                        output_mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    if not (_native(input, train) and grad_out.dtype == torch.float32):
        return aten.native_batch_norm_backward.default(grad_out, input, weight, running_mean, running_var,
                                                       save_mean, save_invstd, train, eps, output_mask)
    channels = input.shape[1]
    if not grad_out.movedim(1, -1).is_contiguous():  # laid out like the input, as ATen's kernel does
        grad_out = grad_out.movedim(1, -1).contiguous().movedim(-1, 1)
    float_weight, mean, invstd = _float_params(weight, save_mean, save_invstd)
    grads = [torch.empty_like(input) if output_mask[0] else None,
             input.new_empty(channels) if output_mask[1] else None,
             input.new_empty(channels) if output_mask[2] else None]
    rows = _rows(input)
    status = native.library().pockengine_batch_norm_backward_f32(
        _rows(grad_out).data_ptr(), rows.data_ptr(), rows.shape[0], channels, _pointer(float_weight),
        mean.data_ptr(), invstd.data_ptr(), eps, _parts(input), *map(_pointer, grads))
    if status != 0:
        raise MemoryError(f"pockengine::batch_norm_backward: no memory for the per-thread sums of {channels} channels")
    if weight is not None and grads[1] is not None:
        grads[1] = grads[1].to(weight.dtype)
    if weight is not None and grads[2] is not None:
        grads[2] = grads[2].to(weight.dtype)
    return tuple(grads)


_LIBRARY.impl("batch_norm", batch_norm, "CompositeExplicitAutograd")
_LIBRARY.impl("batch_norm.no_stats", batch_norm_no_stats, "CompositeExplicitAutograd")
_LIBRARY.impl("batch_norm_backward", batch_norm_backward, "CompositeExplicitAutograd")

BATCH_NORM = torch.ops.pockengine.batch_norm.default
BATCH_NORM_NO_STATS = torch.ops.pockengine.batch_norm.no_stats
BATCH_NORM_BACKWARD = torch.ops.pockengine.batch_norm_backward.default

# Each op's ATen op: same arguments, same results up to rounding (its fallback; what Inductor compiles and the ONNX
# export translates).
ATEN_EQUIVALENTS = {BATCH_NORM: aten._native_batch_norm_legit_functional.default,
                    BATCH_NORM_NO_STATS: aten._native_batch_norm_legit.no_stats,
                    BATCH_NORM_BACKWARD: aten.native_batch_norm_backward.default}
# The ATen ops in train mode -> the precise ones (the layout pass's rewrite).
PRECISE = {aten_op: op for op, aten_op in ATEN_EQUIVALENTS.items()}


def _register_fakes() -> None:
    for op, aten_op in ATEN_EQUIVALENTS.items():
        torch.library.register_fake(op)(lambda *args, aten_op=aten_op: aten_op(*args))


_register_fakes()
