"""Gradient parity with torch.autograd on the real pretrained models, full fine-tuning, train and eval mode.

The text models load with the library's default attention (scaled_dot_product_attention), as their users load them;
MiniLM is also checked bias-only."""

import copy
import functools

import pytest
import torch

import pockengine as pe
from model_zoo.parity import float64_gradients
from pockengine.models import minilm_classifier, mobilenet_v2, smollm2

pytestmark = pytest.mark.slow  # real pretrained models, up to SmolLM2's 30 layers

TOL = 1e-4  # relative (max abs error / max abs reference gradient), fp32; a gradient further off passes only if
# it is at least as close to float64 autograd's as fp32 autograd's is (the project's criterion, docs/coverage.md)
NOISE = 1e-5  # gradients below this fraction of the largest entry are rounding noise on both sides (a bias
# followed by a train-mode BatchNorm has an exactly zero gradient in exact arithmetic)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def check_parity(model, loss_fn, batch, scheme=None):
    exact = functools.cache(lambda: float64_gradients(original, loss_fn, batch))
    original = copy.deepcopy(model)
    trainer = pe.compile(model, loss_fn, batch, scheme=scheme)
    grads = trainer.gradients(batch)
    # The reference is autograd on the model as users run it (its own layout, contiguous): the project's criterion.
    # (A channels-last reference would set a laxer bar: ATen's channels-last batch norm sums in float, pockengine's
    # in double.)
    ref = copy.deepcopy(original)
    inputs, target = batch
    out = ref(**inputs) if isinstance(inputs, dict) else ref(*inputs)
    loss_fn(out, target).backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    names = set(trainer.trained)
    assert set(grads) == names
    for name, p in ref.named_parameters():
        if name not in names:
            continue
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        largest, floor = expected.abs().max().item(), NOISE * scale
        if largest < floor:  # a zero gradient up to rounding: ours must be as small
            assert grads[name].abs().max().item() < floor, name
        elif (grads[name] - expected).abs().max().item() > TOL * largest:
            g64 = exact()[name].float()
            assert (grads[name] - g64).abs().max() <= (expected - g64).abs().max(), name


# In train mode 91 of the 141 gradients above the noise are more than 1e-4 from fp32 autograd's and further from
# float64 autograd's (2x at most); 81 were before pockengine computed batch norm precisely (a channels-last reference
# with ATen's batch norm hid them). The `matmul` pass (1x1 convolutions as matrix multiplies) accounts for most:
# left out, 4 remain. Open: issue #11.
MATMUL_ROUNDING = pytest.mark.xfail(strict=True, reason="channels-last 1x1 convolutions as matmuls round further "
                                    "from float64 than NCHW autograd (see above)")


@pytest.mark.parametrize("mode", [pytest.param("train", marks=MATMUL_ROUNDING), "eval"])
def test_mobilenet_v2(mode):
    model = no_dropout(mobilenet_v2(pretrained=True, num_classes=10))
    getattr(model, mode)()
    g = torch.Generator().manual_seed(0)
    batch = ((torch.randn(2, 3, 64, 64, generator=g),), torch.tensor([3, 7]))
    check_parity(model, pe.losses.cross_entropy(), batch)


@pytest.mark.parametrize("scheme", ["full", "bias_only"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_minilm_classifier(mode, scheme):
    model, tokenizer = minilm_classifier(num_labels=2)
    assert model.config._attn_implementation == "sdpa"
    getattr(no_dropout(model), mode)()
    enc = tokenizer(["a gripping, well acted film", "dull and far too long"], padding="max_length",
                    max_length=16, truncation=True, return_tensors="pt")
    batch = (dict(enc), torch.tensor([1, 0]))
    check_parity(model, pe.losses.cross_entropy(), batch, getattr(pe.Scheme, scheme)())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_smollm2_short_sequence(mode):
    model, tokenizer = smollm2(max_layers=2)
    assert model.config._attn_implementation == "sdpa"
    getattr(no_dropout(model), mode)()
    ids = tokenizer(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    check_parity(model, pe.losses.causal_lm(), ({"input_ids": ids}, ids))


def test_smollm2_all_30_layers():
    model, tokenizer = smollm2()
    model.eval()
    ids = tokenizer(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    check_parity(model, pe.losses.causal_lm(), ({"input_ids": ids}, ids))
