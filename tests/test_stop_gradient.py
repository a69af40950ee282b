"""Where a model cuts the gradient (`detach()`, a `torch.no_grad()` block or decorated method), pockengine's
gradients are autograd's. Each of these once got gradients through the cut, silently: the decompositions turn
`detach` into `alias`, and a program exported under `no_grad` carries no trace of a `no_grad` block inside it.
Tolerance: `gradient_errors` (fp32 autograd's own rounding, against float64 where they differ)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pockengine as pe
from pockengine.capture.stop_gradient import STOP_GRADIENT
from pockengine.errors import CaptureError

from model_zoo.parity import autograd_gradients, gradient_errors


class _Cut(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 3)
        self.how = how
        self.register_buffer("running", torch.zeros(6))
        if how == "spectral norm":  # its power iteration runs under no_grad, in place on its buffers
            nn.utils.parametrizations.spectral_norm(self.second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.how == "detach":
            h = h * h.detach()  # the gradient of h**2 where one factor is held constant
        elif self.how == "data":
            h = h * h.data + self.first.weight.data.sum()  # the old spelling of detach
        elif self.how == "no_grad block":
            with torch.no_grad():
                scale = h.abs().mean(-1, keepdim=True) + 1  # normalized by a statistic treated as a constant
            h = h / scale
        elif self.how == "inference mode":
            with torch.inference_mode():
                scale = h.abs().mean() + 1
            h = h / scale.clone()  # eager PyTorch saves no inference tensor for the backward pass: a copy
        elif self.how == "decorated":
            h = h * self.gate(h)
        elif self.how == "buffer update":
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * h.mean(0))  # an EMA kept beside the forward pass
            h = h - self.running
        elif self.how == "whole layer":
            with torch.no_grad():
                h = self.first(x)  # a frozen feature extractor inside the forward pass
            h = torch.relu(h)
        return self.second(h)

    @torch.no_grad()
    def gate(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2 * h)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


@pytest.mark.parametrize("how", ["detach", "data", "no_grad block", "inference mode", "decorated", "buffer update",
                                 "whole layer", "spectral norm"])
def test_gradients_stop_where_the_model_cuts_them(how: str):
    torch.manual_seed(0)
    model = _Cut(how)
    batch = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
    ref = autograd_gradients(copy.deepcopy(model), _loss, batch)[1]  # the forward pass changes the buffers
    trainer = pe.compile(model, _loss, batch, scheme=pe.Scheme.full())
    grads = trainer.gradients(batch)
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    if how == "whole layer":  # nothing reaches the first layer: autograd gives it no gradient either
        assert torch.equal(ref["first.weight"], torch.zeros_like(ref["first.weight"]))
    # the cut has done its job once the backward pass exists: the program copies nothing for it
    assert not any(n.target is STOP_GRADIENT for n in trainer.program().graph.nodes)


def test_the_buffer_written_under_no_grad_is_written_as_in_eager():
    torch.manual_seed(0)
    model = _Cut("buffer update")
    batch = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
    eager = _Cut("buffer update")
    eager.load_state_dict(model.state_dict())
    trainer = pe.compile(model, _loss, batch, optimizer=pe.optim.SGD(lr=0.1), scheme=pe.Scheme.full())
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(3):
        trainer.step(batch)
        optimizer.zero_grad()
        _loss(eager(*batch[0]), batch[1]).backward()
        optimizer.step()
    torch.testing.assert_close(model.running, eager.running, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.second.weight, eager.second.weight, rtol=1e-5, atol=1e-6)


def test_a_scheme_training_only_parameters_behind_the_cut_gets_no_gradient():
    """Autograd gives the first layer of `whole layer` no gradient: trained alone, its gradient is zeros and a
    step leaves it as it was."""
    torch.manual_seed(0)
    model = _Cut("whole layer")
    batch = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
    scheme = pe.Scheme("first", [pe.scheme.Rule("first", "full")])
    trainer = pe.compile(model, _loss, batch, optimizer=pe.optim.SGD(lr=0.1), scheme=scheme)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in trainer.gradients(batch).values())
    before = model.first.weight.detach().clone()
    trainer.step(batch)
    assert torch.equal(model.first.weight, before)


class _WritesIntoDetached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        h.detach().clamp_(max=0.5)  # changes h too, behind autograd's back
        return h


def test_a_write_into_a_detached_activation_is_refused():
    """A copy in the detach's place would take the write away from the tensor it aliases: refused by name."""
    with pytest.raises(CaptureError, match=r"writes in place into a detached value.*x\.detach\(\)\.clone\(\)"):
        pe.compile(_WritesIntoDetached(), _loss, ((torch.randn(5, 4),), torch.randint(0, 3, (5,))))


class _BuildsALayerInForward(nn.Module):
    """BigBird at sequences too short for its block-sparse attention: `set_attention_type("original_full")` in the
    forward pass builds new layers (nn.Linear's init: `uniform_` into a detached fresh tensor), then keeps the old
    weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = nn.Linear(4, 3)
        fresh.weight = self.layer.weight
        fresh.bias = self.layer.bias
        return fresh(x)


def test_a_tensor_initialized_in_place_in_forward_is_not_a_write_into_an_activation():
    torch.manual_seed(0)
    model = _BuildsALayerInForward()
    batch = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
    ref = autograd_gradients(copy.deepcopy(model), _loss, batch)[1]
    grads = pe.compile(model, _loss, batch).gradients(batch)
    assert grads.keys() == ref.keys()
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
