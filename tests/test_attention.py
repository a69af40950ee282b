"""Scaled dot-product attention (pockengine/autodiff/rules/attention.py) against torch.autograd, in fp32.

Each case is a module whose parameters are the query, key and value (and, for one case, an additive mask) of one
`F.scaled_dot_product_attention` call; the loss is the output times fixed random weights, summed. Both kernel pairs
(`attention="math"` and `attention="flash"`), differentiated on an IR graph holding the attention node, must give
autograd's gradients to a relative error of at most TOL = 1e-4 for: no mask, causal, boolean and additive masks, a
mask that needs a gradient (math only: flash falls back), grouped-query attention, one key/value head broadcast
over the query heads, a custom scale, 3-d inputs, cross attention (L != S); at sequence lengths 1, 7 and 64.
Dropout is checked against autograd on the very mask the trainer's generator draws; GPT-2 with its default
attention is captured and trained end to end. Masks known at compile time (pass `attention_masks`): causal ones
become is_causal=True, ones that keep every key go, others and padding masks stay, with autograd's gradients, on
masks built in forward and on Hugging Face's Llama, GPT-2, Mistral (sliding window), Qwen2, Gemma and BERT. A mask
built from the batch's padding mask is dropped at run time when that is all ones (Llama: is_causal=True; BERT: no
mask) and read otherwise, in one program, with autograd's gradients on both batches and the memory plan above what
either allocates; Llama's repeated key and value heads are read unrepeated (enable_gqa=True).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockengine as pe
from pockengine.autodiff import differentiate
from pockengine.autodiff.rules import attention
from pockengine.autodiff.rules.attention import attention_setting
from pockengine.backend import CompiledProgram
from pockengine.errors import MissingVJPError, UserInputError
from pockengine.ir.graph import BATCH, PARAM, Graph, TensorMeta, eliminate_dead_code

aten = torch.ops.aten

TOL = 1e-4
HEADS, E = 4, 8


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


class Attention(nn.Module):
    def __init__(self, q_shape, kv_shape, mask_param=None, **options):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q = nn.Parameter(torch.randn(q_shape, generator=gen))
        self.k = nn.Parameter(torch.randn(kv_shape, generator=gen))
        self.v = nn.Parameter(torch.randn(kv_shape, generator=gen))
        self.bias = None if mask_param is None else nn.Parameter(torch.randn(mask_param, generator=gen))
        self.options = options

    def forward(self, mask=None):
        mask = self.bias if self.bias is not None else mask
        return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=mask, **self.options)


def weighted(out, w):
    return (out * w).sum()


def _case(name: str, L: int):
    """(module, batch) for case `name` at query length L."""
    q, kv = (2, HEADS, L, E), (2, HEADS, L, E)
    gen = torch.Generator().manual_seed(1)
    mask = None
    if name == "plain":
        model = Attention(q, kv)
    elif name == "causal":
        model = Attention(q, kv, is_causal=True)
    elif name == "bool-mask":
        mask = torch.rand(2, 1, L, L, generator=gen) > 0.3
        mask[..., 0] = True  # every query keeps a key
        model = Attention(q, kv)
    elif name == "float-mask":
        mask = torch.randn(2, HEADS, L, L, generator=gen)
        model = Attention(q, kv)
    elif name == "mask-with-gradient":
        model = Attention(q, kv, mask_param=(1, HEADS, L, L))
    elif name == "gqa":
        model = Attention(q, (2, 2, L, E), enable_gqa=True)
    elif name == "mqa-broadcast":  # one key/value head broadcast over the query heads, without enable_gqa
        model = Attention(q, (2, 1, L, E))
    elif name == "scale":
        model = Attention(q, kv, scale=0.3, is_causal=True)
    elif name == "3d":
        model = Attention((3, L, E), (3, L, E))
    elif name == "cross":
        model = Attention(q, (2, HEADS, L + 3, E))
    else:
        raise KeyError(name)
    out = model(mask)
    w = torch.randn(out.shape, generator=gen)
    return model, ((mask,) if mask is not None else (), w)


CASES = ["plain", "causal", "bool-mask", "float-mask", "mask-with-gradient", "gqa", "mqa-broadcast", "scale", "3d",
         "cross"]


def engine(model: Attention, batch: tuple, kernel: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """Gradients, loss and listing of `weighted(model(*inputs), w)` differentiated by pockengine: the attention
    node built directly in an IR graph (capture is covered by the compiled tests below and the model tests)."""
    graph = Graph()
    params = {n: graph.input(n, PARAM, TensorMeta(tuple(p.shape), p.dtype)) for n, p in model.named_parameters()}
    (mask,), w = batch[0] or (None,), batch[1]
    values = {params[n]: p.detach() for n, p in model.named_parameters()}
    if mask is not None:
        values[mask_node := graph.input("mask", BATCH, TensorMeta(tuple(mask.shape), mask.dtype))] = mask
    w_node = graph.input("w", BATCH, TensorMeta(tuple(w.shape), w.dtype))
    values[w_node] = w
    attn_mask = params.get("bias", mask_node if mask is not None else None)
    options = dict(model.options)
    node = graph.call(aten.scaled_dot_product_attention.default,
                      (params["q"], params["k"], params["v"], attn_mask, options.pop("dropout_p", 0.0),
                       options.pop("is_causal", False)), options)
    loss = graph.call(aten.sum.default, (graph.call(aten.mul.Tensor, (node, w_node)),))
    with attention_setting(kernel):
        grads = differentiate(graph, loss, list(params.values()))
    graph.outputs = {"loss": loss, **{n: grads[p] for n, p in params.items()}}
    eliminate_dead_code(graph)
    program = CompiledProgram(graph, graph.inputs(), None)
    with torch.no_grad():
        out = dict(zip(program.output_names, program(*[values[n] for n in graph.inputs()])))
    return out, out.pop("loss"), str(graph)


@pytest.mark.parametrize("L", [1, 7, 64])
@pytest.mark.parametrize("kernel", ["math", "flash"])
@pytest.mark.parametrize("name", CASES)
def test_gradients_match_autograd(name, kernel, L):
    model, batch = _case(name, L)
    out = model(*batch[0])
    loss = weighted(out, batch[1])
    expected = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))

    grads, engine_loss, listing = engine(model, batch, kernel)
    # The loss sums terms of both signs: its rounding error is relative to their magnitude.
    assert abs(engine_loss.item() - loss.item()) <= 1e-5 * (out * batch[1]).abs().sum().item()
    for n, r in expected.items():
        assert rel_err(grads[n], r) <= TOL, n

    flash_can_run = name not in ("mask-with-gradient", "3d")
    ran = "flash" if kernel == "flash" and flash_can_run else "math"
    assert f"attention: {ran} (" in listing
    assert ("_scaled_dot_product_flash_attention_for_cpu_backward" in listing) == (ran == "flash")
    assert "scaled_dot_product_attention.default" not in listing  # replaced by the chosen pair


def test_listing_says_why_flash_cannot_run():
    model, batch = _case("mask-with-gradient", 7)
    listing = str(pe.compile(model, weighted, batch, attention="flash").program().graph)
    assert "attention: math (flash cannot run: the mask needs a gradient)" in listing
    model, batch = _case("3d", 7)
    listing = str(pe.compile(model, weighted, batch, attention="flash").program().graph)
    assert "attention: math (flash cannot run: it takes 4-d queries, not 3-d)" in listing


def test_auto_times_both_and_notes_the_costs():
    model, batch = _case("causal", 64)
    listing = str(pe.compile(model, weighted, batch).program().graph)
    line = next(ln for ln in listing.splitlines() if "# " in ln and "attention: " in ln)
    assert " ms, keeps " in line and ("attention: math (math " in line or "attention: flash (flash " in line)


@pytest.mark.parametrize("math_ms, flash_ms, chosen", [(1.0, 2.0, "math"), (0.95, 1.0, "flash"), (2.0, 1.0, "flash")])
def test_auto_runs_math_only_where_clearly_faster(monkeypatch, math_ms, flash_ms, chosen):
    seconds = {"math": math_ms / 1e3, "flash": flash_ms / 1e3}
    monkeypatch.setattr(attention, "_seconds", lambda c, kernel, backward, device: seconds[kernel])
    model, batch = _case("plain", 64)
    listing = str(pe.compile(model, weighted, batch).program().graph)
    assert f"attention: {chosen} ({chosen} {seconds[chosen] * 1e3:.2f} ms, keeps " in listing


def test_timings_are_cached_per_shape():
    model, batch = _case("plain", 7)
    pe.compile(model, weighted, batch)
    keys = {k for k in attention._timings if k[3][0].shape == (2, HEADS, 7, E)}
    assert {k[0] for k in keys} == {"math", "flash"}
    before = dict(attention._timings)
    pe.compile(copy.deepcopy(model), weighted, batch)
    assert attention._timings == before  # the same shapes are not timed again


def test_frozen_attention_runs_a_forward_only():
    """Attention before the only trained layer: no backward is emitted for it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(E, 3 * E)
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            q, k, v = self.proj(x).unflatten(-1, (3, 1, E)).unbind(-3)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
            return self.head(out.transpose(1, 2).flatten(2)).mean(1)

    torch.manual_seed(0)
    model = Net()
    batch = ((torch.randn(2, 7, E),), torch.tensor([0, 2]))
    ref = copy.deepcopy(model)
    loss_fn = pe.losses.cross_entropy()
    loss_fn(ref(*batch[0]), batch[1]).backward()
    for kernel in ("math", "flash"):
        trainer = pe.compile(copy.deepcopy(model), loss_fn, batch, scheme=pe.Scheme.from_dict(
            {"rules": [{"modules": "head", "mode": "full"}]}), attention=kernel)
        grads = trainer.gradients(batch)
        assert rel_err(grads["head.weight"], ref.head.weight.grad) <= TOL
        listing = str(trainer.program(gradients=True).graph)
        assert f"attention (forward only): {kernel} (attention='{kernel}')" in listing
        assert "flash_attention_for_cpu_backward" not in listing and "= _softmax_backward_data" not in listing


