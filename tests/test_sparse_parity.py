"""Sparse fine-tuning parity: every scheme trains exactly what it says, exactly as PyTorch eager would.

For each model family (an MLP; a small CNN with BatchNorm frozen and in train mode; small random Hugging Face
BERT, GPT-2, Llama, ViT and ResNet; the real MobileNetV2, MiniLM and SmolLM2) and each sparse scheme (bias-only,
last(k), head, and partial channels on a few conv/linear layers plus every bias, selecting the `first` channels
or those of largest `magnitude`), one compiled trainer is checked for

1. gradients: `trainer.gradients` has exactly the trained parameters, each equal to torch.autograd's gradient
   (times the channel mask of a partially trained parameter; exactly 0 outside it);
2. untouched entries: steps leave every frozen parameter and every non-selected channel bit-identical, and the
   buffers of models without train-mode BatchNorm too;
3. trajectories: 5 steps of SGD (momentum 0.9), and of AdamW (weight decay > 0) for the small models, give the
   losses, parameters and buffers of torch.optim in eager mode with the same parameters trainable
   (requires_grad off for the others; the gradient of a partially trained parameter masked before the step and
   its non-selected channels restored after it, since torch's decoupled weight decay shrinks all of them);
4. pruning: the backward of last(k)/head() runs no op of a module before the earliest trained layer, and with
   frozen BatchNorm a bias-only program has no batch-norm op (folded) and no convolution weight gradient.

Relative errors are max|x - ref| / max|ref| <= TOL = 1e-4 (fp32). A gradient that is 0 in exact arithmetic (BERT's
attention key bias: softmax ignores a shift shared by all keys) is rounding noise on both sides, so the error is
measured against max(max|ref|, NOISE * the largest gradient entry of the model); likewise a parameter that eager
moves by less than NOISE * the model's largest move must move as little in the trajectory.

Each (family, scheme, optimizer) case is compiled and run once (`_run`, cached); the tests read its findings.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

import pockengine as pe
from pockengine.ir.graph import PARAM
from pockengine.pipeline import optional_pass_names
from pockengine.scheme import Selection, gradient_masks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

aten = torch.ops.aten
TOL = 1e-4
NOISE = 1e-6
STEPS = 5


# ------------------------------------------------------------------------------------------------ families
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
                         nn.Linear(16, 4))


def _cnn() -> nn.Module:
    """conv-BN-ReLU, pool, depthwise conv-BN-ReLU6, pointwise conv-BN-ReLU, linear; 8x8 images."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 5))


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that frozen BatchNorm (folded) is not identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                   use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTForImageClassification(cfg).eval()


def _resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=3)
    return _with_bn_statistics(transformers.ResNetForImageClassification(cfg)).eval()


def _mobilenet_v2() -> nn.Module:
    from pockengine.models import mobilenet_v2

    model = mobilenet_v2(pretrained=True, num_classes=10).train()
    model.classifier[0].p = 0.0  # dropout off; BatchNorm is frozen by compile(freeze_batchnorm=True)
    return model


def _minilm() -> nn.Module:
    from pockengine.models import minilm_classifier

    return minilm_classifier(num_labels=2)[0].eval()


def _smollm2() -> nn.Module:
    from pockengine.models import smollm2

    return smollm2(max_layers=2)[0].eval()


def _images(size: int, classes: int, batch: int = 2) -> Callable[[torch.Generator], tuple]:
    return lambda g: ((torch.randn(batch, 3, size, size, generator=g),),
                      torch.randint(0, classes, (batch,), generator=g))


def _text_classification(vocab: int, classes: int, seq: int = 8) -> Callable[[torch.Generator], tuple]:
    def make(g: torch.Generator) -> tuple:
        ids = torch.randint(3, vocab, (2, seq), generator=g)
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 3:] = 0  # a padded sequence: the attention mask is on the gradient path
        ids[1, seq - 3:] = 0
        return ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, classes, (2,), generator=g))

    return make


