"""Randomness drawn in Python inside a forward pass (pockengine/capture/python_random.py, layer_drop.py,
spec_augment.py): torch.export would freeze it into the program as a constant. A draw from numpy's or Python's
global generator is refused with a CaptureError naming the module; Hugging Face's two such draws in train mode,
layer drop (`if torch.rand([]) < p: skip the layer`) and SpecAugment (a numpy span mask written with `x[mask] = v`),
are traced as random ops of the program instead: a new draw every step, with the distribution eager PyTorch has."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from pockengine.capture.spec_augment import compute_mask_indices
from pockengine.errors import CaptureError

from model_zoo.parity import autograd_gradients, gradient_errors


def _sum(output: torch.Tensor, target: object) -> torch.Tensor:
    return output.sum()


class _NumpyNoise(nn.Module):
    def __init__(self, draw) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.draw()


class _Outer(nn.Module):
    def __init__(self, draw) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.noisy = _NumpyNoise(draw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noisy(self.first(x))


@pytest.mark.parametrize("draw", [lambda: float(np.random.rand()), lambda: random.random()],
                         ids=["numpy", "random"])
def test_a_python_random_draw_in_forward_is_refused_naming_its_module(draw):
    model = _Outer(draw)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with pytest.raises(CaptureError, match=r"module 'noisy' \(_NumpyNoise\) draws random numbers with numpy"):
        pe.compile(model, _sum, ((torch.randn(2, 4),), None))
    # the capture, and the run that found the module, drew nothing the user's generators see
    assert np.random.get_state()[2] == numpy_state[2] and (np.random.get_state()[1] == numpy_state[1]).all()
    assert random.getstate() == python_state


# ------------------------------------------------------------------------------------------------ SpecAugment
def _hf_mask(shape, mask_prob, mask_length, attention_mask, min_masks) -> torch.Tensor:
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    return torch.from_numpy(_compute_mask_indices(shape, mask_prob, mask_length, attention_mask, min_masks))


def _statistics(masks: torch.Tensor, mask_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position, how often it is masked; the distribution of masked positions per row (0..length); the
    distribution of the lengths of runs of masked positions (merged overlapping spans)."""
    rows = masks.reshape(-1, masks.shape[-1]).long()
    per_row = torch.bincount(rows.sum(-1), minlength=rows.shape[-1] + 1).double() / rows.shape[0]
    edges = torch.diff(torch.nn.functional.pad(rows, (1, 1)), dim=-1)
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    runs = torch.bincount(ends - starts, minlength=rows.shape[-1] + 1).double()
    return masks.double().mean((0, 1)), per_row, runs / runs.sum()


@pytest.mark.parametrize("padded", [False, True], ids=["full-length", "padded"])
def test_spec_augment_mask_has_hugging_face_distribution(padded):
    """Many masks drawn by pockengine's torch version and by transformers' numpy one: the same chance of being
    masked per position, the same distribution of masked positions per row and of run lengths (a span is
    `mask_length` unless spans overlap)."""
    batch, length, mask_prob, mask_length, min_masks, draws = 4, 40, 0.3, 4, 1, 3000
    attention_mask = None
    if padded:  # rows of 40, 30, 12 and 3 positions (3: fewer than a span, so no span there)
        attention_mask = (torch.arange(length) < torch.tensor([40, 30, 12, 3])[:, None]).long()
    np.random.seed(0)
    torch.manual_seed(0)
    ours = torch.stack([compute_mask_indices((batch, length), mask_prob, mask_length, attention_mask, min_masks)
                        for _ in range(draws)])
    theirs = torch.stack([_hf_mask((batch, length), mask_prob, mask_length, attention_mask, min_masks)
                          for _ in range(draws)])
    assert ours.shape == theirs.shape and ours.dtype == torch.bool
    for row in range(batch):
        position, per_row, runs = _statistics(ours[:, row:row + 1], mask_length)
        hf_position, hf_per_row, hf_runs = _statistics(theirs[:, row:row + 1], mask_length)
        # 3000 draws: a frequency near 0.3 has a standard error of about 0.008
        assert (position - hf_position).abs().max() < 0.05, row
        assert (per_row - hf_per_row).abs().sum() / 2 < 0.06, row  # total variation distance
        assert (runs - hf_runs).abs().sum() / 2 < 0.06, row
    if padded:  # nothing masked past a row's length, except Hugging Face's last position of a row without a span
        lengths = attention_mask.sum(-1)
        beyond = torch.arange(length) >= lengths[:, None]
        beyond[:, -1] = False
        assert not (ours & beyond).any() and not (theirs & beyond).any()
        assert ours[:, 3, -1].all() and theirs[:, 3, -1].all()