def test_dropout_draws_from_the_trainers_generator():
    """Dropout in train mode runs the math form with its mask drawn from the trainer's generator: the same seed gives
    the same result, and the gradients equal autograd's on that very mask."""
    p, L = 0.3, 7
    model, batch = _case("causal", L)
    model.options["dropout_p"] = p
    listing = str(pe.compile(copy.deepcopy(model), weighted, batch, attention="flash").program().graph)
    assert "attention: math (flash cannot run: it would draw the dropout mask from the global generator" in listing

    def grads(seed):
        return pe.compile(copy.deepcopy(model), weighted, batch, seed=seed).gradients(batch)

    first, again, other = grads(5), grads(5), grads(6)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["q"], other["q"])

    # The mask the program drew: the first draw of a generator seeded 5, over the probabilities' shape.
    keep = torch.empty(2, HEADS, L, L).bernoulli_(1 - p, generator=torch.Generator().manual_seed(5)).bool()
    ref = copy.deepcopy(model)
    scores = ref.q @ ref.k.transpose(-1, -2) / E ** 0.5
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) * keep / (1 - p)) @ ref.v
    expected = torch.autograd.grad(weighted(out, batch[1]), [ref.q, ref.k, ref.v])
    for n, r in zip("qkv", expected):
        assert rel_err(first[n], r) <= TOL, n


