"""Whole-model gradient parity: pockengine's compiled gradients equal torch.autograd's for every parameter.

Small, randomly initialized (seeded) models in fp32: an MLP, a CNN (conv + BN + ReLU + maxpool + linear) and the
Hugging Face BERT, GPT-2, Llama (grouped-query attention), ViT and ResNet, each in train and in eval mode, the
transformers with their default attention (`sdpa`: one scaled_dot_product_attention op) fully and bias-only
trained, and BERT with Hugging Face's eager attention too. For every parameter

    rel_err = max|g - g_ref| / max(max|g_ref|, TINY) <= TOL = 1e-4,

or, where the fp32 reference itself is further than that from autograd in float64 (a gradient summed with heavy
cancellation, such as a BatchNorm scale's), pockengine's gradient is within twice the fp32 reference's distance
from the float64 one (tests/model_zoo/parity.py says why).

In train mode every dropout probability is 0 so that both sides compute the same function; in eval mode the
models keep their dropout (> 0), which eval must switch off. `test_dropout_loss_is_reproducible_for_a_seed`
covers dropout > 0 in train mode: the same seed gives the same losses, another seed other ones.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import pytest
import torch
import torch.nn as nn

import pockengine as pe
from model_zoo.parity import autograd_gradients, call as _call, float64_gradients, gradient_errors
from pockengine.pipeline import optional_pass_names

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ models
def _mlp(dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 16), nn.GELU(),
                         nn.LayerNorm(16), nn.Linear(16, 4))


def _cnn(dropout: float) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(8 * 2 * 2, 5))


def _bert(dropout: float, attention: str | None = None) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                  attn_implementation=attention)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(dropout: float) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(dropout: float) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                   attention_dropout=dropout, use_cache=False,
                                   attention_bias=True)  # biases for the bias-only scheme
    return transformers.LlamaForCausalLM(cfg)


def _vit(dropout: float) -> nn.Module:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.ViTForImageClassification(cfg)


def _resnet(dropout: float) -> nn.Module:
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


def _tokens() -> tuple[dict, torch.Tensor]:
    ids = torch.randint(0, 50, (2, 8))
    return {"input_ids": ids}, ids


def _text_classification() -> tuple[dict, torch.Tensor]:
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sequence: the attention mask is on the gradient path
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2])


def _images(size: int, classes: int) -> Callable[[], tuple[tuple, torch.Tensor]]:
    return lambda: ((torch.randn(2, 3, size, size),), torch.randint(0, classes, (2,)))


# name: (build(dropout), batch(), loss)
MODELS: dict[str, tuple[Callable, Callable, Callable]] = {
    "mlp": (_mlp, lambda: ((torch.randn(6, 10),), torch.randint(0, 4, (6,))), pe.losses.cross_entropy()),
    "cnn": (_cnn, _images(8, 5), pe.losses.cross_entropy()),
    "bert": (_bert, _text_classification, pe.losses.cross_entropy()),
    # Hugging Face's eager attention: matmul and softmax ops instead of one scaled_dot_product_attention
    "bert-eager": (lambda dropout: _bert(dropout, "eager"), _text_classification, pe.losses.cross_entropy()),
    # the fused qkv projection is split in three; lm_head.weight is tied to transformer.wte.weight
    "gpt2": (_gpt2, _tokens, pe.losses.causal_lm()),
    "llama": (_llama, _tokens, pe.losses.causal_lm()),
    "vit": (_vit, _images(8, 3), pe.losses.cross_entropy()),
    "resnet": (_resnet, _images(16, 3), pe.losses.cross_entropy()),
}


# The Hugging Face families are marked slow (CI runs them; `-m "not slow"`, the fast tier, keeps the MLP and the CNN,
# and runs BERT, Llama and ResNet through tests/test_codegen.py).
SLOW_MODELS = {"bert", "bert-eager", "gpt2", "llama", "vit", "resnet"}


def _models(names):
    return [pytest.param(name, marks=pytest.mark.slow if name in SLOW_MODELS else ()) for name in names]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", _models(MODELS))
def test_gradients_match_autograd(name, mode):
    check_parity(name, mode, pe.Scheme.full())


@pytest.mark.slow
@pytest.mark.parametrize("off", optional_pass_names())
@pytest.mark.parametrize("name", ["cnn", "bert", "llama", "resnet"])
def test_gradients_match_autograd_with_a_pass_switched_off(name, off):
    check_parity(name, "train", pe.Scheme.full(), frozenset({off}))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", _models(["bert", "gpt2", "llama", "vit"]))
def test_bias_only_gradients_match_autograd(name, mode):
    """Bias-only training through the default (scaled_dot_product_attention) attention of the transformers."""
    check_parity(name, mode, pe.Scheme.bias_only())


def check_parity(name: str, mode: str, scheme: pe.Scheme, disable: frozenset[str] = frozenset()) -> None:
    build, make_batch, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = build(0.0 if mode == "train" else 0.1)  # eval mode must switch the dropout off by itself
    getattr(model, mode)()
    batch = make_batch()
    ref_model = copy.deepcopy(model)
    ref_loss, ref = autograd_gradients(ref_model, loss_fn, batch)

    trainer = pe.compile(model, loss_fn, batch, scheme=scheme, disable=disable)
    grads = trainer.gradients(batch)
    assert trainer.loss(batch) == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == set(scheme.resolve(model))
    bad = gradient_errors(grads, ref, lambda: float64_gradients(ref_model, loss_fn, batch))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["mlp", pytest.param("bert", marks=pytest.mark.slow)])
def test_dropout_loss_is_reproducible_for_a_seed(name):
    """With dropout > 0 in train mode: the same seed replays the same masks, another seed draws others."""
    build, make_batch, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = build(0.3).train()
    batches = [make_batch() for _ in range(3)]

    def run(seed: int) -> list[float]:
        trainer = pe.compile(copy.deepcopy(model), loss_fn, batches[0], optimizer=pe.optim.SGD(lr=0.1), seed=seed)
        return [trainer.step(b) for b in batches]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other
    # Dropout is on: without it the first loss (before any update) is another one.
    plain = copy.deepcopy(model).eval()
    assert first[0] != pytest.approx(loss_fn(_call(plain, batches[0][0]), batches[0][1]).item(), rel=1e-6)