def _wav2vec2(**config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                 conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                 classifier_proj_size=8, num_labels=3)
    dropouts = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                    final_dropout=0.0)
    model = transformers.Wav2Vec2ForSequenceClassification(
        transformers.Wav2Vec2Config(**sizes, **dropouts, **config))
    with torch.no_grad():
        model.wav2vec2.masked_spec_embed.normal_()  # initialized uniform in [0, 1): make it distinct from features
    return model.train()


def _audio() -> tuple:
    g = torch.Generator().manual_seed(0)
    return {"input_values": torch.randn(2, 400, generator=g)}, torch.tensor([0, 2])  # 39 frames


@pytest.mark.parametrize("axis", ["time", "features"])
def test_spec_augment_that_masks_everything_matches_eager_pytorch(axis):
    """A span as long as the axis (39 frames, 16 features) with one span at least: every frame is the learned
    vector, or every feature 0, in eager PyTorch and in the program alike, so the gradients must agree."""
    if axis == "time":
        spans = dict(mask_time_prob=0.05, mask_time_length=39, mask_time_min_masks=1)
    else:
        spans = dict(mask_time_prob=0.0, mask_feature_prob=0.05, mask_feature_length=16, mask_feature_min_masks=1)
    model = _wav2vec2(**spans, layerdrop=0.0)
    batch, loss = _audio(), pe.losses.cross_entropy()
    ref = autograd_gradients(model, loss, batch)[1]
    grads = pe.compile(model, loss, batch).gradients(batch)
    masked_out = "wav2vec2.feature_projection.projection.weight"  # what the masked values were computed from
    assert ref[masked_out].abs().max() == 0 and grads[masked_out].abs().max() == 0
    if axis == "time":
        assert ref["wav2vec2.masked_spec_embed"].abs().max() > 0
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))


def test_spec_augment_draws_a_new_mask_every_step():
    """With the default SpecAugment (as the model is loaded) the program draws from the trainer's generator: two
    calls mask other frames (the learned vector's gradient sums over the masked frames), one seed repeats them."""
    model = _wav2vec2(mask_time_prob=0.3, mask_time_length=2, layerdrop=0.0)
    batch, loss = _audio(), pe.losses.cross_entropy()
    first, second = (pe.compile(model, loss, batch, seed=1) for _ in range(2))
    name = "wav2vec2.masked_spec_embed"
    a, b, c = first.gradients(batch)[name], first.gradients(batch)[name], second.gradients(batch)[name]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ layer drop
class _Stack(nn.Module):
    """Layers each adding 1 (weight 1, bias 1 on an input of 0), skipped at random as Hugging Face writes it, and
    a head that passes their sum on (weight 1, bias 0)."""

    def __init__(self, layers: int, layerdrop: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1, 1) for _ in range(layers))
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.fill_(1.0)
                layer.bias.fill_(1.0)
            self.head.weight.fill_(1.0)
            self.head.bias.fill_(0.0)
        self.layerdrop = layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            skip_the_layer = False
            if self.training:
                dropout_probability = torch.rand([])
                skip_the_layer = dropout_probability < self.layerdrop
            if not skip_the_layer:
                x = layer(x)
        return self.head(x)