def test_bad_attention_option_is_refused():
    model, batch = _case("plain", 7)
    with pytest.raises(UserInputError, match="attention must be one of"):
        pe.compile(model, weighted, batch, attention="fast")


def test_key_batch_that_broadcasts_is_refused_clearly():
    model = Attention((2, HEADS, 7, E), (1, HEADS, 7, E))
    w = torch.randn(2, HEADS, 7, E)
    with pytest.raises(MissingVJPError, match="expand them to that shape"):
        pe.compile(model, weighted, ((), w))


def test_gpt2_with_default_attention_captures_and_trains():
    """GPT-2 as its users build it. Traced with the CPU's flash kernel, its `transpose(1, 2).reshape(...)` after
    attention was recorded as a view of the kernel's (batch, L, heads, E) layout that failed in capture ("Cannot
    view a tensor"); in train mode its attention dropout (0.1) runs the math form on the trainer's generator."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 100, (2, 12))
    batch, loss_fn = ({"input_ids": ids}, ids), pe.losses.causal_lm()

    model.eval()
    ref = copy.deepcopy(model)
    names, params = zip(*ref.named_parameters())
    expected = torch.autograd.grad(loss_fn(ref(**batch[0]), batch[1]), params)
    grads = pe.compile(model, loss_fn, batch).gradients(batch)
    floor = 1e-6 * max(r.abs().max().item() for r in expected)  # the key bias: 0 up to rounding on both sides
    for n, r in zip(names, expected):
        if r.abs().max() <= floor:
            assert grads[n].abs().max() <= floor, n
        else:
            assert rel_err(grads[n], r) <= TOL, n

    model.train()
    trainer = pe.compile(model, loss_fn, batch, optimizer=pe.optim.SGD(lr=0.1))
    assert "flash cannot run: it would draw the dropout mask" in str(trainer.program().graph)
    losses = [trainer.step(batch) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ mask rewrite
class BuiltMask(nn.Module):
    """Attention over parameters q, k, v whose mask `form` is built in forward, as models build theirs: from the
    sequence length (arange and a comparison), from a buffer or a constant tensor, or from a padding mask in the
    batch."""

    def __init__(self, form: str, L: int = 16, heads: int = HEADS):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (nn.Parameter(torch.randn(2, heads, L, E, generator=gen)) for _ in range(3))
        self.form = form
        self.register_buffer("tril", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self.tril_additive = torch.zeros(L, L).masked_fill(~self.tril, float("-inf"))  # lifted as a constant

    def forward(self, padding=None):
        L = self.q.shape[-2]
        i = torch.arange(L)
        keep = i[None, :] <= i[:, None]
        mask = {
            "bool": lambda: keep[None, None].expand(2, 1, L, L),
            "additive-inf": lambda: torch.zeros(L, L).masked_fill(~keep, float("-inf")),
            "additive-lowest": lambda: torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None],
            "buffer": lambda: self.tril,
            "constant": lambda: self.tril_additive,
            "all-keys": lambda: torch.ones(2, 1, L, L, dtype=torch.bool),
            "window": lambda: keep & (i[None, :] > i[:, None] - 4),  # Mistral's sliding window, shorter than L
            "bias": lambda: torch.zeros(L, L).masked_fill(~keep, -1e4),  # a large shift is not a removal
            "upper": lambda: keep.T,
            "padding": lambda: keep & padding[:, None, None, :],
        }[self.form]()
        return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=mask)


REWRITTEN = {"bool": "causal", "additive-inf": "causal", "additive-lowest": "causal", "buffer": "causal",
             "constant": "causal", "all-keys": "every key", "window": None, "bias": None, "upper": None,
             "padding": None}


@pytest.mark.parametrize("kernel", ["math", "flash"])
@pytest.mark.parametrize("form", list(REWRITTEN))
def test_masks_known_at_compile_time_are_rewritten_exactly(form, kernel):
    """A causal mask becomes is_causal=True, a mask that keeps every key goes; any other mask, and any mask built
    from the batch, stays. Gradients equal autograd's either way."""
    model = BuiltMask(form)
    padding = torch.ones(2, 16, dtype=torch.bool)
    padding[0, :5] = False  # left padding: the first queries of row 0 see no key at all
    inputs = (padding,) if form == "padding" else ()
    out = model(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    if form == "padding":
        out = torch.nan_to_num(out)  # a query with no key: NaN in PyTorch, uniform over the masked keys in pockengine
        w[0, :, :5] = 0
    expected = torch.autograd.grad(weighted(out, w), [model.q, model.k, model.v])

    trainer = pe.compile(model, weighted, (inputs, w), attention=kernel)
    grads = trainer.gradients((inputs, w))
    for n, r in zip("qkv", expected):
        assert rel_err(grads[n], r) <= TOL, n
    listing = str(trainer.program(gradients=True).graph)
    causal = "is the causal mask, known at compile time: is_causal=True, no mask read" in listing
    kept = "keeps every key, known at compile time: no mask read" in listing
    assert (causal, kept) == (REWRITTEN[form] == "causal", REWRITTEN[form] == "every key")
    if REWRITTEN[form] is not None:
        assert not any(f"= {op}." in listing for op in ("le", "where", "masked_fill", "logical_not")), "mask left"
        flash = [ln for ln in listing.splitlines() if "= _scaled_dot_product_flash_attention_for_cpu" in ln]
        assert all(f", {causal}, attn_mask=None" in ln for ln in flash)


def test_the_pass_can_be_left_out():
    model = BuiltMask("bool")
    w = torch.randn(2, HEADS, 16, E)
    listing = str(pe.compile(model, weighted, ((), w), disable={"attention_masks"}).program().graph)
    assert "is_causal=True" not in listing and "le.Tensor" in listing


def _decoder(kind: str, window: int | None = None) -> nn.Module:
    """A small Hugging Face model of family `kind`, built with its defaults (`sdpa` attention)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**sizes))
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(**sizes, num_key_value_heads=2, sliding_window=window))
    family = {"llama": "Llama", "qwen2": "Qwen2", "gemma": "Gemma"}[kind]
    config = getattr(transformers, f"{family}Config")(**sizes, num_key_value_heads=2)
    return getattr(transformers, f"{family}ForCausalLM")(config)


@pytest.mark.parametrize("kind, window", [("llama", None), ("gpt2", None), ("mistral", 4096), ("mistral", 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_decoders_causal_mask_becomes_is_causal(kind, window, padded):
    """Hugging Face decoders with their defaults build the causal mask from the sequence length: it becomes
    is_causal=True, unless the batch pads (the mask reads `attention_mask`) or Mistral's sliding window is shorter
    than the sequence. Gradients equal autograd's at 1e-4: Llama and Mistral in train mode (their attention draws no
    dropout), GPT-2 in eval mode (its train-mode dropout is checked below)."""
    model = _decoder(kind, window).train(kind != "gpt2")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs, labels = {"input_ids": ids}, ids.clone()
    if padded:  # left padding; the loss ignores what the padded positions predict, as users set it up
        inputs["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
        inputs["attention_mask"][0, :3] = 0
        labels[0, :4] = -100
    batch, loss_fn = (inputs, labels), pe.losses.causal_lm()
    ref = copy.deepcopy(model)
    names, params = zip(*ref.named_parameters())
    expected = torch.autograd.grad(loss_fn(ref(**inputs), labels), params)
    trainer = pe.compile(model, loss_fn, batch)
    grads = trainer.gradients(batch)
    floor = 1e-6 * max(r.abs().max().item() for r in expected)  # GPT-2's key bias: 0 up to rounding
    for n, r in zip(names, expected):
        if r.abs().max() <= floor:
            assert grads[n].abs().max() <= floor, n
        else:
            assert rel_err(grads[n], r) <= TOL, n
    listing = str(trainer.program(gradients=True).graph)
    rewritten = listing.count("is the causal mask, known at compile time: is_causal=True")
    assert rewritten == (0 if padded or window == 5 else 2)


def test_gpt2_train_mode_causal_rewrite_changes_nothing():
    """In train mode GPT-2's attention dropout runs the math form on the trainer's generator: with the causal
    rewrite and without it the same seed draws the same masks and gives the same gradients."""
    model = _decoder("gpt2").train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batch, loss_fn = ({"input_ids": ids}, ids), pe.losses.causal_lm()
    rewritten = pe.compile(copy.deepcopy(model), loss_fn, batch, seed=3)
    assert "is_causal=True" in str(rewritten.program(gradients=True).graph)
    grads = rewritten.gradients(batch)
    reference = pe.compile(copy.deepcopy(model), loss_fn, batch, seed=3, disable={"attention_masks"})
    for n, r in reference.gradients(batch).items():
        assert rel_err(grads[n], r) <= TOL, n


@pytest.mark.parametrize("kind, rewrite", [("qwen2", "is the causal mask"), ("gemma", "is the causal mask"),
                                           ("bert", "keeps every key")])
def test_other_families_masks(kind, rewrite):
    """Qwen2 and Gemma build Llama's causal mask; BERT without padding passes one that keeps every key."""
    model = _decoder(kind).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer = pe.compile(model, pe.losses.causal_lm(), ({"input_ids": ids}, ids))
    graph = trainer.program(gradients=True, after="attention_masks").graph
    attentions = [n for n in graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(attentions) == 2 and all(rewrite in graph.notes.get(n, "") for n in attentions)


# ------------------------------------------------------------------------------------------------ padding at run time
def _spy_on_flash(monkeypatch) -> list[tuple[bool, bool]]:
    """(is_causal, reads a mask) of every flash kernel call made by pockengine's pair that drops the mask at run
    time (pockengine/kernels/attention.py), forward and backward."""
    from pockengine.kernels import attention as kernels

    calls: list[tuple[bool, bool]] = []
    for name, causal_at in (("FLASH", 4), ("FLASH_BACKWARD", 7)):
        def spy(*args, _kernel=getattr(kernels, name), _at=causal_at, **kwargs):
            calls.append((args[_at], kwargs.get("attn_mask") is not None))
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def _padded_batch(padded: bool) -> tuple[dict, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs, labels = {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long)}, ids.clone()
    if padded:  # left padding; the loss ignores what the padded positions predict
        inputs["attention_mask"][0, :3] = 0
        labels[0, :4] = -100
    return inputs, labels


@pytest.mark.parametrize("kind, causal", [("llama", True), ("bert", False)])
def test_padding_mask_of_all_ones_runs_flash_without_the_mask(kind, causal, monkeypatch):
    """A mask built from the batch's `attention_mask` is the causal one (Llama) or keeps every key (BERT) when that
    is all ones: flash then runs without it (is_causal=True for Llama), forward and backward, as eager PyTorch does
    on seeing no padding; with padding it reads the mask. The test runs each step; one program serves both batches,
    and its gradients equal autograd's at 1e-4 on each."""
    model = _decoder(kind).train(kind == "llama")  # BERT in eval mode: its attention has dropout
    loss_fn = pe.losses.causal_lm()
    trainer = pe.compile(copy.deepcopy(model), loss_fn, _padded_batch(False), attention="flash")
    listing = str(trainer.program(gradients=True).graph)
    form = "is the causal mask" if causal else "keeps every key"
    assert listing.count(f"{form} when %batch1 is all ones (no padding)") == 2
    assert listing.count(f"flash, {'is_causal=True and ' if causal else ''}no mask when %batch1 is all ones") == 2
    assert listing.count("= pockengine.flash_attention_unmasked_if_backward.default(") == 2
    assert listing.count("= all.default(") == 1  # one test for every layer
    calls = _spy_on_flash(monkeypatch)
    for padded in (False, True):
        batch = _padded_batch(padded)
        ref = copy.deepcopy(model)
        names, params = zip(*ref.named_parameters())
        expected = torch.autograd.grad(loss_fn(ref(**batch[0]), batch[1]), params)
        calls.clear()
        grads = trainer.gradients(batch)
        floor = 1e-6 * max(r.abs().max().item() for r in expected)  # BERT's key bias: 0 up to rounding
        for n, r in zip(names, expected):
            if r.abs().max() <= floor:
                assert grads[n].abs().max() <= floor, (padded, n)
            else:
                assert rel_err(grads[n], r) <= TOL, (padded, n)
        assert calls == [(not padded and causal, padded)] * 4, padded  # two layers, forward and backward


def test_memory_plan_holds_with_and_without_padding():
    """Both forms of the run-time choice allocate what the plan predicts, at most."""
    from pockengine.memory.tracker import LiveStorageTracker

    model = _decoder("llama").train()
    trainer = pe.compile(model, pe.losses.causal_lm(), _padded_batch(False), optimizer=pe.optim.SGD(lr=0.01),
                         attention="flash")
    plan = trainer.memory_plan()
    for padded in (False, True):
        batch = _padded_batch(padded)
        trainer.step(batch)
        tracker = LiveStorageTracker()
        tracker.ignore(*model.parameters(), *model.buffers(), *batch[0].values(), batch[1])
        with tracker:
            trainer.step(batch)
        assert 0 < tracker.peak_bytes <= plan.peak_bytes, (padded, tracker.peak_bytes, plan.table())


@pytest.mark.parametrize("padded", [False, True])
def test_repeated_key_value_heads_are_read_unrepeated(padded):
    """Hugging Face's grouped-query attention copies each key and value head for its query heads when it passes a
    mask (repeat_kv); the attention reads the heads themselves with enable_gqa=True, as eager PyTorch does without a
    mask: no copies, and the gradients equal autograd's at 1e-4 (checked above on the same model)."""
    model = _decoder("llama").train()
    trainer = pe.compile(model, pe.losses.causal_lm(), _padded_batch(padded))
    graph = trainer.program(gradients=True, after="attention_masks").graph
    attentions = [n for n in graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(attentions) == 2
    for n in attentions:
        assert n.kwargs.get("enable_gqa") is True and n.args[1].meta.shape[1] == n.args[2].meta.shape[1] == 2
    assert not any(n.target is aten.expand.default and len(n.meta.shape) == 5 for n in graph.nodes)
