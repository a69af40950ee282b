"""Gradient parity with torch.autograd on the real pretrained models, full fine-tuning, train and eval mode.

The text models load with the library's default attention (scaled_dot_product_attention), as their users load them;
MiniLM is also checked bias-only."""

import copy
import functools

import pytest
import torch
from torch.utils._pytree import tree_map

import pockengine as pe
from model_zoo.parity import autograd_gradients, float64_gradients, gradient_errors
from pockengine.models import minilm_classifier, mobilenet_v2, smollm2

pytestmark = pytest.mark.slow  # real pretrained models, up to SmolLM2's 30 layers

# The criterion is the project's (tests/model_zoo/parity.py): within 1e-4 of fp32 autograd's gradient (relative), or
# within twice fp32 autograd's distance from float64 autograd's; gradients that are 0 in exact arithmetic (a bias
# before a train-mode BatchNorm) must come out as small as autograd's rounding noise.


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def channels_last(model, batch):
    """`model` and the images of `batch` in channels-last layout."""
    images = tree_map(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t, batch[0])
    return model.to(memory_format=torch.channels_last), (images, batch[1])


def check_parity(model, loss_fn, batch, scheme=None):
    original = copy.deepcopy(model)
    trainer = pe.compile(model, loss_fn, batch, scheme=scheme)
    grads = trainer.gradients(batch)
    assert set(grads) == set(trainer.trained)
    # The reference is autograd on the model as users run it (contiguous). pockengine runs convolution networks in
    # channels-last layout, whose convolutions round differently: for MobileNetV2 in train mode eager PyTorch in
    # channels-last is a median 1.9x (at most 4.1x) further from float64 autograd than in NCHW, pockengine's program
    # (channels-last, its batch norms summing in double) a median 0.92x (at most 1.9x) as far as eager channels-last;
    # with `disable={"layout"}` it is 1.0x as far as eager NCHW. So eager channels-last's rounding counts too.
    ref = autograd_gradients(copy.deepcopy(original), loss_fn, batch)[1]
    others = ()
    if trainer.channels_last:
        cl_model, cl_batch = channels_last(copy.deepcopy(original), batch)
        others = (autograd_gradients(cl_model, loss_fn, cl_batch)[1],)
    bad = gradient_errors(grads, ref, functools.cache(lambda: float64_gradients(original, loss_fn, batch)),
                          other_refs=others)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mode", ["train", "eval"])
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
