"""Every random op of a compiled program draws from the trainer's generator (seeded by `seed`, saved in checkpoints),
in program order: dropout, and the `rand` of drop-path (stochastic depth), `randn_like`, `bernoulli`. A seeded run
does not depend on torch's global generator, a resumed checkpoint replays the same draws, and a random op that
cannot take a generator is refused at compile time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pockengine as pe
from pockengine.ir.ops import draws_nothing, draws_random, generator_variant
from model_zoo.parity import TOL, rel_err

aten = torch.ops.aten


class DropPath(nn.Module):
    """Stochastic depth as Hugging Face and timm write it: each sample's branch is kept with probability 1 - p.
    `generator` lets the eager reference draw the mask the compiled program draws."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.p
        shape = (x.shape[0], 1)
        mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device, generator=self.generator)).floor()
        return x / keep * mask


class Residual(nn.Module):
    def __init__(self, noise: bool = False):
        super().__init__()
        self.inner = nn.Linear(6, 16)
        self.branch = nn.Linear(16, 16)
        self.drop_path = DropPath(0.5)
        self.head = nn.Linear(16, 3)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inner(x))
        h = h + self.drop_path(self.branch(h))
        if self.noise:  # more random ops, each drawn in program order
            h = h + 0.1 * torch.randn_like(h)
            h = h * torch.bernoulli(torch.full_like(h, 0.8))
        return self.head(h)


def residual(noise: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Residual(noise).train()


def batch(seed: int = 0, n: int = 8) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g),), torch.randint(0, 3, (n,), generator=g)


def convnext() -> nn.Module:
    """A small Hugging Face ConvNeXt with drop-path on (its `rand` per block)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, drop_path_rate=0.5)
    return ConvNextForImageClassification(config).train()


def images(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}, torch.randint(0, 3, (4,), generator=g)


def run(model: nn.Module, batches: list, seed: int, global_seeds: list[int]) -> tuple[list[float], dict]:
    """Losses of steps on `batches`, torch's global generator reseeded before each step; the final weights."""
    trainer = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batches[0],
                         optimizer=pe.optim.SGD(lr=0.1, momentum=0.9), seed=seed)
    losses = []
    for b, g in zip(batches, global_seeds):
        torch.manual_seed(g)
        losses.append(trainer.step(b))
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("name", ["torch.rand, randn_like, bernoulli", "HF ConvNeXt"])
def test_a_seeded_run_does_not_depend_on_torchs_global_generator(name):
    model, batches = (residual(noise=True), [batch(s) for s in range(3)]) if name.startswith("torch") else (
        convnext(), [images(s) for s in range(3)])
    first, weights = run(model, batches, seed=5, global_seeds=[0, 1, 2])
    again, weights_again = run(model, batches, seed=5, global_seeds=[7, 0, 9])
    assert first == again
    assert all(torch.equal(weights[n], weights_again[n]) for n in weights)
    other, _ = run(model, batches, seed=6, global_seeds=[0, 1, 2])
    assert first != other  # the draws matter: the test can fail


def test_every_random_op_is_called_with_the_trainers_generator():
    trainer = pe.compile(residual(noise=True), pe.losses.cross_entropy(), batch(), seed=5)
    program = trainer.program()
    random = [n for n in program.graph.nodes if draws_random(n.target)]
    assert len(random) >= 3  # drop-path's rand, randn_like, bernoulli's rand
    calls = [line for line in program.source.splitlines() if any(f" {n.name} = " in line for n in random)]
    assert len(calls) == len(random) and all(line.endswith("generator=_generator)") for line in calls), calls


def test_resuming_replays_the_same_random_stream(tmp_path):
    batches = [images(s) for s in range(4)]
    trainer = pe.compile(convnext(), pe.losses.cross_entropy(), batches[0], optimizer=pe.optim.AdamW(lr=0.01),
                         seed=3)
    trainer.step(batches[0])
    trainer.save(tmp_path / "ckpt")
    uninterrupted = [trainer.step(b) for b in batches[1:]]
    torch.manual_seed(123)  # the global generator plays no part
    resumed = pe.load(tmp_path / "ckpt", convnext(), pe.losses.cross_entropy(), batches[0])
    assert [resumed.step(b) for b in batches[1:]] == uninterrupted  # bit-identical: same draws
    fresh = pe.load(tmp_path / "ckpt", convnext(), pe.losses.cross_entropy(), batches[0])
    fresh.generator.manual_seed(3)  # the seed's first draws again, not the saved stream's next ones
    assert [fresh.step(b) for b in batches[1:]] != uninterrupted


def test_drop_path_gradients_equal_autograd_on_the_same_draws():
    """The program's one random op is drop-path's `rand`: its first draw from a generator seeded with `seed`, so
    eager autograd drawing from such a generator is the reference."""
    model = residual()
    grads = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), seed=11).gradients(batch())
    ref = copy.deepcopy(model)
    ref.drop_path.generator = torch.Generator().manual_seed(11)
    (x,), y = batch()
    loss = pe.losses.cross_entropy()(ref(x), y)
    expected = dict(zip([n for n, _ in ref.named_parameters()],
                        torch.autograd.grad(loss, list(ref.parameters()))))
    for n, g in grads.items():
        assert rel_err(g, expected[n]) <= TOL, n
    other = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), seed=12).gradients(batch())
    assert not torch.equal(other["branch.weight"], grads["branch.weight"])  # another mask: the test can fail


# A random op that takes no generator (a user's custom kernel): the trainer's seed cannot reach it.
@torch.library.custom_op("pockengine_test::noise", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.randn_like(x)


@_noise.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_noise(self.frozen(x)))


def test_a_random_op_without_a_generator_is_refused_naming_it():
    scheme = pe.Scheme.from_dict({"rules": [{"modules": "head", "mode": "full"}]})
    with pytest.raises(pe.errors.CaptureError,
                       match=r"pockengine_test.noise.default \(node \S+, module ''\) draws random numbers, but ATen "
                             r"has no overload of it that takes a generator.*eval mode"):
        pe.compile(Noisy(), pe.losses.cross_entropy(), batch(), scheme=scheme)


def test_the_generator_overload_and_dropout_free_kernels_come_from_the_schemas():
    assert generator_variant(aten.rand.default) is aten.rand.generator
    assert generator_variant(aten.randint.low) is aten.randint.low_generator
    assert generator_variant(aten.rand_like.default) is aten.rand_like.generator
    assert generator_variant(aten.bernoulli.p) is aten.bernoulli.p  # takes one itself
    assert generator_variant(aten.native_dropout.default) is None
    flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.zeros(1, 1, 2, 2)
    assert draws_random(flash) and draws_nothing(flash, (q, q, q), {})
    assert not draws_nothing(flash, (q, q, q, 0.1), {})
    assert draws_nothing(aten.lstm.input, (q, [], [], True, 1, 0.1, False, False, True), {})  # train off
