"""Gradient parity with torch.autograd on the real pretrained models, full fine-tuning, train and eval mode."""

import copy

import pytest
import torch

import pockengine as pe
from pockengine.models import minilm_classifier, mobilenet_v2, smollm2

TOL = 1e-4  # relative (max abs error / max abs reference gradient), fp32
NOISE = 1e-6  # gradients below this fraction of the model's largest entry are rounding noise on both sides


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def check_parity(model, loss_fn, batch):
    ref = copy.deepcopy(model)
    trainer = pe.compile(model, loss_fn, batch)
    grads = trainer.gradients(batch)
    inputs, target = batch
    out = ref(**inputs) if isinstance(inputs, dict) else ref(*inputs)
    loss_fn(out, target).backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    names = {n for n, _ in ref.named_parameters()}
    assert set(grads) == names
    for name, p in ref.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        err = (grads[name] - expected).abs().max().item()
        assert err <= TOL * max(expected.abs().max().item(), NOISE * scale), name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mobilenet_v2(mode):
    model = no_dropout(mobilenet_v2(pretrained=True, num_classes=10))
    getattr(model, mode)()
    g = torch.Generator().manual_seed(0)
    batch = ((torch.randn(2, 3, 64, 64, generator=g),), torch.tensor([3, 7]))
    check_parity(model, pe.losses.cross_entropy(), batch)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_minilm_classifier(mode):
    model, tokenizer = minilm_classifier(num_labels=2)
    getattr(no_dropout(model), mode)()
    enc = tokenizer(["a gripping, well acted film", "dull and far too long"], padding="max_length",
                    max_length=16, truncation=True, return_tensors="pt")
    batch = (dict(enc), torch.tensor([1, 0]))
    check_parity(model, pe.losses.cross_entropy(), batch)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_smollm2_short_sequence(mode):
    model, tokenizer = smollm2(max_layers=2)
    getattr(no_dropout(model), mode)()
    ids = tokenizer(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    check_parity(model, pe.losses.causal_lm(), ({"input_ids": ids}, ids))


def test_smollm2_all_30_layers():
    model, tokenizer = smollm2()
    model.eval()
    ids = tokenizer(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    check_parity(model, pe.losses.causal_lm(), ({"input_ids": ids}, ids))
