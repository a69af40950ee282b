"""The trainer contract: trajectories equal torch.optim's, errors are clear, nothing is corrupted, no autograd."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockengine as pe

TOL = 1e-4  # relative, fp32


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    # No bias before the BatchNorm: in train mode its gradient is exactly zero mathematically, and AdamW would
    # amplify rounding noise of different summation orders into different updates.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g),), torch.randint(0, 5, (n,), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def eager_trajectory(model, opt, batches, loss_fn):
    losses = []
    for (x,), y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("ours,theirs", [
    (lambda: pe.optim.SGD(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    (lambda: pe.optim.SGD(lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (lambda: pe.optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (lambda: pe.optim.AdamW(lr=1e-2, weight_decay=0.05),
     lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, foreach=False)),
], ids=["sgd", "sgd-momentum", "sgd-nesterov-wd", "adamw"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_five_step_trajectory_matches_torch_optim(ours, theirs, mode):
    loss_fn = pe.losses.cross_entropy()
    ref = small_cnn()
    getattr(ref, mode)()
    model = copy.deepcopy(ref)
    batches = [batch(seed=s) for s in range(5)]
    ref_losses = eager_trajectory(ref, theirs(ref.parameters()), batches, loss_fn)
    trainer = pe.compile(model, loss_fn, batches[0], optimizer=ours())
    losses = [trainer.step(b) for b in batches]
    assert losses == pytest.approx(ref_losses, rel=TOL)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= TOL, name
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=TOL, atol=1e-6), name


def test_learning_rate_is_a_runtime_input():
    loss_fn = pe.losses.cross_entropy()
    ref, model = small_cnn(), small_cnn()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    trainer = pe.compile(model, loss_fn, batch(), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    for i, lr in enumerate([0.1, 0.05, 0.01]):
        for group in opt.param_groups:
            group["lr"] = lr
        eager_trajectory(ref, opt, [batch(seed=i)], loss_fn)
        trainer.step(batch(seed=i), lr=lr)
    assert len(trainer._programs) == 1  # no recompilation for a new learning rate
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= TOL


def test_step_builds_no_autograd_graph():
    model = small_cnn()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))

    def refuse(*_):
        raise AssertionError("autograd saved a tensor during a compiled step")

    with torch.autograd.graph.saved_tensors_hooks(refuse, refuse):
        trainer.step(batch())
        grads = trainer.gradients(batch())
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())
    assert "backward" in str(trainer.program().graph)


def test_gradients_match_autograd_and_apply_no_update():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
    grads = trainer.gradients(batch())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref = small_cnn()
    pe.losses.cross_entropy()(ref(batch()[0][0]), batch()[1]).backward()
    for name, p in ref.named_parameters():
        assert rel_err(grads[name], p.grad) <= TOL, name


def test_listing_has_all_sections_and_module_paths():
    trainer = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    text = str(trainer.program().graph)
    for section in ("inputs:", "forward:", "loss:", "backward:", "update:", "outputs:"):
        assert section in text
    assert "convolution_backward" in text and "# 0" in text and "add_.Tensor" in text


def test_new_batch_shape_compiles_a_new_program():
    model = small_cnn()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(4), optimizer=pe.optim.SGD(lr=0.1))
    trainer.step(batch(4))
    loss = trainer.step(batch(3))  # the last, smaller batch
    assert math.isfinite(loss)
    assert len(trainer._programs) == 2
    trainer.step(batch(3))
    assert len(trainer._programs) == 2  # cached


def test_batch_structure_and_dtype_errors():
    trainer = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
    (x,), y = batch()
    with pytest.raises(pe.BatchMismatchError, match="dtype"):
        trainer.step(((x.double(),), y))
    with pytest.raises(pe.BatchMismatchError, match="structured"):
        trainer.step(((x, x), y))
    with pytest.raises(pe.UserInputError, match="pair"):
        trainer.step(x)


def test_batch_on_another_device_than_the_model_is_refused_naming_both():
    # The meta device stands in for a GPU: the check compares devices and never runs the batch.
    model = small_cnn()
    (x,), y = batch()
    with pytest.raises(pe.UserInputError, match=r"batch leaf 0 is on meta, but the model is on cpu.*\.to\('cpu'\)"):
        pe.compile(model, pe.losses.cross_entropy(), ((x.to("meta"),), y))
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
    with pytest.raises(pe.UserInputError, match="batch leaf 1 is on meta, but the model is on cpu"):
        trainer.step(((x,), y.to("meta")))
    assert trainer.steps_done == 0


def test_model_split_over_devices_is_refused():
    model = small_cnn()
    model[-1].to("meta")
    with pytest.raises(pe.UserInputError, match=r"several devices \['cpu', 'meta'\].*model.to\(device\)"):
        pe.compile(model, pe.losses.cross_entropy(), batch())


def test_trainer_state_and_generator_live_on_the_model_device():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    trainer = pe.compile(model, pe.losses.cross_entropy(), ((torch.randn(4, 6),), torch.randint(0, 3, (4,))),
                         optimizer=pe.optim.SGD(lr=0.1, momentum=0.9),
                         scheme=pe.Scheme.from_dict({"rules": [{"modules": "0", "mode": "partial", "ratio": 0.5}]}))
    assert trainer.device == torch.device("cpu") and trainer.generator.device == trainer.device
    consts = trainer.program().graph.constants.values()
    assert consts and all(t.device == trainer.device for t in consts)
    assert all(t.device == trainer.device for st in trainer.state.values() for t in st.values())


def test_non_scalar_loss_is_refused():
    with pytest.raises(pe.UserInputError, match="scalar"):
        pe.compile(small_cnn(), lambda out, y: F.cross_entropy(out, y, reduction="none"), batch())


def test_nonfinite_loss_raises_without_touching_weights():
    model = small_cnn()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    trainer.step(batch())
    before = copy.deepcopy(model.state_dict())
    state_before = {k: {s: t.clone() for s, t in v.items()} for k, v in trainer.state.items()}
    (x,), y = batch()
    bad = ((x * float("nan"),), y)
    with pytest.raises(pe.NonFiniteLossError, match="unchanged"):
        trainer.step(bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in trainer.state.items():
        for s, t in v.items():
            assert torch.equal(t, state_before[k][s])
    assert trainer.steps_done == 1


def test_nonfinite_loss_can_be_skipped():
    model = small_cnn()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1),
                         on_nonfinite="skip")
    before = copy.deepcopy(model.state_dict())
    (x,), y = batch()
    assert math.isnan(trainer.step(((x * float("inf"),), y)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_vjp_rule_names_op_module_and_fix():
    class Householder(nn.Module):
        def forward(self, x):  # no rule for the product of Householder reflections
            return torch.linalg.householder_product(x.view(3, 2, 2), torch.full((3, 1), 0.5)).sum((1, 2))

    model = nn.Sequential(nn.Linear(4, 4), Householder())
    with pytest.raises(pe.MissingVJPError) as err:
        pe.compile(model, pe.losses.mse(), ((torch.randn(3, 4),), torch.randn(3)))
    msg = str(err.value)
    assert "householder_product" in msg and "module '1'" in msg and "register" in msg and "freeze" in msg


def test_save_and_load_resume_the_same_trajectory(tmp_path):
    loss_fn = pe.losses.cross_entropy()
    model = small_cnn()
    trainer = pe.compile(model, loss_fn, batch(), optimizer=pe.optim.AdamW(lr=1e-2))
    trainer.step(batch(seed=0))
    trainer.save(tmp_path / "ckpt")
    trainer.save(tmp_path / "ckpt")  # overwriting an existing checkpoint works
    expected = [trainer.step(batch(seed=s)) for s in (1, 2)]

    ckpt = pe.read_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["steps_done"] == 1 and ckpt.meta["optimizer"]["kind"] == "AdamW"
    resumed = pe.load(tmp_path / "ckpt", small_cnn(), loss_fn, batch())
    assert resumed.steps_done == 1
    got = [resumed.step(batch(seed=s)) for s in (1, 2)]
    assert got == pytest.approx(expected, rel=TOL)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_load_refuses_a_model_of_another_architecture(tmp_path):
    trainer = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
    trainer.save(tmp_path / "ckpt")
    with pytest.raises(pe.UserInputError, match="does not fit"):
        pe.load(tmp_path / "ckpt", nn.Sequential(nn.Linear(3, 5)), pe.losses.cross_entropy(), batch())


def test_keyword_inputs_and_user_loss():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 1)

        def forward(self, ids, scale):
            return self.out(self.emb(ids)).squeeze(-1) * scale

    torch.manual_seed(0)
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    ids, scale, target = torch.randint(0, 10, (3, 5)), torch.rand(3, 5), torch.randn(3, 5)

    def loss_fn(out, y):
        return ((out - y) ** 2).mean() + out.abs().mean()

    trainer = pe.compile(model, loss_fn, ({"ids": ids, "scale": scale}, target))
    grads = trainer.gradients(({"ids": ids, "scale": scale}, target))
    loss_fn(ref(ids=ids, scale=scale), target).backward()
    for name, p in ref.named_parameters():
        assert rel_err(grads[name], p.grad) <= TOL, name


def test_tied_parameters_get_the_gradient_of_every_use():
    """An LM head sharing the embedding's weight: one parameter, whose gradient sums both uses."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model = Tied()
    data = ((torch.tensor([[0, 2, 5]]),), torch.randn(1, 3, 7))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(loss_fn(model(*data[0]), data[1]), [model.emb.weight])
    grads = pe.compile(model, loss_fn, data).gradients(data)
    assert set(grads) == {"emb.weight"}
    assert rel_err(grads["emb.weight"], ref) <= TOL


def test_gradient_flows_through_every_output_of_a_split():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.randn(6))

        def forward(self, y):
            a, b, c = torch.split(self.x, 2)
            return a * b * y + c

    torch.manual_seed(0)
    model = Halves()
    data = ((torch.randn(2),), torch.randn(2))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(loss_fn(model(*data[0]), data[1]), [model.x])
    assert rel_err(pe.compile(model, loss_fn, data).gradients(data)["x"], ref) <= TOL


def test_a_number_in_the_batch_is_part_of_the_program_key():
    """A non-tensor batch leaf is a constant of the compiled program: another value compiles another program
    instead of silently reusing the first one's constant."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale: float):
            return self.lin(x) * scale

    torch.manual_seed(0)
    model, x, y = Scaled(), torch.randn(4, 3), torch.randn(4, 2)
    trainer = pe.compile(model, pe.losses.mse(), ((x, 1.0), y))
    for scale in (1.0, 3.0):
        expected = F.mse_loss(model(x, scale), y).item()
        assert trainer.loss(((x, scale), y)) == pytest.approx(expected, rel=1e-6)
