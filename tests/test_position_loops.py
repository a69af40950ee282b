"""Mixture-of-experts layers that loop over the experts `nonzero()` finds and gather each one's rows with
`torch.where(mask)` (Hugging Face's Switch Transformers, NLLB-MoE, LongCat-Flash, openai-privacy-filter) compile to
fixed-shape programs (pockengine/capture/position_loops.py) whose losses and gradients equal autograd's (float64,
rel. err. <= 1e-10; NLLB-MoE's encoder in float32, rel. err. <= 1e-4), for the full and the bias-only schemes; a
loop whose iterations do anything that cannot be masked, or that is not a `for` loop over all of them, stays a
CaptureError."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockengine as pe

TOL = 1e-10
TOL_FLOAT32 = 1e-4  # the Hugging Face model, in float32 as its router computes
EXPERTS, HIDDEN = 4, 8


class Experts(nn.Module):
    """The experts' loop as transformers writes it. `top_k` experts per token; `kind` is which model's loop:
    "switch" (an expert module per index, `torch.where` over the (k, token) mask, `index_add_`), "longcat" (stacked
    weights, `int(expert.item())`, identity experts past the routed ones, a `numel() == 0` check), "privacy" (the
    mask made under no_grad, a skipped class, clamped SwiGLU with biases), "nemotron" (as "longcat"
    over `nonzero().squeeze(-1)`, 0-d positions); `body` changes what an iteration does."""

    def __init__(self, kind="switch", top_k=1, body=None):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.top_k, self.body = kind, top_k, body
        self.embed = nn.Linear(4, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 16), nn.GELU(), nn.Linear(16, HIDDEN)) for _ in range(EXPERTS))
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * 16, HIDDEN) * 0.3)
        self.down = nn.Parameter(torch.randn(EXPERTS, HIDDEN, 16) * 0.3)
        self.bias = nn.Parameter(torch.randn(EXPERTS, HIDDEN) * 0.1)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x):
        h = self.embed(x)
        b, t, d = h.shape
        h = h.reshape(-1, d)
        weights, chosen = torch.topk(self.router(h).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(h)
        if self.kind == "privacy":
            with torch.no_grad():
                mask = F.one_hot(chosen, num_classes=EXPERTS + 1).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        else:
            mask = F.one_hot(chosen, num_classes=EXPERTS).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        if self.kind == "nemotron":
            hit = hit.squeeze(-1)
        for expert in hit:
            if self.kind == "switch":
                idx, top_x = torch.where(mask[expert].squeeze(0))
                rows = h[None, top_x].reshape(-1, d)
                y = self.experts[int(f"{expert[0]}")](rows) * weights[top_x, idx, None]
            elif self.kind in ("longcat", "nemotron"):
                e = int(expert.item()) if self.kind == "longcat" else expert.item()
                idx, top_x = torch.where(mask[e].squeeze(0))
                if top_x.numel() == 0:
                    continue
                rows = h[top_x]
                if e >= EXPERTS - 1:  # an identity ("zero-computation") expert
                    y = rows
                else:
                    gate, up = F.linear(rows, self.gate_up[e]).chunk(2, dim=-1)
                    y = F.linear(F.silu(gate) * up, self.down[e])
                y = y * weights[top_x, idx, None]
            else:
                e = expert[0]
                if e == EXPERTS:  # the masking class, never routed to: skipped
                    continue
                idx, top_x = torch.where(mask[e])
                gate, up = F.linear(h[top_x], self.gate_up[e]).chunk(2, dim=-1)
                y = (F.linear(gate.clamp(max=1.0) * torch.sigmoid(gate) * (up + 1), self.down[e]) + self.bias[e]) \
                    * weights[top_x, idx, None]
            if self.body is not None:
                out = self.body(out, top_x, y)
            else:
                out.index_add_(0, top_x, y)
        return self.head(out.reshape(b, t, d).mean(1))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g)


def check(model, scheme):
    """Gradients on the example batch and on another one (another routing: the program finds the rows as it runs)
    against autograd's, then a step's loss."""
    ref = copy.deepcopy(model)
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=getattr(pe.Scheme, scheme)())
    named = dict(ref.named_parameters())
    for seed in (0, 1):
        grads = trainer.gradients(batch(seed))
        x, y = batch(seed)
        expected = dict(zip(named, torch.autograd.grad(F.cross_entropy(ref(x), y), list(named.values()),
                                                       allow_unused=True)))
        assert grads, "nothing trained"
        for name, g in grads.items():
            r = expected[name]
            if r is None or r.abs().max() == 0:  # an expert no token was routed to
                assert g.abs().max() == 0, name
            else:
                assert ((g - r).abs().max() / r.abs().max()).item() <= TOL, name
    loss = trainer.step(batch(1))
    assert abs(loss - F.cross_entropy(ref(x), y).item()) <= 1e-12


@pytest.mark.parametrize("kind,top_k", [("switch", 1), ("switch", 2), ("longcat", 2), ("privacy", 2), ("nemotron", 2)])
@pytest.mark.parametrize("scheme", ["full", "bias_only"])
def test_expert_loops_over_nonzero_train_as_in_eager(kind, top_k, scheme):
    check(Experts(kind, top_k).double(), scheme)


def test_a_dimension_other_than_the_rows_found_is_read_as_it_is():
    check(Experts("switch", 1, lambda out, top_x, y: out.index_add(0, top_x, y.reshape(-1, y.shape[-1]))).double(),
          "full")


@pytest.mark.parametrize("body,match", [
    (lambda out, top_x, y: out.index_add(0, top_x, y / top_x.numel()), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y + y.new_zeros(y.shape)), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * torch.full_like(y, top_x.numel())),
     "passed to a torch function"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * (top_x.size(0) - 1)), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y) if top_x.shape[0] > 3 else out, "compared with 3"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * len(top_x)), "read with len"),
    # a size the count is a factor of, a Size's numel(), float on the left, math, counting the rows by iterating
    (lambda out, top_x, y: out.index_add(0, top_x, y * (HIDDEN / y.numel())), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * 2 if y.numel() > 4 * HIDDEN else y), "compared with 32"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / top_x.shape.numel()), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * (1.0 / top_x.numel())), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y * 0.9 ** top_x.shape[0]), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / (1.0 * top_x.shape[0])), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / (1 + math.log(top_x.numel()))), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / int(f"{top_x.numel()}")), "computed with"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / float(sum(1 for _ in top_x))), "iterated over"),
    (lambda out, top_x, y: out.index_add(0, top_x, y / float(len(top_x.unbind(0)))), "split into"),
])
def test_the_number_of_rows_found_read_in_python_is_refused(body, match):
    with pytest.raises(pe.CaptureError, match=match):
        pe.compile(Experts("switch", 1, body).double(), pe.losses.cross_entropy(), batch())


def test_an_expert_no_token_is_routed_to_gets_no_gradient():
    model = Experts("switch", 1).double()
    with torch.no_grad():  # every token to expert 0
        model.router.weight.zero_()
        model.router.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    check(model, "full")


@pytest.mark.parametrize("body,match", [
    (lambda out, top_x, y: out.index_copy(0, top_x, y), "not all computed row by row"),
    (lambda out, top_x, y: out.index_add(0, top_x, y - y.mean(0)), "not all computed row by row"),
    (lambda out, top_x, y: out.index_add(0, top_x, y) + 1, "used after its iteration"),
])
def test_a_loop_whose_iterations_cannot_be_masked_is_refused(body, match):
    with pytest.raises(pe.CaptureError, match=match):
        pe.compile(Experts("switch", 1, body).double(), pe.losses.cross_entropy(), batch())


class Stacked(Experts):
    """`body` returns what the iteration adds to `outs`, stacked and averaged after the loop: eager PyTorch averages
    over the experts hit, the static loop over every expert."""

    def __init__(self, per_iteration):
        super().__init__("switch", 1, self.collect)
        self.per_iteration = per_iteration

    def collect(self, out, top_x, y):
        self.outs.append(self.per_iteration(out, top_x, y))
        return out

    def forward(self, x):
        self.outs = []
        super().forward(x)
        return self.head(torch.stack(self.outs).mean(0).reshape(2, 5, HIDDEN).mean(1))


def test_writes_that_are_not_one_chain_through_the_loop_are_refused():
    """Each iteration changing the accumulator before its write, or writing into its own tensor collected after
    the loop, would apply to every position, not only to those eager PyTorch finds."""
    def decayed(out, top_x, y):
        return (out * 0.5).index_add(0, top_x, y)

    def decayed_in_place(out, top_x, y):
        out.mul_(0.5)
        return out.index_add_(0, top_x, y)

    def detached(out, top_x, y):
        return out.detach().index_add(0, top_x, y)

    for body in (decayed, decayed_in_place, detached):
        with pytest.raises(pe.CaptureError, match="computed in the loop's iteration"):
            pe.compile(Experts("switch", 1, body).double(), pe.losses.cross_entropy(), batch())
    with pytest.raises(pe.CaptureError, match="computed in the loop's iteration"):
        pe.compile(Stacked(lambda out, top_x, y: torch.zeros_like(out).index_add(0, top_x, y)).double(),
                   pe.losses.cross_entropy(), batch())
    with pytest.raises(pe.CaptureError, match="starts another chain"):
        pe.compile(Stacked(lambda out, top_x, y: out.index_add(0, top_x, y)).double(), pe.losses.cross_entropy(),
                   batch())


class EveryResult(Experts):
    """Keeps every write's result of the chain and sums them after the loop."""

    def __init__(self):
        super().__init__("switch", 1, self.collect)

    def collect(self, out, top_x, y):
        out = out.index_add(0, top_x, y)
        self.outs.append(out)
        return out

    def forward(self, x):
        self.outs = []
        super().forward(x)
        return self.head(torch.stack(self.outs).sum(0).reshape(2, 5, HIDDEN).mean(1))


