"""Gradient hooks are refused, by name: the compiled step would run without them.

A hook on a gradient (`tensor.register_hook`, `module.register_full_backward_hook` or `..._pre_hook`, the global
`nn.modules.module.register_module_full_backward_hook`, a parameter's `register_hook` or
`register_post_accumulate_grad_hook`) is Python that autograd calls while it runs the backward pass. pockengine
derives the backward pass at compile time and never runs autograd, so such a hook would be skipped: a tensor hook
that scales a gradient would leave the gradient unscaled, silently. What a hook does to a gradient can be written
as a custom `torch.autograd.Function`, whose own backward pockengine runs (capture/functions.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from pockengine.capture.patched import patched
from pockengine.errors import CaptureError

_INSTEAD = ("pockengine derives the backward pass at compile time and runs no autograd, so the hook would never run. "
            "Remove it, or write what it does to the gradient as a custom torch.autograd.Function (its backward is "
            "part of the compiled program); a hook that only clips or logs gradients can run on "
            "trainer.gradients(batch) instead.")


def refuse_gradient_hooks(model: nn.Module) -> None:
    """A CaptureError naming the first module or parameter of `model` with a gradient hook."""
    if nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks:
        raise CaptureError(f"a global module backward hook is registered (register_module_full_backward_hook); "
                           f"{_INSTEAD}")
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise CaptureError(f"module '{name or '<top level>'}' ({type(module).__name__}) has a backward hook "
                               f"(register_full_backward_hook / register_full_backward_pre_hook); {_INSTEAD}")
    for name, param in model.named_parameters():
        if param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
            raise CaptureError(f"parameter '{name}' has a gradient hook (register_hook / "
                               f"register_post_accumulate_grad_hook); {_INSTEAD}")


def tensor_hooks_refused() -> AbstractContextManager:
    """While tracing, `tensor.register_hook(...)` in the model's forward or the loss is a CaptureError."""
    def register_hook(self: torch.Tensor, hook: Any) -> Any:
        raise CaptureError(f"the model's forward (or loss_fn) registers a gradient hook on a tensor of shape "
                           f"{list(self.shape)} (tensor.register_hook({getattr(hook, '__qualname__', hook)})); "
                           f"{_INSTEAD}")

    return patched(torch.Tensor, "register_hook", register_hook)
