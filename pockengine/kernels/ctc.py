"""CTC loss with lengths given as tensors, as one op: `pockengine::ctc_loss` and its backward.

ATen's `_ctc_loss.Tensor` returns, beside the loss, the forward variables `log_alpha`, whose size is the longest
target length: a size read from the lengths' values, which torch.export cannot trace (DynamicOutputShapeException),
so `F.ctc_loss(log_probs, targets, input_lengths, target_lengths)` with tensor lengths, the way `nn.CTCLoss` is used,
could not be captured. This op returns only the loss (its shape is known: one per sequence, or one number), and its
backward runs `_ctc_loss` again and `_ctc_loss_backward`, autograd's own derivative of it (derivatives.yaml), with the
reduction's scaling: `mean` divides each sequence's loss by its target length (at least 1) and averages over the
batch, `sum` adds. Recomputing the forward variables costs one more pass of the dynamic program over
(time x target length) per sequence, small beside the network that produced `log_probs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten


@torch.library.custom_op("pockengine::ctc_loss", mutates_args=())
def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int, reduction: str, zero_infinity: bool) -> torch.Tensor:
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)


@ctc_loss.register_fake
def _(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor,
      blank: int, reduction: str, zero_infinity: bool) -> torch.Tensor:
    return log_probs.new_empty((log_probs.shape[1],) if reduction == "none" else ())


@torch.library.custom_op("pockengine::ctc_loss_backward", mutates_args=())
def ctc_loss_backward(grad: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor,
                      input_lengths: torch.Tensor, target_lengths: torch.Tensor, blank: int, reduction: str,
                      zero_infinity: bool) -> torch.Tensor:
    """The gradient of `ctc_loss` with respect to `log_probs`, given the loss's gradient `grad`."""
    nll, log_alpha = aten._ctc_loss.Tensor(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)
    if reduction == "mean":
        grad_nll = grad / target_lengths.clamp(min=1).to(grad.dtype) / nll.shape[0]
    elif reduction == "sum":
        grad_nll = grad.expand_as(nll)
    else:
        grad_nll = grad
    return aten._ctc_loss_backward.Tensor(grad_nll.contiguous(), log_probs, targets, input_lengths, target_lengths,
                                          nll, log_alpha, blank, zero_infinity)


@ctc_loss_backward.register_fake
def _(grad: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
      target_lengths: torch.Tensor, blank: int, reduction: str, zero_infinity: bool) -> torch.Tensor:
    return torch.empty_like(log_probs)


def _save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    return (ctc_loss_backward(grad, *ctx.saved_tensors, *ctx.options),) + (None,) * 6


# torch.autograd differentiates the op as pockengine's rule does, with the same backward op: the exported program
# that contains it stays differentiable by autograd (a reference that runs it, as the model zoo's train-mode check).
ctc_loss.register_autograd(_backward, setup_context=_save)


CTC_LOSS = torch.ops.pockengine.ctc_loss.default
CTC_LOSS_BACKWARD = torch.ops.pockengine.ctc_loss_backward.default