def _tokens(vocab: int, seq: int = 8) -> Callable[[torch.Generator], tuple]:
    def make(g: torch.Generator) -> tuple:
        ids = torch.randint(0, vocab, (2, seq), generator=g)
        return ({"input_ids": ids}, ids)

    return make


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]
    loss: Callable
    partial: tuple[tuple[str, str, str], ...]  # (module glob, ratio, select) of the partial-channel rules
    last_k: int
    lr: float = 0.05  # SGD; AdamW uses lr / 10
    freeze_batchnorm: bool = False
    frozen_buffers: bool = True  # no train-mode BatchNorm: every buffer must stay as it is
    folds_batchnorm: bool = False  # convolutions followed by frozen BatchNorm: checked for folding
    schemes: tuple[str, ...] = ("bias_only", "last", "partial")


CE, LM = pe.losses.cross_entropy(), pe.losses.causal_lm()
FIRST, MAG = "first", "magnitude"
FAMILIES: dict[str, Family] = {
    "mlp": Family(_mlp, lambda g: ((torch.randn(6, 10, generator=g),), torch.randint(0, 4, (6,), generator=g)),
                  CE, (("2", "1/4", MAG), ("5", "1/2", FIRST)), last_k=2),
    # 4 is a depthwise convolution: its partial channels are along dim 0
    "cnn_frozen_bn": Family(lambda: _with_bn_statistics(_cnn()), _images(8, 5), CE,
                            (("4", "1/4", MAG), ("7", "1/2", FIRST), ("11", "1/2", MAG)), last_k=3,
                            freeze_batchnorm=True, folds_batchnorm=True),
    "cnn_train_bn": Family(lambda: _with_bn_statistics(_cnn()), _images(8, 5), CE,
                           (("4", "1/2", FIRST), ("7", "1/4", MAG), ("11", "1/2", MAG)), last_k=3,
                           frozen_buffers=False),
    "bert": Family(_bert, _text_classification(50, 3), CE,
                   (("bert.encoder.layer.0.attention.self.value", "1/4", FIRST),
                    ("bert.encoder.layer.1.intermediate.dense", "1/2", MAG), ("classifier", "1/2", MAG)), last_k=3),
    # Conv1D weights are (in, out): partial selects output features there. wte is tied to lm_head.
    "gpt2": Family(_gpt2, _tokens(50), LM,
                   (("transformer.h.0.attn.c_attn", "1/4", FIRST), ("transformer.h.1.mlp.c_proj", "1/2", MAG),
                    ("transformer.wte", "1/4", MAG)), last_k=3),
    "llama": Family(_llama, _tokens(50), LM,
                    (("model.layers.0.self_attn.k_proj", "1/4", MAG), ("model.layers.1.mlp.down_proj", "1/2", FIRST),
                     ("lm_head", "1/4", MAG)), last_k=4),
    "vit": Family(_vit, _images(8, 3), CE,
                  (("vit.layers.0.attention.v_proj", "1/4", MAG), ("vit.layers.1.mlp.fc1", "1/4", FIRST),
                   ("classifier", "1/2", MAG)), last_k=2),
    "resnet": Family(_resnet, _images(16, 3), CE,
                     (("resnet.encoder.stages.1.layers.0.layer.1.convolution", "1/4", MAG),
                      ("classifier.1", "1/2", FIRST)), last_k=4, folds_batchnorm=True),
    # features.2.conv.1.0 is a depthwise convolution: its channels are along dim 0. lr 1e-3: at 1e-2, five steps
    # already turn the rounding differences of two kernels into 1e-2 differences of some biases (eager NCHW against
    # eager channels-last, as ReLU6 clamps flip), so no comparison at 1e-4 would mean anything.
    "mobilenet_v2": Family(_mobilenet_v2, _images(64, 10), CE,
                           (("features.2.conv.1.0", "1/4", MAG), ("features.17.conv.2", "1/4", FIRST),
                            ("classifier.1", "1/2", MAG)), last_k=3, lr=0.001, freeze_batchnorm=True,
                           folds_batchnorm=True, schemes=("bias_only", "partial")),
    # the real transformers: one scheme (partial channels deep in the network, so the backward spans it)
    "minilm": Family(_minilm, _text_classification(30000, 2, seq=16), CE,
                     (("bert.encoder.layer.0.attention.self.query", "1/4", MAG),
                      ("bert.encoder.layer.5.output.dense", "1/4", FIRST), ("classifier", "1/2", MAG)),
                     last_k=3, lr=0.01, schemes=("partial",)),
    "smollm2": Family(_smollm2, _tokens(49152, seq=12), LM,
                      (("model.layers.0.self_attn.v_proj", "1/4", MAG), ("model.layers.1.mlp.down_proj", "1/4", FIRST)),
                      last_k=2, lr=0.01, schemes=("partial",)),
}
NO_BIAS = {"llama", "smollm2"}  # bias-only trains nothing there (tested to raise)
# The real pretrained models and the Hugging Face ones: marked slow (CI runs them; `-m "not slow"`, the fast tier,
# keeps the small MLP and CNNs).
SLOW_FAMILIES = {"bert", "gpt2", "llama", "vit", "resnet", "mobilenet_v2", "minilm", "smollm2"}


