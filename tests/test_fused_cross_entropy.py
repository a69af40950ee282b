"""The `cross_entropy` pass: a language model's head and its cross-entropy loss run as one chunked op
(`pockengine::linear_cross_entropy`) that never holds the whole logits.

Gradients are compared with torch.autograd on the unfused model (rel err <= 1e-4, fp32) on small Llama and GPT-2
models with tied and untied heads, the head trained or not, a biased head, mean and sum reductions, Hugging Face's
own loss (`labels=`), and targets with ignored rows; chunks of 5 rows make every case run several chunks and a ragged last one. Losses the op does
not compute (label smoothing, a mean over every row) are left unfused and still exact. The memory plan predicts
the fused program's peak (the op's chunk of logits included) as the tracker measures it, and that peak is lower
than the unfused program's by more than the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockengine as pe
from model_zoo.parity import autograd_gradients, call, float64_gradients, gradient_errors
from pockengine.ir.graph import TensorMeta
from pockengine.kernels import LINEAR_CROSS_ENTROPY
from pockengine.memory.tracker import LiveStorageTracker
from pockengine.passes import fused_cross_entropy

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten
VOCAB = 96


def _llama(tied: bool) -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=32, use_cache=False, tie_word_embeddings=tied))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


class BiasedHead(nn.Module):
    """Token embeddings, a layer, and a head with a bias (an addmm): logits for every position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def _sum_loss(output, target):
    return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1), reduction="sum")


def _tokens(hf: bool = True) -> tuple:
    ids = torch.randint(0, VOCAB, (2, 12))
    target = ids.clone()
    target[0, 3:6] = -100  # ignored rows
    target[1, -1] = -100
    return ({"input_ids": ids} if hf else (ids,)), target


def _labels(inputs: dict, target: torch.Tensor) -> tuple:
    return {**inputs, "labels": target}, None


def _rules(*modules: str) -> pe.Scheme:
    return pe.Scheme.from_dict({"rules": [{"modules": m, "mode": "full"} for m in modules]})


# (model, loss, scheme, batch(), what the head computes gradients for)
CASES = {
    "llama-tied-last-block": (lambda: _llama(True), pe.losses.causal_lm(), _rules("model.layers.1", "model.norm"),
                              _tokens, "hidden"),
    "llama-tied-full": (lambda: _llama(True), pe.losses.causal_lm(), pe.Scheme.full(), _tokens, "both"),
    "llama-untied-head-only": (lambda: _llama(False), pe.losses.causal_lm(), _rules("lm_head"), _tokens, "weight"),
    "llama-untied-last-block-and-head": (lambda: _llama(False), pe.losses.causal_lm(),
                                         _rules("model.layers.1", "lm_head"), _tokens, "both"),
    "gpt2-tied-full": (_gpt2, pe.losses.causal_lm(), pe.Scheme.full(), _tokens, "both"),
    # Hugging Face's own loss (`labels=`: ForCausalLMLoss pads the labels with -100 and shifts them)
    "llama-hf-labels": (lambda: _llama(True), lambda out, target: out.loss, _rules("model.layers.1"),
                        lambda: _labels(*_tokens()), "hidden"),
    "biased-head-full-mean": (BiasedHead, pe.losses.cross_entropy(), pe.Scheme.full(), lambda: _tokens(False),
                              "both"),
    "biased-head-bias-only-sum": (BiasedHead, _sum_loss, pe.Scheme.bias_only(), lambda: _tokens(False), "both"),
    "biased-head-frozen-head-sum": (BiasedHead, _sum_loss, _rules("body"), lambda: _tokens(False), "hidden"),
}


def _fused(trainer: pe.Trainer) -> list:
    return [n for n in trainer.program().graph.nodes if n.target is LINEAR_CROSS_ENTROPY]


# The Hugging Face models take 10-20 s each to compile: the slow tier (the biased head's cases stay in the fast one).
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow if name.startswith(("llama", "gpt2"))
                                               else ()) for name in CASES])