def test_a_write_other_than_the_last_of_its_chain_used_after_the_loop_is_refused():
    with pytest.raises(pe.CaptureError, match="only the last write of the chain"):
        pe.compile(EveryResult().double(), pe.losses.cross_entropy(), batch())


class EarlyExit(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        for position in (x[:, 0] > 0).nonzero():
            return self.linear(x[position[0]])
        return self.linear(x[0])


def test_a_loop_over_nonzero_that_breaks_out_is_refused():
    with pytest.raises(pe.CaptureError, match="left early"):
        pe.compile(EarlyExit(), lambda out, y: (out - y).pow(2).mean(), (torch.randn(3, 4), torch.randn(4)))


@pytest.mark.parametrize("scheme", ["full", "bias_only"])
def test_hugging_face_nllb_moe_experts_train_as_in_eager(scheme):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.NllbMoeConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, num_experts=4,
        expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2)
    model = transformers.NllbMoeModel(config).get_encoder().eval()  # float32: its router computes in float32
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 64, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=int)}
    target = torch.randn(2, 16, generator=g)

    def loss_fn(out, y):
        return F.mse_loss(out.last_hidden_state.mean(1), y)

    trainer = pe.compile(model, loss_fn, (inputs, target), scheme=getattr(pe.Scheme, scheme)())
    grads = trainer.gradients((inputs, target))
    named = dict(ref.named_parameters())
    expected = dict(zip(named, torch.autograd.grad(loss_fn(ref(**inputs), target), list(named.values()),
                                                   allow_unused=True)))
    assert any(".experts." in name for name in grads)
    for name, grad in grads.items():
        r = expected[name]
        if r is None or r.abs().max() == 0:
            assert grad.abs().max() == 0, name
        else:
            assert ((grad - r).abs().max() / r.abs().max()).item() <= TOL_FLOAT32, name


