"""Gradient hooks are refused by name: pockengine's compiled backward pass runs no autograd, so a hook would be
skipped. A tensor hook halving a gradient once compiled and trained with the gradient unhalved, silently."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pockengine as pe
from pockengine.errors import CaptureError


class _Hooked(nn.Module):
    def __init__(self, hook: str) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)
        self.hook = hook
        if hook == "module":
            self.second.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.5,))
        elif hook == "module pre":
            self.second.register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 0.5,))
        elif hook == "parameter":
            self.first.weight.register_hook(lambda g: g.clamp(-0.1, 0.1))
        elif hook == "post accumulate":
            self.first.bias.register_post_accumulate_grad_hook(lambda p: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.hook == "tensor":
            h.register_hook(lambda g: g * 0.5)
        return self.second(h)


BATCH = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
NAMED = {"module": "module 'second' (Linear)", "module pre": "module 'second' (Linear)",
         "parameter": "parameter 'first.weight'", "post accumulate": "parameter 'first.bias'",
         "tensor": "registers a gradient hook on a tensor of shape [5, 4]"}


@pytest.mark.parametrize("hook", list(NAMED))
def test_a_gradient_hook_is_refused_by_name(hook: str):
    with pytest.raises(CaptureError, match=re.escape(NAMED[hook]) + ".*would never run.*torch.autograd.Function"):
        pe.compile(_Hooked(hook), nn.functional.cross_entropy, BATCH)


def test_tensor_hooks_work_again_after_a_capture():
    with pytest.raises(CaptureError):
        pe.compile(_Hooked("tensor"), nn.functional.cross_entropy, BATCH)
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda g: g * 3)
    x.sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))


def test_a_global_backward_hook_is_refused():
    handle = nn.modules.module.register_module_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        with pytest.raises(CaptureError, match="global module backward hook"):
            pe.compile(_Hooked("none"), nn.functional.cross_entropy, BATCH)
    finally:
        handle.remove()


def test_a_hook_added_after_a_cached_capture_is_refused(monkeypatch, tmp_path):
    """The capture cache keys a parameter by its metadata, not its hooks: a hook registered on a parameter of a
    model whose capture is cached is refused all the same."""
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    model = _Hooked("none")
    pe.compile(model, nn.functional.cross_entropy, BATCH, capture_cache=True)
    model.first.weight.register_hook(lambda g: g * 0)
    with pytest.raises(CaptureError, match="parameter 'first.weight' has a gradient hook"):
        pe.compile(model, nn.functional.cross_entropy, BATCH, capture_cache=True)
