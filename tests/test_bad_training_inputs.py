"""Training inputs that used to give silently wrong results or unclear crashes: losses that are not one tensor, bad
learning rates and hyper-parameters, batches that do not fit the model (custom autograd.Functions:
tests/test_custom_functions.py)."""

import math
import re

import pytest
import torch
import torch.nn as nn

import pockengine as pe


def batch(features: int = 4, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=g),), torch.randint(0, 3, (n,), generator=g)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("loss_fn,match", [
    (lambda out, y: (nn.functional.cross_entropy(out, y), out.sum() * 100), "returned 2 values"),
    (lambda out, y: [nn.functional.cross_entropy(out, y), out.mean(), out.max()], "returned 3 values"),
    (lambda out, y: 1.0, "returned float 1.0"),
    (lambda out, y: None, "returned NoneType"),
    (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), "scalar, got a tensor of shape"),
    (lambda out, y: y.sum(), "floating-point"),
])
def test_a_loss_that_is_not_one_scalar_tensor_is_refused(loss_fn, match):
    with pytest.raises(pe.UserInputError, match=match):
        pe.compile(mlp(), loss_fn, batch())


@pytest.mark.parametrize("optimizer", [lambda: pe.optim.SGD(lr=0.1, momentum=0.9), lambda: pe.optim.AdamW(lr=0.1)],
                         ids=["sgd", "adamw"])
def test_a_bad_step_learning_rate_is_refused_before_anything_changes(optimizer):
    model = mlp()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=optimizer())
    trainer.step(batch(seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {s: t.clone() for s, t in v.items()} for k, v in trainer.state.items()}
    for lr in [math.nan, -0.1, math.inf, -math.inf, "0.1", True, torch.tensor(0.1)]:
        with pytest.raises(pe.UserInputError, match=re.escape(f"lr must be a finite number in [0, inf), got {lr!r}")):
            trainer.step(batch(seed=2), lr=lr)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(t, state[k][s]) for k, v in trainer.state.items() for s, t in v.items())
    assert trainer.steps_done == 1
    assert math.isfinite(trainer.step(batch(seed=2), lr=0.0))


@pytest.mark.parametrize("make,match", [
    (lambda: pe.optim.SGD(lr=math.nan), "SGD: lr"),
    (lambda: pe.optim.SGD(lr=-1), "SGD: lr"),
    (lambda: pe.optim.SGD(lr="fast"), "SGD: lr"),
    (lambda: pe.optim.SGD(lr=0.1, momentum=-0.9), "SGD: momentum"),
    (lambda: pe.optim.SGD(lr=0.1, momentum=1.5), "SGD: momentum"),
    (lambda: pe.optim.SGD(lr=0.1, momentum=math.nan), "SGD: momentum"),
    (lambda: pe.optim.SGD(lr=0.1, weight_decay=-1e-4), "SGD: weight_decay"),
    (lambda: pe.optim.SGD(lr=0.1, weight_decay=math.inf), "SGD: weight_decay"),
    (lambda: pe.optim.SGD(lr=0.1, nesterov=True), "Nesterov momentum needs momentum > 0"),
    (lambda: pe.optim.SGD(lr=0.1, momentum=0.9, nesterov="yes"), "nesterov must be True or False"),
    (lambda: pe.optim.AdamW(lr=math.nan), "AdamW: lr"),
    (lambda: pe.optim.AdamW(betas=(1.5, 0.9)), r"AdamW: betas\[0\]"),
    (lambda: pe.optim.AdamW(betas=(0.9, 1.0)), r"AdamW: betas\[1\]"),
    (lambda: pe.optim.AdamW(betas=(0.9, -0.1)), r"AdamW: betas\[1\]"),
    (lambda: pe.optim.AdamW(betas=(0.9,)), "betas must be a pair"),
    (lambda: pe.optim.AdamW(betas=0.9), "betas must be a pair"),
    (lambda: pe.optim.AdamW(eps=0), "AdamW: eps"),
    (lambda: pe.optim.AdamW(eps=-1e-8), "AdamW: eps"),
    (lambda: pe.optim.AdamW(weight_decay=-0.01), "AdamW: weight_decay"),
    (lambda: pe.optim.AdamW(weight_decay=math.nan), "AdamW: weight_decay"),
    (lambda: pe.optim.from_config({"kind": "Adagrad"}), "kind"),
    (lambda: pe.optim.from_config({"kind": "SGD", "lr": 0.1, "dampening": 0.5}), "dampening"),
])
def test_bad_hyperparameters_are_refused_naming_them(make, match):
    with pytest.raises(pe.UserInputError, match=match):
        make()


def test_a_batch_of_another_feature_size_says_so(capfd):
    trainer = pe.compile(mlp(), pe.losses.cross_entropy(), batch())
    capfd.readouterr()
    with pytest.raises(pe.UserInputError) as err:
        trainer.step(batch(features=6))
    msg = str(err.value)
    assert "does not fit the model" in msg and "(6x6 and 4x8)" in msg and "inputs ([6, 6],)" in msg
    assert "example batch" in msg
    assert capfd.readouterr().err == ""  # no 19-line log from torch before the error
    assert trainer.steps_done == 0 and math.isfinite(trainer.step(batch()))


def test_a_refused_batch_leaves_batchnorm_statistics_and_generators_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch())
    stats = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    with pytest.raises(pe.UserInputError, match="does not fit"):
        trainer.step(batch(features=5))
    assert all(torch.equal(v, stats[k]) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("kwargs,match", [
    ({"optimizer": torch.optim.SGD}, "optimizer must be a pockengine optimizer"),
    ({"scheme": "full"}, "scheme must be a pockengine.Scheme"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_wrong_argument_types_are_refused(kwargs, match):
    with pytest.raises(pe.UserInputError, match=match):
        pe.compile(mlp(), pe.losses.cross_entropy(), batch(), **kwargs)
    with pytest.raises(pe.UserInputError, match="model must be a torch.nn.Module"):
        pe.compile(lambda x: x, pe.losses.cross_entropy(), batch())