def _param(family: str, *values: Any, id: str | None = None, run: str | None = None) -> Any:
    """A test case of `family`, marked slow for the families of SLOW_FAMILIES. `run`: the scheme of the cached
    `_run(family, run)` the test reads; under pytest-xdist every test of one run goes to one worker, which compiles
    it once."""
    marks = [pytest.mark.slow] if family in SLOW_FAMILIES else []
    if run is not None:
        marks.append(pytest.mark.xdist_group(f"sparse_parity-{family}-{run}"))
    return pytest.param(family, *values, id=id, marks=marks)


def _scheme(family: str, name: str) -> pe.Scheme:
    fam = FAMILIES[family]
    if name == "bias_only":
        return pe.Scheme.bias_only()
    if name == "head":
        return pe.Scheme.head()
    if name == "last":
        return pe.Scheme.last(fam.last_k)
    rules = [{"modules": "*", "mode": "bias"}]  # then, overriding it, partial channels (and full biases) of a few
    rules += [{"modules": m, "mode": "partial", "ratio": r, "select": s} for m, r, s in fam.partial]
    return pe.Scheme.from_dict({"name": name, "rules": rules})


def _optimizer(kind: str, fam: Family) -> tuple[pe.optim.Optimizer, Callable]:
    if kind == "sgd":
        return (pe.optim.SGD(lr=fam.lr, momentum=0.9),
                lambda ps: torch.optim.SGD(ps, lr=fam.lr, momentum=0.9))
    lr = fam.lr / 10
    return (pe.optim.AdamW(lr=lr, weight_decay=0.1),
            lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, foreach=False))


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class Findings:
    trained: dict[str, Selection] = field(default_factory=dict)
    selection_errors: list[str] = field(default_factory=list)
    gradient_keys: set[str] = field(default_factory=set)
    gradient_errors: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)  # entries outside the scheme that a step changed
    trajectory_errors: list[str] = field(default_factory=list)
    backward_before_earliest: set[str] = field(default_factory=set)
    batchnorm_ops: list[str] = field(default_factory=list)
    weight_gradient_convs: list[str] = field(default_factory=list)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _selection_errors(model: nn.Module, fam: Family, trained: dict[str, Selection]) -> list[str]:
    """Each partial rule resolved as asked: the first k input channels, or the k of largest norm."""
    bad = []
    for module, ratio, select in fam.partial:
        weight = model.get_submodule(module).weight
        sel = trained[f"{module}.weight"]
        n = weight.shape[sel.dim]
        if sel.kind != "partial" or sel.dim != (1 if weight.shape[1] > 1 else 0):
            bad.append(f"{module}.weight: {sel}")
            continue
        k = round(float(Fraction(ratio)) * n)
        norms = weight.detach().transpose(0, sel.dim).reshape(n, -1).norm(dim=1)
        expected = tuple(range(k)) if select == FIRST else tuple(sorted(norms.topk(k).indices.tolist()))
        if sel.channels != expected:
            bad.append(f"{module}.weight: channels {sel.channels}, expected {expected}")
    return bad


