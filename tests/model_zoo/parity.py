"""Gradient parity against torch.autograd, shared by the parity tests and the model zoo.

A gradient passes when

    rel_err = max|g - g_ref| / max(max|g_ref|, TINY) <= TOL = 1e-4 (fp32),

or, where the fp32 reference itself is further than that from the float64 gradient (a gradient summed with heavy
cancellation, such as a BatchNorm scale's), when pockengine's distance from the float64 one is at most ROUNDING = 2
times the fp32 reference's: the reference is one sample of float32 rounding, and a program that sums in another
order (channels-last kernels, a matmul instead of a convolution) is as likely to land 1.2x further as 1.2x closer;
a wrong formula lands orders of magnitude further. A gradient that is 0 in exact arithmetic (the attention key
bias: softmax ignores a shift shared by all keys) comes out as rounding noise on both sides: below NOISE times the
model's largest gradient entry it counts as 0, and pockengine's must then be as small.

Where the fp32 reference is more than ILL_CONDITIONED = 10% from float64 on some parameter, fp32 arithmetic keeps
no significant digit of that gradient (LeViT in train mode at batch 2: batch norm over 2 rows amplifies rounding
until the gradients reach 1e23), so no fp32 program can be checked against it: `ill_conditioned` says so, and the
model zoo reports such a cell as its own status instead of pass or fail.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

TOL = 1e-4
TINY = 1e-12
NOISE = 1e-6
ROUNDING = 2
ILL_CONDITIONED = 0.1

Gradients = dict[str, torch.Tensor]


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g - ref).abs().max() / ref.abs().max().clamp_min(TINY)).item()


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def autograd_gradients(model: nn.Module, loss_fn: Callable, batch: tuple) -> tuple[float, Gradients]:
    """The loss and torch.autograd's gradient of every parameter (0 for one the loss does not depend on), those
    with requires_grad off included (changes `model`): pockengine's schemes pick parameters by name alone."""
    names, params = zip(*model.named_parameters())
    for p in params:
        p.requires_grad_(True)
    loss = loss_fn(call(model, batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def float64_gradients(model: nn.Module, loss_fn: Callable, batch: tuple) -> Gradients:
    """torch.autograd's gradients of the same model and batch computed in float64."""
    model = copy.deepcopy(model).double()
    inputs = tree_map(lambda t: t.double() if torch.is_floating_point(t) else t, batch[0])
    return autograd_gradients(model, loss_fn, (inputs, batch[1]))[1]


def gradient_errors(grads: Gradients, ref: Gradients, exact: Callable[[], Gradients],
                    masks: dict[str, torch.Tensor | None] | None = None,
                    other_refs: tuple[Gradients, ...] = ()) -> list[str]:
    """What is wrong with `grads` (pockengine's, for the parameters it names) against the fp32 autograd `ref` of
    every parameter; `exact()` gives the float64 gradients, asked for only when needed. A parameter trained on some
    channels only has a boolean mask in `masks`: its gradient must be the reference's there and exactly 0 elsewhere.
    `other_refs`: fp32 autograd of the same model run another way PyTorch supports (channels-last layout): the
    distance from float64 allowed is twice the furthest reference's, fp32 autograd's own rounding being the bar."""
    masks = masks or {}
    noise = NOISE * max(r.abs().max().item() for r in ref.values())
    float64: Gradients | None = None
    bad = []
    for n, g in grads.items():
        r, mask = ref[n], masks.get(n)
        if g.shape != r.shape or g.dtype != r.dtype:
            bad.append(f"{n}: {g.dtype}{list(g.shape)}, expected {r.dtype}{list(r.shape)}")
            continue
        if mask is not None:
            r = r * mask
            if g[~mask].abs().max() != 0:
                bad.append(f"{n}: nonzero outside the selected channels")
        if r.abs().max() <= noise:
            if g.abs().max() > noise:
                bad.append(f"{n}: {g.abs().max().item():.2e} where autograd has ~0")
        elif (err := rel_err(g, r)) > TOL:
            float64 = float64 or exact()
            e = float64[n] if mask is None else float64[n] * mask
            ours = rel_err(g.double(), e)
            reference = max(rel_err((o[n] if mask is None else o[n] * mask).double(), e) for o in (ref, *other_refs))
            if not ours <= max(TOL, ROUNDING * reference):  # a NaN fails too
                bad.append(f"{n}: relative error {err:.2e} (from float64: ours {ours:.2e}, fp32 autograd's "
                           f"{reference:.2e})")
    return bad


def ill_conditioned(ref: Gradients, exact: Callable[[], Gradients]) -> str | None:
    """Why fp32 gradients of this model cannot be checked (see the module docstring), or None when they can."""
    float64 = exact()
    scale = max(g.abs().max().item() for g in float64.values())
    # a gradient that is 0 in exact arithmetic is all rounding in fp32, which says nothing of the others
    worst = max((rel_err(ref[n].double(), g) for n, g in float64.items() if g.abs().max() > NOISE * scale),
                default=0.0)
    if not worst > ILL_CONDITIONED:
        return None
    return (f"fp32 autograd is up to {worst:.2e} from float64 (relative; the largest float64 gradient entry is "
            f"{scale:.1e}), so fp32 keeps no significant digit of some gradients")