class CountedExperts(Experts):
    """Takes the experts hit as a list before looping: its length would be every expert's count."""

    def forward(self, x):
        h = self.embed(x).reshape(-1, HIDDEN)
        chosen = self.router(h).argmax(-1)
        hit = list(F.one_hot(chosen, EXPERTS).sum(0).nonzero())
        return self.head(h).mean(0, keepdim=True).expand(2, 3) / len(hit)


def test_positions_taken_other_than_by_a_for_loop_stay_refused():
    with pytest.raises(pe.CaptureError, match="data-dependent"):
        pe.compile(CountedExperts().double(), pe.losses.cross_entropy(), batch())


class WritePerPosition(nn.Module):
    """Zeroes the rows nonzero() finds, one per iteration: an iteration not found would zero its row too."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        out = self.linear(x)
        for position in (x[:, 0] > 0).nonzero():
            out = out.index_fill(0, position, 0.0)
        return out


def test_a_loop_over_nonzero_with_other_effects_is_refused():
    with pytest.raises(pe.CaptureError, match="used after its iteration"):
        pe.compile(WritePerPosition(), lambda out, y: (out - y).pow(2).mean(), (torch.randn(3, 4), torch.randn(4)))


def test_a_static_loop_is_read_back_from_the_capture_cache(tmp_path, monkeypatch):
    import pockengine.trainer

    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    model = Experts("longcat", 2).double()
    cold = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), capture_cache=True)
    assert len(list((tmp_path / "capture").glob("*.safetensors"))) == 1
    monkeypatch.setattr(pockengine.trainer, "capture", lambda *a: pytest.fail("captured although cached"))
    warm = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), capture_cache=True)
    assert str(warm.program().graph) == str(cold.program().graph)
    cold_grads, warm_grads = cold.gradients(batch(1)), warm.gradients(batch(1))
    assert all(torch.equal(cold_grads[name], warm_grads[name]) for name in cold_grads)


@pytest.mark.parametrize("config,model,experts", [
    ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    # one-hot over one class more than it has experts, no `continue` for it: the body fails there while tracing
    ("NemotronHConfig", "NemotronHForCausalLM",
     dict(layers_block_type=["attention", "moe"], head_dim=8, n_routed_experts=4, n_shared_experts=1,
          moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, num_experts_per_tok=2)),
])
def test_the_eager_experts_of_grouped_matmul_models_train_as_in_eager(config, model, experts):
    """Their experts loop over the experts hit where `experts_implementation="eager"` (else transformers' grouped
    matmul): float32, rel. err. <= 1e-4. Nemotron-H's body fails at its extra class, traced again without it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = getattr(transformers, model)(getattr(transformers, config)(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        experts_implementation="eager", **experts)).eval()
    assert lm.config._experts_implementation == "eager"
    ref = copy.deepcopy(lm)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss_fn = pe.losses.causal_lm()
    grads = pe.compile(lm, loss_fn, ({"input_ids": ids}, ids)).gradients(({"input_ids": ids}, ids))
    named = dict(ref.named_parameters())
    expected = dict(zip(named, torch.autograd.grad(loss_fn(ref(input_ids=ids), ids), list(named.values()))))
    assert any(".experts." in name for name in grads)
    for name, grad in grads.items():
        r = expected[name]
        assert ((grad - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() <= TOL_FLOAT32, name


def clamped_when_large(out, top_x, y):
    if y.abs().max() > 100:  # data-dependent: torch.export cannot trace it
        y = y.clamp(-100, 100)
    return out.index_add(0, top_x, y)


def test_a_data_dependent_branch_in_the_loop_body_is_named_not_taken_for_a_position_not_found():
    """Only an index out of range is read as a position eager PyTorch did not find: a branch on tensor values fails
    every position, and the error names it rather than compiling without the position."""
    with pytest.raises(pe.CaptureError, match=r"(?s)`if y.abs\(\).max\(\) > 100:.*"
                       "data-dependent"):
        pe.compile(Experts("switch", 1, clamped_when_large).double(), pe.losses.cross_entropy(), batch())


class LastExpertAfterTheLoop(Experts):
    """Reads the loop variable after the loop: eager PyTorch's last expert hit, the static loop's last expert."""

    def forward(self, x):
        h = self.embed(x).reshape(-1, HIDDEN)
        mask = F.one_hot(self.router(h).argmax(-1), EXPERTS).permute(1, 0)
        out = torch.zeros_like(h)
        for expert in mask.sum(-1).gt(0).nonzero():
            (top_x,) = torch.where(mask[expert[0]])
            out.index_add_(0, top_x, self.experts[int(expert)](h[top_x]))
        return self.head(out + self.bias[expert[0]]).reshape(2, 5, 3).mean(1)


def test_the_loop_variable_read_after_the_loop_is_refused():
    with pytest.raises(pe.CaptureError, match="read after its iteration"):
        pe.compile(LastExpertAfterTheLoop().double(), pe.losses.cross_entropy(), batch())


def test_a_static_loop_warns_that_python_state_between_iterations_is_not_checked():
    with pytest.warns(UserWarning, match=r"(?s)test_position_loops.py:\d+ is compiled to run over every position.*"
                      "Python state it carries between iterations"):
        pe.compile(Experts("switch", 1).double(), pe.losses.cross_entropy(), batch())


class InputRouted(nn.Module):
    """Routes each token to the expert the batch names, one-hot over one class more than there are experts (as
    Nemotron-H's and DBRX's experts): the static loop's body fails at that class, which eager PyTorch never finds
    unless a token is routed there, and then fails too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(EXPERTS, 4, 4, dtype=torch.float64))

    def forward(self, x, chosen):
        mask = F.one_hot(chosen, EXPERTS + 1).permute(1, 0)
        out = torch.zeros_like(x)
        for expert in mask.sum(-1).gt(0).nonzero():
            (top_x,) = torch.where(mask[expert[0]])
            out.index_add_(0, top_x, x[top_x] @ self.w[expert[0]])
        return out


def test_a_position_the_loop_body_cannot_run_at_is_asserted_not_found():
    x = torch.randn(6, 4, dtype=torch.float64)
    chosen, target = torch.tensor([0, 2, 2, 1, 0, 2]), torch.randn(6, 4, dtype=torch.float64)

    def loss_fn(out, y):
        return (out - y).pow(2).mean()

    model = InputRouted()
    ref = copy.deepcopy(model)
    trainer = pe.compile(model, loss_fn, ((x, chosen), target))
    grad = trainer.gradients(((x, chosen), target))["w"]
    (expected,) = torch.autograd.grad(loss_fn(ref(x, chosen), target), [ref.w])
    assert ((grad - expected).abs().max() / expected.abs().max()).item() <= TOL
    routed_past_the_experts = torch.tensor([0, 2, 2, 1, 0, EXPERTS])
    with pytest.raises(IndexError):
        ref(x, routed_past_the_experts)
    with pytest.raises(RuntimeError, match="a position its body cannot run at"):
        trainer.gradients(((x, routed_past_the_experts), target))