def _untouched(model: nn.Module, before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None],
               frozen_buffers: bool, when: str) -> list[str]:
    bad = []
    for n, p in model.named_parameters():
        if n not in masks:
            if not torch.equal(p, before[n]):
                bad.append(f"{when}: frozen parameter {n} changed")
        elif masks[n] is not None and not torch.equal(p[~masks[n]], before[n][~masks[n]]):
            bad.append(f"{when}: non-selected channels of {n} changed")
    if frozen_buffers:
        bad += [f"{when}: buffer {n} changed" for n, b in model.named_buffers() if not torch.equal(b, before[n])]
    return bad


def _pruning(trainer: pe.Trainer, f: Findings, fam: Family, scheme: str) -> None:
    graph = trainer.program().graph
    if scheme in ("last", "head"):
        # The earliest trained layer starts at the first forward op reading one of its parameters (a folded
        # BatchNorm takes over the ops of its convolution, so module names alone cannot say where it starts).
        # Modules whose forward and loss ops all run before that op must have no backward op.
        layers = {name.rpartition(".")[0] for name in trainer.trained}
        params = {n for n in graph.inputs(PARAM) if n.module in layers}
        ops = [n for n in graph.nodes if not n.is_input and n.section in ("forward", "loss")]
        earliest = min(i for i, n in enumerate(ops) if params & set(n.inputs))
        last = {n.module: i for i, n in enumerate(ops)}
        before = {m for m, i in last.items() if i < earliest}
        f.backward_before_earliest = {n.module for n in graph.section("backward")} & before
    if scheme == "bias_only" and fam.folds_batchnorm:
        f.batchnorm_ops = sorted({n.op_name for n in graph.nodes if "batch_norm" in n.op_name})
        # convolution_backward(grad, input, weight, bias_sizes, ..., output_mask=[input, weight, bias])
        f.weight_gradient_convs = [f"%{n.name} ({n.module})" for n in graph.nodes
                                   if n.target is aten.convolution_backward.default and n.args[-1][1]]


def _gradient_errors(trainer: pe.Trainer, init: nn.Module, fam: Family, batch: tuple,
                     masks: dict[str, torch.Tensor | None]) -> list[str]:
    grads = trainer.gradients(batch)
    model = copy.deepcopy(init)
    names, params = zip(*model.named_parameters())
    loss = fam.loss(_call(model, batch[0]), batch[1])
    ref = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    ref = {n: torch.zeros_like(p) if ref[n] is None else ref[n] for n, p in zip(names, params)}
    noise = NOISE * max(r.abs().max().item() for r in ref.values())
    bad = []
    for n in trainer.trained:
        got, expected = grads[n], ref[n]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            bad.append(f"{n}: {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}")
            continue
        if masks[n] is not None:
            expected = expected * masks[n]
            if got[~masks[n]].abs().max() != 0:
                bad.append(f"{n}: nonzero outside the selected channels")
        if expected.abs().max() <= noise:  # 0 in exact arithmetic: the engine's must be as small
            if got.abs().max() > noise:
                bad.append(f"{n}: {got.abs().max().item():.2e} where autograd has ~0")
        elif (err := _rel(got, expected)) > TOL:
            bad.append(f"{n}: relative error {err:.2e}")
    return bad


