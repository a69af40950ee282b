"""Patterns of Hugging Face heads trained on the loss they compute from labels in their inputs (issue #11's
screening, docs/coverage.md), where they are not in tests/test_capture.py: layer drop asked twice per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pockengine as pe

from model_zoo.parity import autograd_gradients, gradient_errors


def _sum(output: torch.Tensor, target: object) -> torch.Tensor:
    return output.sum()


class _DecoderStack(nn.Module):
    """NLLB-MoE's and SpeechT5's decoders: each layer skipped at random, the condition asked again after the layer
    (`if skip_the_layer: continue`)."""

    def __init__(self, layerdrop: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
        self.layerdrop = layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            skip_the_layer = False
            if self.training and self.layerdrop > 0.0:
                dropout_probability = torch.rand([])
                skip_the_layer = dropout_probability < self.layerdrop
            if not skip_the_layer:
                x = layer(x)
            if skip_the_layer:
                continue
        return x


def test_layer_drop_asked_again_after_its_layer_matches_eager_pytorch():
    """Never skipped (a rate too small to draw under): the program against eager autograd; always skipped: the
    input passed on, no gradient."""
    batch = ((torch.randn(2, 4),), None)
    model = _DecoderStack(1e-9).train()
    ref = autograd_gradients(model, _sum, batch)[1]
    grads = pe.compile(model, _sum, batch).gradients(batch)
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    trainer = pe.compile(_DecoderStack(1.0).train(), _sum, batch)
    assert trainer.loss(batch) == pytest.approx(batch[0][0].sum().item(), rel=1e-6)
    assert all(not g.any() for g in trainer.gradients(batch).values())


def test_layer_drop_asked_again_after_its_layer_skips_each_layer_with_its_probability():
    model = _DecoderStack(0.5).train()
    batch = ((torch.randn(2, 4),), None)
    trainer = pe.compile(model, _sum, batch, optimizer=pe.optim.SGD(lr=0.0), seed=0)
    kept = [sum(bool(g.abs().sum() > 0) for n, g in trainer.gradients(batch).items() if n.endswith("bias"))
            for _ in range(200)]
    assert abs(sum(kept) / (3 * len(kept)) - 0.5) < 0.07
