"""`pockengine::linear_cross_entropy`: a language model's head and its cross-entropy loss in one op, computed a
chunk of tokens at a time, so the (tokens x vocabulary) logits never exist whole (see
pockengine/passes/fused_cross_entropy.py, which puts it in place of `mm -> log_softmax -> nll_loss`).

    linear_cross_entropy(hidden[N, D], weight[V, D], bias[V]?, target[N], ignore_index, mean, chunk,
                         grad_hidden, grad_weight) -> (loss[], d_hidden, d_weight, d_bias)

`loss` is the cross-entropy of the logits `hidden @ weight.T + bias` against `target` (rows whose target is
`ignore_index` are skipped), the mean over the other rows (`mean`) or their sum. The loss is a scalar: the gradient
of anything computed from it is its derivative times those of the loss, so the op computes them while each chunk's
logits are at hand, and the backward pass only scales them (no logits again): `d_hidden` ([N, D], the size of the
hidden state) when `grad_hidden`, `d_weight` ([V, D], accumulated over the chunks) and `d_bias` when
`grad_weight`; an output not asked for is an empty tensor. The derivative of the loss with respect to a row's
logits is c * (softmax - onehot(target)), c = 1/(rows not ignored) for the mean, 1 for the sum, 0 for an ignored
row. A chunk's logits, their exponentials and that derivative take turns in one (chunk x V) float32 buffer (float64 for a float64 model), which
is all the op allocates besides its outputs (`workspace_bytes`, for the memory plan).

The op is a composition of ATen ops (CompositeImplicitAutograd): it runs on any device and dtype, and the
dispatch-level memory tracker sees the chunk it allocates.
"""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("pockengine", "FRAGMENT")
_LIBRARY.define("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
                "bool mean, int chunk, bool grad_hidden, bool grad_weight) -> (Tensor, Tensor, Tensor, Tensor)")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, ignore_index: int, mean: bool, chunk: int, grad_hidden: bool,
                         grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = hidden.shape[0]
    # Half-precision logits are summed in float32, as F.cross_entropy's CPU kernels do; float64 stays float64.
    compute = _compute_dtype(hidden.dtype)
    kept = target != ignore_index
    safe_target = torch.where(kept, target, 0)
    # Each row's weight in the loss: 1/(rows kept) for the mean (0/0 = NaN when every row is ignored, as
    # PyTorch's mean over no rows), 1 for the sum; 0 for an ignored row.
    scale = kept.to(compute)
    if mean:
        scale = scale / kept.sum()
    total = hidden.new_zeros((), dtype=compute)
    empty = hidden.new_empty(0)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else empty
    d_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if grad_weight else empty
    d_bias = (torch.zeros_like(bias) if grad_weight and bias is not None else empty)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h, t, row_scale = hidden[start:end], safe_target[start:end], scale[start:end].unsqueeze(1)
        logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        # One (chunk x V) buffer, in `compute`, updated in place: logits, then exp(logits - max), then the gradient.
        logits = logits.to(compute)
        picked = logits.gather(1, t.unsqueeze(1))
        top = logits.detach().amax(1, keepdim=True)  # cancels out of the log-sum-exp: autograd needs no path
        # (out of place where torch.autograd differentiates the op itself: never in a program, which runs without)
        exp = (logits - top).exp() if torch.is_grad_enabled() else logits.sub_(top).exp_()
        sums = exp.sum(1, keepdim=True)
        total = total + ((top + sums.log() - picked) * row_scale).sum()  # log-sum-exp - the target's logit
        if grad_hidden or grad_weight:
            # d loss / d logits = scale * (softmax - onehot(target))
            d_logits = exp.mul_(row_scale / sums).scatter_add_(1, t.unsqueeze(1), -row_scale).to(hidden.dtype)
            if grad_hidden:
                torch.mm(d_logits, weight, out=d_hidden[start:end])
            if grad_weight:
                d_weight.addmm_(d_logits.t(), h)
                if bias is not None:
                    d_bias.add_(d_logits.sum(0))
            del d_logits
        del logits, exp  # before the next chunk's logits are allocated
    return total.to(hidden.dtype), d_hidden, d_weight, d_bias


_LIBRARY.impl("linear_cross_entropy", linear_cross_entropy, "CompositeImplicitAutograd")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def workspace_bytes(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                    ignore_index: int, mean: bool, chunk: int, *flags: bool) -> int:
    """What the op allocates besides its outputs, at most: one chunk of logits in the compute dtype (float32, or
    float64 for a float64 model; and the chunk in the weight's dtype beside it, where that differs); the per-row
    vectors that live through the loop (`kept`, `safe_target`, `scale` and its quotient); per chunk, at most eight
    columns in the compute dtype at once (the target's
    logit, the maximum, the sums, their logarithm and the terms of the loss and of the gradient) and the bias's
    chunk gradient; and a few 0-d values."""
    rows, chunk = hidden.shape[0], min(chunk, hidden.shape[0])
    compute = _compute_dtype(hidden.dtype)
    size = compute.itemsize
    logits = chunk * weight.shape[0]
    per_row = rows * (1 + target.element_size() + 2 * size)
    columns = 8 * chunk * size + (0 if bias is None else bias.numel() * bias.element_size())
    return (logits * size + (0 if weight.dtype == compute else logits * weight.element_size()) + per_row + columns
            + 64)

LINEAR_CROSS_ENTROPY = torch.ops.pockengine.linear_cross_entropy.default