def _eager(init: nn.Module, loss_fn: Callable, trained: dict[str, Selection], batches: list, make_opt: Callable,
           dtype: torch.dtype | None = None, gradient_peaks: dict[str, torch.Tensor] | None = None,
           optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None) -> tuple[nn.Module, list[float]]:
    """The same training in PyTorch eager: the trained parameters (only) require grad and are the optimizer's
    parameters; a partially trained one has its gradient masked before the step and its other channels put back
    after it (decoupled weight decay would shrink them: torch knows no channel selection). `dtype`: the model and
    the batches' floating tensors cast to it first (float64: the reference the ONNX parity measures float32
    against). `gradient_peaks`, if given, gets each trained parameter's largest |gradient| per entry over the
    steps, `optimizer_state` torch.optim's state of each at the end (`{name: {"momentum_buffer": ...}}`)."""
    model = copy.deepcopy(init) if dtype is None else copy.deepcopy(init).to(dtype)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trained)
    masks = {n: m.to(params[n].device) for n, m in gradient_masks(model, trained).items() if m is not None}
    opt = make_opt([params[n] for n in trained])
    losses = []
    for inputs, target in batches:
        if dtype is not None:
            inputs, target = tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, (inputs, target))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(_call(model, inputs), target)
        loss.backward()
        losses.append(loss.item())
        for n, m in masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)
        if gradient_peaks is not None:
            for n in trained:
                g = torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.abs()
                gradient_peaks[n] = torch.maximum(gradient_peaks[n], g) if n in gradient_peaks else g
        kept = {n: params[n].detach().clone() for n in masks}
        opt.step()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].copy_(torch.where(m, params[n], kept[n]))
    if optimizer_state is not None:
        optimizer_state.update({n: dict(opt.state[params[n]]) for n in trained})
    return model, losses