def test_gradients_match_autograd(name, monkeypatch):
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_TOKENS", 5)  # several chunks, the last one ragged
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_BYTES", 0)
    build, loss_fn, scheme, make_batch, computes = CASES[name]
    torch.manual_seed(0)
    model = build().train()
    batch = make_batch()
    ref_model = copy.deepcopy(model)
    ref_loss, ref = autograd_gradients(ref_model, loss_fn, batch)

    trainer = pe.compile(model, loss_fn, batch, scheme=scheme)
    fused = _fused(trainer)
    assert len(fused) == 1
    grad_hidden, grad_weight = fused[0].args[-2:]
    assert (grad_hidden, grad_weight) == (computes != "weight", computes != "hidden")
    assert fused[0].args[6] == 5
    rows = fused[0].args[0].meta.shape[0]
    assert all(n.meta.numel < rows * VOCAB for n in trainer.program().graph.nodes
               if isinstance(n.meta, TensorMeta)), "the logits are still in the program"
    grads = trainer.gradients(batch)
    assert trainer.loss(batch) == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == set(scheme.resolve(model))
    bad = gradient_errors(grads, ref, lambda: float64_gradients(ref_model, loss_fn, batch))
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_training_steps_match_eager_sgd():
    torch.manual_seed(0)
    model = _llama(True).train()
    ref_model = copy.deepcopy(model)
    batch = _tokens()
    trainer = pe.compile(model, pe.losses.causal_lm(), batch, optimizer=pe.optim.SGD(lr=0.5))
    assert _fused(trainer)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    for _ in range(3):
        loss = trainer.step(batch)
        opt.zero_grad()
        ref_loss = pe.losses.causal_lm()(call(ref_model, batch[0]), batch[1])
        ref_loss.backward()
        opt.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, ref, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("loss_fn", [
    pe.losses.cross_entropy(label_smoothing=0.1),  # reads every log-probability
    lambda out, target: F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1), reduction="none").mean(),
], ids=["label-smoothing", "mean-over-every-row"])
def test_other_losses_stay_unfused_and_exact(loss_fn):
    torch.manual_seed(0)
    model = BiasedHead()
    batch = _tokens(False)
    ref_model = copy.deepcopy(model)
    ref_loss, ref = autograd_gradients(ref_model, loss_fn, batch)
    trainer = pe.compile(model, loss_fn, batch)
    assert not _fused(trainer)
    assert trainer.loss(batch) == pytest.approx(ref_loss, rel=1e-5)
    bad = gradient_errors(trainer.gradients(batch), ref, lambda: float64_gradients(ref_model, loss_fn, batch))
    assert not bad, "\n".join(bad)


def test_every_row_ignored_gives_nan_as_pytorch():
    torch.manual_seed(0)
    model = BiasedHead()
    ids, target = torch.randint(0, VOCAB, (1, 6)), torch.full((1, 6), -100)
    trainer = pe.compile(model, pe.losses.cross_entropy(), ((ids,), target), on_nonfinite="skip")
    assert _fused(trainer)
    assert torch.isnan(pe.losses.cross_entropy()(model(ids), target))
    assert torch.isnan(torch.tensor(trainer.loss(((ids,), target))))


def _measured_peak(trainer: pe.Trainer, model: nn.Module, batch: tuple) -> int:
    tracker = LiveStorageTracker()
    tracker.ignore(*model.parameters(), batch[0]["input_ids"], batch[1],
                   *(t for s in trainer.state.values() for t in s.values()))
    with tracker:
        trainer.step(batch)
    return tracker.peak_bytes


@pytest.mark.slow
def test_the_planned_peak_falls_by_more_than_the_logits_and_is_measured(monkeypatch):
    """A long sequence and a large vocabulary against a small model: the logits and their log-probabilities set the
    unfused program's peak. The fused op's chunk of logits (32 rows of 256) is in the plan, which matches the
    tracker."""
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_TOKENS", 32)
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_BYTES", 0)
    torch.manual_seed(0)
    vocab, tokens = 4096, 256
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=tokens, use_cache=False, tie_word_embeddings=True))
    ids = torch.randint(0, vocab, (1, tokens))
    batch = ({"input_ids": ids}, ids.clone())
    logits = (tokens - 1) * vocab * 4
    peaks = {}
    for disable in (frozenset(), frozenset({"cross_entropy"})):
        trainer = pe.compile(model, pe.losses.causal_lm(), batch, optimizer=pe.optim.SGD(lr=0.0),
                             scheme=_rules("model.layers.0"), disable=disable)
        assert bool(_fused(trainer)) == (not disable)
        plan = trainer.memory_plan()
        trainer.step(batch)
        measured = _measured_peak(trainer, model, batch)
        assert abs(plan.peak_bytes - measured) <= 0.05 * measured, plan.table()
        peaks[disable] = plan.peak_bytes
    fused, unfused = peaks[frozenset()], peaks[frozenset({"cross_entropy"})]
    assert fused < unfused - logits, (fused, unfused)


def test_a_float64_model_gets_float64_gradients(monkeypatch):
    """The op sums a float64 model's logits in float64 (it once used a float32 buffer whatever the dtype: float32's
    rounding, 1e-7 relative, in a model whose user asked for float64). Tolerance: 1e-12 relative to the largest
    gradient, against float64 autograd."""
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_TOKENS", 5)
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_BYTES", 0)
    torch.manual_seed(0)
    model = BiasedHead().double()
    batch = _tokens(False)
    loss_fn = pe.losses.cross_entropy()
    ref_loss, ref = autograd_gradients(copy.deepcopy(model), loss_fn, batch)
    trainer = pe.compile(model, loss_fn, batch, scheme=pe.Scheme.full())
    assert len(_fused(trainer)) == 1
    grads = trainer.gradients(batch)
    assert trainer.loss(batch) == pytest.approx(ref_loss, rel=1e-12)
    for name, g in grads.items():
        assert g.dtype == torch.float64
        assert (g - ref[name]).abs().max() <= 1e-12 * ref[name].abs().max(), name