def test_layer_drop_skips_each_layer_with_its_probability():
    """The output counts the layers run: over 400 steps each of 3 layers runs in about 70% of them, and the
    gradients are those of the layers run (a skipped layer's weights get none)."""
    model = _Stack(3, layerdrop=0.3).train()
    batch = ((torch.zeros(1, 1),), None)
    trainer = pe.compile(model, _sum, batch, optimizer=pe.optim.SGD(lr=0.0), seed=0)
    kept = torch.tensor([trainer.step(batch) for _ in range(400)])
    assert set(kept.tolist()) <= {0.0, 1.0, 2.0, 3.0} and len(set(kept.tolist())) > 2
    assert abs(kept.mean().item() / 3 - 0.7) < 0.05
    grads = trainer.gradients(batch)
    assert {grads[f"layers.{i}.bias"].item() for i in range(3)} <= {0.0, 1.0}


@pytest.mark.parametrize("layerdrop", [0.0, 1.0])
def test_layer_drop_that_always_or_never_skips_matches_eager_pytorch(layerdrop):
    model = _Stack(2, layerdrop).train()
    batch = ((torch.randn(3, 1),), None)
    ref = autograd_gradients(model, _sum, batch)[1]
    grads = pe.compile(model, _sum, batch).gradients(batch)
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))


class _RandomBranchToNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)
        if not torch.rand([]) < 0.5:
            x = self.norm(x)
        return x


def test_a_random_branch_that_is_not_layer_drop_is_refused_naming_the_module():
    with pytest.raises(CaptureError, match=r"branches in Python on a random number .* 'norm', is not a layer of a "
                                           r"ModuleList"):
        pe.compile(_RandomBranchToNorm().train(), _sum, ((torch.randn(2, 4),), None))


class _SkipsMoreThanTheLayer(nn.Module):
    """`continue` skips the layer and the code after it (Mask2Former's decoder: a norm and a prediction per
    layer), which `where(drop, x, layer(x))` alone would still run on a dropped layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.post = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = x.new_zeros(())
        for layer in self.layers:
            if torch.rand([]) < 0.5:
                continue
            x = layer(x)
            aux = aux + self.post(x).sum()
        return x.sum() + aux


def test_a_skipped_branch_of_more_than_the_layer_call_is_refused():
    with pytest.raises(CaptureError, match=r"the output of layer 'layers.0' is computed on before the next layer's "
                                           r"draw"):
        pe.compile(_SkipsMoreThanTheLayer().train(), _sum, ((torch.randn(2, 4),), None))


class _DrawsOnlyForTraining(nn.Module):
    """transformers' Wav2Vec2Adapter: a numpy draw in every forward, used only in train mode."""

    def __init__(self, uses_draw_in_eval: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.uses_draw_in_eval = uses_draw_in_eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = np.random.random()
        if self.training or self.uses_draw_in_eval:
            return self.layer(x) * drop
        return self.layer(x)


def test_an_unused_draw_of_a_module_in_eval_mode_is_allowed():
    model = _Outer(float).eval()
    model.noisy = _DrawsOnlyForTraining(uses_draw_in_eval=False).eval()
    batch = ((torch.randn(2, 4),), None)
    ref = autograd_gradients(model, _sum, batch)[1]
    grads = pe.compile(model, _sum, batch).gradients(batch)
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))


def test_a_used_draw_of_a_module_in_eval_mode_is_refused_saying_so():
    model = _Outer(float).eval()
    model.noisy = _DrawsOnlyForTraining(uses_draw_in_eval=True).eval()
    with pytest.raises(CaptureError, match=r"module 'noisy' \(_DrawsOnlyForTraining\) draws random numbers .* "
                                           r"eval mode \(it is: its loss depends on the draw all the same\)"):
        pe.compile(model, _sum, ((torch.randn(2, 4),), None))