@functools.cache
def _run(family: str, scheme: str, opt: str = "sgd", device: str = "cpu", disable: frozenset[str] = frozenset(),
         ) -> Findings:
    """Compile `family` under `scheme` on `device` (without the passes in `disable`), check its gradients (SGD
    runs only) and program, run 5 steps against eager PyTorch on the same device; returns what went wrong (cached:
    several tests read one run)."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.build().to(device)  # built on the CPU: the same weights on every device
    g = torch.Generator().manual_seed(0)
    batches = [tree_map(lambda t: t.to(device), fam.batch(g)) for _ in range(STEPS)]
    optimizer, make_ref_opt = _optimizer(opt, fam)
    trainer = pe.compile(model, fam.loss, batches[0], optimizer=optimizer, scheme=_scheme(family, scheme),
                         freeze_batchnorm=fam.freeze_batchnorm, disable=disable)
    # The eager reference starts from the compiled model: BatchNorm in the mode the trainer set, weights in the
    # layout it runs (channels-last for convolution models). Eager in another layout uses other kernels, and on
    # the real MobileNetV2 5 steps amplify their rounding differences to 1e-2 (eager against eager).
    init = copy.deepcopy(model)
    before = _snapshot(model)
    masks = {n: None if m is None else m.to(device) for n, m in gradient_masks(model, trainer.trained).items()}
    f = Findings(trained=dict(trainer.trained))
    if scheme == "partial":
        f.selection_errors = _selection_errors(model, fam, trainer.trained)

    if opt == "sgd":  # 1. gradients (no update) and 4. the program
        f.gradient_keys = set(trainer.gradients(batches[0]))
        f.gradient_errors = _gradient_errors(trainer, init, fam, batches[0], masks)
        _pruning(trainer, f, fam, scheme)

    # 2. and 3. steps
    losses = []
    for i, batch in enumerate(batches):
        losses.append(trainer.step(batch))
        if i == 0:
            f.touched += _untouched(model, before, masks, fam.frozen_buffers, "after step 1")
    f.touched += _untouched(model, before, masks, fam.frozen_buffers, f"after step {STEPS}")
    ref_model, ref_losses = _eager(init, fam.loss, trainer.trained, batches, make_ref_opt)
    if any(abs(a - b) > TOL * abs(b) for a, b in zip(losses, ref_losses)):
        f.trajectory_errors.append(f"losses {losses} != eager {ref_losses}")
    ref_state = dict([*ref_model.named_parameters(), *ref_model.named_buffers()])
    # A parameter whose gradient is 0 in exact arithmetic (an attention key bias) moves by rounding noise only,
    # different on each side: a move below NOISE of the model's largest counts as none, and the engine's must
    # then be as small.
    move = {n: (ref_state[n].detach() - before[n]).abs().max().item() for n in trainer.trained}
    noise = NOISE * max(move.values())
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        r = ref_state[n].detach()
        if not t.is_floating_point():
            if not torch.equal(t, r):
                f.trajectory_errors.append(f"{n}: {t.tolist()} != eager {r.tolist()}")
        elif move.get(n, 1.0) <= noise:
            if (t.detach() - before[n]).abs().max() > noise:
                f.trajectory_errors.append(f"{n}: moved {(t.detach() - before[n]).abs().max():.2e} where eager "
                                           f"moved by rounding noise only")
        elif (err := _rel(t.detach(), r)) > TOL:
            f.trajectory_errors.append(f"{n}: relative error {err:.2e} after {STEPS} steps")
    # the comparison means something only if training moved the parameters
    moved = max(_rel(ref_state[n].detach(), before[n]) for n in trainer.trained)
    if moved < 1e-3:
        f.trajectory_errors.append(f"training barely moved the parameters ({moved:.1e}); raise the learning rate")
    return f


# ------------------------------------------------------------------------------------------------ tests
CASES = [_param(family, scheme, id=f"{family}-{scheme}", run=scheme)
         for family, fam in FAMILIES.items() for scheme in fam.schemes
         if not (scheme == "bias_only" and family in NO_BIAS)]
# AdamW turns a gradient that is 0 in exact arithmetic (a convolution bias before train-mode BatchNorm, BERT's key
# bias) into steps of about lr with the sign of the rounding noise, so it is compared on models without such.
ADAMW_CASES = [c for c in CASES if c.values[0] in ("mlp", "cnn_frozen_bn")]


@pytest.mark.parametrize("family, scheme", CASES)
def test_gradients_match_autograd(family, scheme):
    f = _run(family, scheme)
    assert f.gradient_keys == set(f.trained), "trainer.gradients must hold exactly the trained parameters"
    assert not f.gradient_errors, "\n".join(f.gradient_errors)


@pytest.mark.parametrize("family, scheme", CASES)
def test_steps_never_touch_entries_outside_the_scheme(family, scheme):
    f = _run(family, scheme)
    assert not f.touched, "\n".join(f.touched)


@pytest.mark.parametrize("family, scheme", CASES)
def test_sgd_trajectory_matches_eager(family, scheme):
    f = _run(family, scheme)
    assert not f.trajectory_errors, "\n".join(f.trajectory_errors)


@pytest.mark.parametrize("family, scheme", ADAMW_CASES)
def test_adamw_trajectory_matches_eager(family, scheme):
    f = _run(family, scheme, "adamw")
    assert not f.touched, "\n".join(f.touched)
    assert not f.trajectory_errors, "\n".join(f.trajectory_errors)


# Each pass switched off in turn: every pass is an optimization, so the program must still train exactly as eager
# does. One convolution family with frozen BatchNorm (fold, layout, masks, micro-batches, matmul), one with
# train-mode BatchNorm (buffer copy-back), BERT (clones, recompute) and GPT-2 (tied weights).
@pytest.mark.slow
@pytest.mark.parametrize("off", optional_pass_names())
@pytest.mark.parametrize("family", ["cnn_frozen_bn", "cnn_train_bn", "bert", "gpt2"])
def test_every_pass_can_be_switched_off(family, off):
    f = _run(family, "partial", disable=frozenset({off}))
    assert f.gradient_keys == set(f.trained)
    assert not f.gradient_errors, "\n".join(f.gradient_errors)
    assert not f.touched, "\n".join(f.touched)
    assert not f.trajectory_errors, "\n".join(f.trajectory_errors)


@pytest.mark.parametrize("family, scheme", [c for c in CASES if c.values[1] == "partial"])
def test_partial_rules_select_the_channels_they_ask_for(family, scheme):
    f = _run(family, scheme)
    assert not f.selection_errors, "\n".join(f.selection_errors)
    partial = [s for s in f.trained.values() if s.kind == "partial"]
    # both update paths: a prefix (a view of the parameter) and scattered channels (gather, update, put back)
    assert any(s.is_prefix for s in partial) and not all(s.is_prefix for s in partial)


@pytest.mark.parametrize("family, scheme", [c for c in CASES if c.values[1] == "last"])
def test_last_k_backward_stops_at_the_earliest_trained_layer(family, scheme):
    f = _run(family, scheme)
    assert not f.backward_before_earliest, (f"backward ops of modules before the earliest trained layer: "
                                            f"{sorted(f.backward_before_earliest)}")


@pytest.mark.parametrize("family", [_param(name, run="bias_only") for name, fam in FAMILIES.items()
                                    if fam.folds_batchnorm])
def test_bias_only_with_frozen_batchnorm_folds_it_and_computes_no_weight_gradient(family):
    f = _run(family, "bias_only")
    assert not f.batchnorm_ops, f"BatchNorm left in the program: {f.batchnorm_ops}"
    assert not f.weight_gradient_convs, f"convolution weight gradients computed: {f.weight_gradient_convs}"


@pytest.mark.parametrize("family", [_param(f) for f in ("mlp", "cnn_frozen_bn", "bert", "gpt2", "llama", "vit",
                                                         "resnet")])
def test_head_backward_stops_at_the_head(family):
    fam = FAMILIES[family]
    torch.manual_seed(0)
    trainer = pe.compile(fam.build(), fam.loss, fam.batch(torch.Generator().manual_seed(0)), scheme=pe.Scheme.head(),
                         freeze_batchnorm=fam.freeze_batchnorm)
    assert len({n.rpartition(".")[0] for n in trainer.trained}) == 1
    f = Findings(trained=dict(trainer.trained))
    _pruning(trainer, f, fam, "head")
    assert not f.backward_before_earliest, sorted(f.backward_before_earliest)


@pytest.mark.parametrize("family", [_param(f) for f in sorted(NO_BIAS - {"smollm2"})])
def test_bias_only_on_a_model_without_biases_is_an_error(family):
    fam = FAMILIES[family]
    torch.manual_seed(0)
    with pytest.raises(pe.UserInputError, match="trains no parameter"):
        pe.compile(fam.build(), fam.loss, fam.batch(torch.Generator().manual_seed(0)), scheme=pe.Scheme.bias_only())


@pytest.mark.parametrize("memory_format", ["preserve", "auto"])
@pytest.mark.parametrize("family, module, select", [_param("cnn_frozen_bn", "0", FIRST),
                                                     _param("vit", "vit.embeddings.patch_embeddings.projection", MAG)])
def test_partial_channels_of_the_first_convolution(family, module, select, memory_format):
    """The layer reading the image batch, partially trained: its saved input is a slice of the batch itself, taken
    after the channels-last pass has converted the batch (memory_format="auto")."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.build()
    g = torch.Generator().manual_seed(0)
    batch = fam.batch(g)
    init = copy.deepcopy(model).eval() if fam.freeze_batchnorm else copy.deepcopy(model)
    scheme = pe.Scheme.from_dict({"rules": [{"modules": module, "mode": "partial", "ratio": "1/2", "select": select}]})
    trainer = pe.compile(model, fam.loss, batch, optimizer=pe.optim.SGD(lr=fam.lr), scheme=scheme,
                         freeze_batchnorm=fam.freeze_batchnorm, memory_format=memory_format)
    masks = gradient_masks(model, trainer.trained)
    assert masks[f"{module}.weight"] is not None
    assert not _gradient_errors(trainer, init, fam, batch, masks)
    before = _snapshot(model)
    trainer.step(batch)
    assert not _untouched(model, before, masks, True, "after a step")
