"""Custom torch.autograd.Functions train through their own backward (pockengine/capture/functions.py): traced at
compile time and inlined, never the derivative of the forward. Gradients are compared with eager autograd, which
runs the Function's backward, at rel. err. <= 1e-4."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

import pockengine as pe

TOL = 1e-4


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return torch.round(h)

    @staticmethod
    def backward(ctx, g):
        return g


class ExactGelu(torch.autograd.Function):
    """A backward that is its forward's derivative (as BLOOM's GeLU)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h)))

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h))
        return g * (0.5 * h * ((1 - t * t) * (0.79788456 + 0.1070322243 * h * h)) + 0.5 * (1 + t))


class WeightedIdentity(torch.autograd.Function):
    """Returns its input itself; the backward makes a tensor from Python numbers (a constant of the trace)."""

    @staticmethod
    def forward(ctx, h):
        return h

    @staticmethod
    def backward(ctx, g):
        return g * torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 1.0, -3.0, 1.0])


class ClippedTanh(torch.autograd.Function):
    """Saves an intermediate of its forward and sets a tensor and a number on ctx; its backward clips."""

    @staticmethod
    def forward(ctx, h, limit):
        t = torch.tanh(h)
        ctx.save_for_backward(t)
        ctx.far = h.abs() > limit  # a tensor attribute, not saved with save_for_backward
        ctx.limit = limit
        return t * limit

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return (g * (1 - t * t) * ctx.limit).masked_fill(ctx.far, 0.0), None


class TopValue(torch.autograd.Function):
    """Two outputs, one of them marked non-differentiable; the backward scatters into a fresh tensor in place."""

    @staticmethod
    def forward(ctx, h):
        value, index = h.max(dim=-1, keepdim=True)
        scale = value.detach() * 0 + 2
        ctx.mark_non_differentiable(scale)
        ctx.save_for_backward(index)
        ctx.width = h.shape[-1]
        return value, scale, index

    @staticmethod
    @once_differentiable
    def backward(ctx, g_value, g_scale, g_index):
        (index,) = ctx.saved_tensors
        out = torch.zeros(*g_value.shape[:-1], ctx.width, dtype=g_value.dtype, device=g_value.device)
        out.scatter_add_(-1, index, 3 * g_value)  # not the derivative: three times it
        return out


class ScaledMatmul(torch.autograd.Function):
    """New style (setup_context), a keyword argument with a default; gradients only where needs_input_grad asks."""

    traced_needs: list[tuple[bool, ...]] = []

    @staticmethod
    def forward(x, w, scale=0.5):
        return x @ w * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, scale = inputs
        ctx.save_for_backward(x, w)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, g):
        ScaledMatmul.traced_needs.append(tuple(ctx.needs_input_grad))
        x, w = ctx.saved_tensors
        gx = g @ w.t() if ctx.needs_input_grad[0] else None
        gw = -(x.t() @ g) if ctx.needs_input_grad[1] else None  # a reversed weight gradient
        return gx, gw, None


class ValueDependent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g if g.sum() > 0 else -g


class WithFunction(nn.Module):
    def __init__(self, fn, *extra):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.fn, self.extra = fn, extra

    def forward(self, x):
        return self.head(self.fn.apply(self.encoder(x), *self.extra))


class TwoCalls(nn.Module):
    """One Function called at two sites with different shapes, and a Function with two outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.middle = nn.Linear(8, 6)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        h = ClippedTanh.apply(self.encoder(x), 0.8)
        h = ClippedTanh.apply(self.middle(h), 1.5)
        value, scale, _ = TopValue.apply(h)
        return self.head(value * scale)


class Projection(nn.Module):
    """A frozen encoder before a Function whose second input is a trained weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.weight = nn.Parameter(torch.randn(8, 5) * 0.3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(ScaledMatmul.apply(self.encoder(x), self.weight))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 4, generator=g),), torch.randint(0, 3, (6,), generator=g)


def eager_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    (x,), y = batch()
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad))
    return dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), params)))


def assert_matches_eager(model: nn.Module, scheme: pe.Scheme = pe.Scheme.full()) -> dict[str, torch.Tensor]:
    expected = eager_gradients(copy.deepcopy(model))
    grads = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=scheme).gradients(batch())
    assert grads
    for name, g in grads.items():
        r = expected[name]
        assert ((g - r).abs().max() / r.abs().max()).item() <= TOL, name
    return grads


@pytest.mark.parametrize("fn", [GradientReversal, RoundStraightThrough, ExactGelu, WeightedIdentity])
def test_layers_before_a_function_train_with_its_own_backward(fn):
    grads = assert_matches_eager(WithFunction(fn))
    assert set(grads) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}


def test_a_gradient_reversal_is_not_the_derivative_of_its_forward():
    """The comparison above can fail: without the reversal the encoder's gradient has the other sign."""
    reversed_ = eager_gradients(WithFunction(GradientReversal))
    plain = eager_gradients(WithFunction(type("Copy", (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, h: h.clone()), "backward": staticmethod(lambda ctx, g: g)})))
    torch.testing.assert_close(reversed_["encoder.weight"], -plain["encoder.weight"])


def test_saved_intermediates_tensor_attributes_several_calls_and_non_differentiable_outputs():
    assert_matches_eager(TwoCalls())


def test_a_step_trains_with_the_functions_backward():
    model, ref = TwoCalls(), TwoCalls()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
    trainer.step(batch())
    (x,), y = batch()
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            expected = q - 0.1 * q.grad
            assert ((p - expected).abs().max() / (q - expected).abs().max()).item() <= TOL, name


def test_the_backward_is_traced_for_the_inputs_that_need_a_gradient():
    model = Projection()
    model.encoder.requires_grad_(False)
    ScaledMatmul.traced_needs.clear()
    grads = assert_matches_eager(model)
    assert set(grads) == {"weight", "head.weight", "head.bias"}
    assert (False, True, False) in ScaledMatmul.traced_needs  # the trace asked for the weight's gradient alone
    assert (True, True, False) not in ScaledMatmul.traced_needs


def test_a_backward_that_reads_tensor_values_is_refused_naming_the_function():
    with pytest.raises(pe.CaptureError) as err:
        pe.compile(WithFunction(ValueDependent), pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.full())
    msg = str(err.value)
    assert f"torch.autograd.Function {__name__}.ValueDependent" in msg and "could not be traced" in msg
    assert "freeze the layers before it" in msg


def test_layers_after_an_untraceable_function_still_train():
    model = WithFunction(ValueDependent)
    head_only = pe.Scheme.from_dict({"rules": [{"modules": "head", "mode": "full"}]})
    assert set(assert_matches_eager(model, head_only)) == {"head.weight", "head.bias"}


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(checkpoint(self.block, self.encoder(x), use_reentrant=True))


def test_reentrant_checkpointing_trains_the_checkpointed_block_and_the_layers_before_it():
    """Its backward reaches the block's parameters through .grad, not its inputs: it is differentiated as captured."""
    model = Checkpointed()
    ref = copy.deepcopy(model)
    grads = pe.compile(model, pe.losses.cross_entropy(), batch()).gradients(batch())
    (x,), y = batch()
    F.cross_entropy(ref(x), y).backward()  # (reentrant checkpointing does not support autograd.grad)
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert ((grads[name] - p.grad).abs().max() / p.grad.abs().max()).item() <= TOL, name


def test_records_of_function_calls_do_not_accumulate_over_compiles():
    """A process that compiles again and again (a search, a notebook) keeps only the records of live captures
    (torch may keep its most recent exported program; no more)."""
    import gc

    from pockengine.capture import functions

    def compile_and_step() -> int:
        trainer = pe.compile(TwoCalls(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1))
        trainer.step(batch())  # a step after the capture: the program needs no record
        del trainer
        gc.collect()
        return len(functions._CALLS)

    first = compile_and_step()
    assert compile_and_step() == compile_and_step() == first <= 2 * 3  # TwoCalls records 3 calls per capture
