"""Run one zoo entry in one mode under every scheme and say, per scheme, whether pockengine's gradients match.

`check(name, mode)` builds the model, puts it in `mode` ("eval" or "train": dropout, drop-path and every other
random op active), captures it once and compiles it under each scheme of SCHEMES from that one capture (capture is
most of a compile), then compares `trainer.gradients(batch)` with torch.autograd's
(`parity.gradient_errors`).

The reference in eval mode is autograd over the eager model. In train mode the two sides must draw the same random
values, so the reference is autograd over the program pockengine compiles from, the exported and decomposed
model with its loss (`torch.export(...).run_decompositions(...).module()`, as `pockengine.capture.export` makes it),
with its random ops drawing as pockengine's do: every one (`native_dropout`, `rand` of drop-path and layer-drop,
`bernoulli`...) calls what pockengine's program calls for it (`seeded_target`: its overload taking a generator, or
pockengine's own dropout) on one generator seeded with the trainer's seed, in program order; torch's global generator
plays no part. The values drawn are recorded and replayed in the float64 rerun.
Eval mode checks the capture against the eager model; train mode checks autodiff with randomness on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

import pockengine as pe
import pockengine.trainer
from pockengine.backend.torch_codegen import seeded_target
from pockengine.capture.export import _ModelWithLoss, export, from_exported, normalize_batch
from pockengine.capture.kernel_layouts import views_tolerate_kernel_layouts
from pockengine.errors import CaptureError
from pockengine.ir.ops import draws_random
from pockengine.scheme import gradient_masks

from model_zoo import ZOO, Entry
from model_zoo.parity import Gradients, autograd_gradients, float64_gradients, gradient_errors, ill_conditioned

aten = torch.ops.aten
SCHEMES = ("full", "bias_only", "last2", "partial")
MODES = ("eval", "train")
SEED = 0
PASS, FAIL, NA, EXPORT, ILL = "pass", "fail", "n/a", "torch.export", "ill-conditioned"


@dataclass(frozen=True)
class Outcome:
    # PASS, FAIL, NA (the scheme trains nothing there), EXPORT (torch.export cannot capture it) or ILL (fp32 autograd
    # itself is far from float64: nothing to check against, parity.ill_conditioned)
    status: str
    reason: str = ""

    def __str__(self) -> str:
        return self.status + (f": {self.reason}" if self.reason else "")


def partial_rules(model: nn.Module) -> list[dict]:
    """Every bias, and partial input channels of three layers with a matrix or convolution weight (the first, the
    middle and the last one in registration order; embeddings excluded, and layers of under 3 channels, where 1/4
    selects none): 1/2 `first`, 1/4 and 1/2 `magnitude`."""
    def channels(t: torch.Tensor) -> int:  # along the dimension partial training selects (pockengine.scheme)
        return t.shape[1] if t.shape[1] > 1 else t.shape[0]

    layers = [n for n, m in model.named_modules() if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and any(
        "weight" in p and t.dim() >= 2 and channels(t) >= 3 for p, t in m.named_parameters(recurse=False))]
    picks = dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]])
    kinds = [("1/2", "first"), ("1/4", "magnitude"), ("1/2", "magnitude")]
    return [{"modules": "*", "mode": "bias"}] + [
        {"modules": layer, "mode": "partial", "ratio": ratio, "select": select}
        for layer, (ratio, select) in zip(picks, kinds)]


def make_scheme(name: str, model: nn.Module) -> pe.Scheme:
    if name == "full":
        return pe.Scheme.full()
    if name == "bias_only":
        return pe.Scheme.bias_only()
    if name == "last2":
        return pe.Scheme.last(2)
    return pe.Scheme.from_dict({"name": "partial", "rules": partial_rules(model)})


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."


def describe(e: BaseException) -> str:
    """A failure in one line: a missing rule as the op and its module, anything else as type and first line."""
    if isinstance(e, pe.errors.MissingVJPError) and (m := re.search(r"no VJP rule for (\S+) \(node \S+, module "
                                                                    r"'([^']*)'", str(e))):
        return f"missing VJP rule {m[1]} ({m[2] or 'loss'})"
    return f"{type(e).__name__}: {_first_line(e)}"


# ------------------------------------------------------------------------------------------------ references
class _RandomDraws:
    """Wraps the random ops (tag nondeterministic_seeded) of an exported program: they draw as pockengine's
    compiled program does, from one generator seeded with `seed` in program order, and record what they drew;
    `replay()` makes the next run use the recorded values."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: list[torch.Tensor] = []
        self.replaying: list[torch.Tensor] | None = None

    def replay(self) -> None:
        self.replaying = list(self.drawn)

    def wrap(self, op: torch._ops.OpOverload, seeded: Callable) -> Callable:
        def random_op(*args: Any, **kwargs: Any) -> Any:
            dropout = op is aten.native_dropout.default  # recorded as its mask: the output is of this run's input
            if self.replaying is not None:
                drawn = self.replaying.pop(0)
                if not dropout:
                    return drawn
                x, p, train = args
                return (x * drawn * (1 / (1 - p)) if train and 0 < p < 1 else x * drawn), drawn
            out = seeded(*args, **{**kwargs, "generator": self.generator})
            self.drawn.append(out[1] if dropout else out)
            return out

        return random_op


def _functional_copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    return src.to(dst.dtype).expand_as(dst).clone()


def _exported_reference(model: nn.Module, ep: torch.export.ExportedProgram, loss_fn: Callable, batch: tuple
                        ) -> tuple[Gradients, Callable[[], Gradients]]:
    """autograd over `ep` with pockengine's random draws (see the module docstring), and its float64 rerun."""
    if any(n.target is aten.scaled_dot_product_attention.default for n in ep.graph.nodes):
        # pockengine keeps attention whole and differentiates it in its math form, where dropout is a native_dropout
        # drawn from the trainer's generator; the reference runs the same math form.
        with sdpa_kernel(SDPBackend.MATH):
            ep = ep.run_decompositions(torch.export.default_decompositions())
        views_tolerate_kernel_layouts(ep.graph_module)  # retraced: its views again trust the fake strides
    program = ep.module()
    draws = _RandomDraws(SEED)
    for node in list(program.graph.nodes):
        if node.op != "call_function":
            continue
        if draws_random(node.target):
            seeded = seeded_target(node.target, node.args, node.kwargs, f"node {node.name}")
            if seeded is not None:
                node.target = draws.wrap(node.target, seeded)
        elif node.target is aten.copy.default:
            # The functional copy (a value written into a slice: RWKV's state, DeepSeek's rope) has no autograd
            # formula; the same values with one: src broadcast to dst's shape and dtype.
            node.target = _functional_copy
        elif node.target is aten.copy_.default and node.args[0].op == "get_attr":
            # Train-mode BatchNorm's new running statistics written into its buffers: autograd keeps the old ones
            # for batch_norm's backward, and the reference has no use for the new ones.
            program.graph.erase_node(node)
    program.recompile()
    # Parameters by the model's names; tied ones (one tensor under several names) get the sum over their copies.
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    names = {n: aliases[id(p)] for n, p in model.named_parameters()}

    def gradients(program: torch.fx.GraphModule, inputs: Any) -> Gradients:
        copies = {n: list({id(q): q for q in (program.get_parameter(f"model.{a}") for a in al)}.values())
                  for n, al in names.items()}
        flat = [q.requires_grad_(True) for qs in copies.values() for q in qs]
        loss = program(inputs, batch[1])
        grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
        out = {}
        for n, qs in copies.items():
            gs = [next(grads) for _ in qs]
            out[n] = sum((torch.zeros_like(q) if g is None else g for q, g in zip(qs, gs)), torch.zeros_like(qs[0]))
        return out

    ref = gradients(program, batch[0])

    @functools.cache
    def exact() -> Gradients:
        draws.replay()
        program64 = copy.deepcopy(program).double()  # the program shares its parameters with the model
        for node in list(program64.graph.nodes):  # tensors the program creates in fp32 (zeros filled by index_put)
            if node.kwargs.get("dtype") == torch.float32:
                node.kwargs = {**node.kwargs, "dtype": torch.float64}
            elif node.target is aten._assert_tensor_metadata.default:  # export's checks that a value is float32
                program64.graph.erase_node(node)
        program64.recompile()
        return gradients(program64, tree_map(lambda t: t.double() if torch.is_floating_point(t) else t, batch[0]))

    return ref, exact


@contextlib.contextmanager
def _gradient_programs(cap: pockengine.capture.Captured) -> Iterator[None]:
    """Trainers built inside this context start from `cap` instead of capturing again (a trainer compiles from
    copies of its capture), and compile only the program `trainer.gradients` runs, not the training step
    (`compile` builds it first; its updates are checked against torch.optim by tests/test_sparse_parity.py): the
    zoo's time goes to its gradients."""
    build = pockengine.trainer.Trainer._build

    def gradients_only(self: pe.Trainer, batch: Any, updates: bool, *args: Any, **kwargs: Any) -> Any:
        return None if updates else build(self, batch, updates, *args, **kwargs)

    with mock.patch.object(pockengine.trainer, "capture", lambda model, loss_fn, batch: cap), \
            mock.patch.object(pockengine.trainer.Trainer, "_build", gradients_only):
        yield


# ------------------------------------------------------------------------------------------------ the check
def _export_failure(model: nn.Module, entry: Entry, batch: tuple, error: CaptureError) -> Outcome:
    """EXPORT when torch.export alone (no pockengine) fails on the model with its loss as well, else FAIL."""
    try:
        torch.export.export(_ModelWithLoss(model, entry.loss), normalize_batch(batch))
    except Exception as e:  # noqa: BLE001 -- any failure of torch.export is its limit
        return Outcome(EXPORT, describe(e))
    return Outcome(FAIL, describe(error))


def _check_scheme(model: nn.Module, entry: Entry, batch: tuple, scheme: pe.Scheme, ref: Gradients,
                  exact: Callable[[], Gradients]) -> Outcome:
    try:
        if not scheme.resolve(model):
            return Outcome(NA, "trains no parameter (the model has no biases)")
        trainer = pe.compile(model, entry.loss, batch, scheme=scheme, seed=SEED)
        grads = trainer.gradients(batch)
    except Exception as e:  # noqa: BLE001 -- every failure is reported, with its type
        return Outcome(FAIL, describe(e))
    if grads.keys() != trainer.trained.keys():
        return Outcome(FAIL, f"gradients for {sorted(grads)} but the scheme trains {sorted(trainer.trained)}")
    masks = gradient_masks(model, trainer.trained)
    consulted = []  # whether the comparison needed float64: then whether it can be trusted decides the outcome

    def consult_exact() -> Gradients:
        consulted.append(True)
        return exact()

    bad = gradient_errors(grads, ref, consult_exact, masks)
    if consulted and all(g.isfinite().all() for g in grads.values()) and (why := ill_conditioned(ref, exact)):
        return Outcome(ILL, why)
    if bad:
        return Outcome(FAIL, "wrong gradient: " + "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)"
                                                                         if len(bad) > 3 else ""))
    return Outcome(PASS)


def check(name: str, mode: str, schemes: tuple[str, ...] = SCHEMES) -> Iterator[tuple[str, Outcome]]:
    """(scheme, Outcome) of zoo entry `name` in `mode`, for each of `schemes` as soon as it is known."""
    entry = ZOO[name]
    model = entry.build()
    getattr(model, mode)()
    batch = entry.batch()
    try:
        ep = export(model, entry.loss, batch)
    except CaptureError as e:
        failure = _export_failure(model, entry, batch, e)
        yield from ((s, failure) for s in schemes)
        return
    try:
        cap = from_exported(model, ep)
    except Exception as e:  # noqa: BLE001
        yield from ((s, Outcome(FAIL, describe(e))) for s in schemes)
        return
    try:
        if mode == "eval":
            reference = copy.deepcopy(model)
            ref = autograd_gradients(reference, entry.loss, batch)[1]
            exact = functools.cache(lambda: float64_gradients(reference, entry.loss, batch))
        else:
            ref, exact = _exported_reference(model, ep, entry.loss, batch)
    except Exception as e:  # noqa: BLE001
        yield from ((s, Outcome(FAIL, f"the autograd reference failed: {describe(e)}")) for s in schemes)
        return
    with _gradient_programs(cap):
        for s in schemes:
            yield s, _check_scheme(model, entry, batch, make_scheme(s, model), ref, exact)


# ------------------------------------------------------------------------------------------------ in a child process
def check_isolated(name: str, cells: list[tuple[str, str]]) -> dict[tuple[str, str], Outcome]:
    """{(mode, scheme): Outcome} for `cells` of entry `name`, run in child processes: a crash (a kernel's
    segmentation fault) is the outcome of the cell it happened in, and a new child goes on with the rest."""
    results: dict[tuple[str, str], Outcome] = {}
    while len(results) < len(cells):
        todo = [c for c in cells if c not in results]
        proc = subprocess.run([sys.executable, __file__, name, *(f"{m}:{s}" for m, s in todo)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                results[d["mode"], d["scheme"]] = Outcome(d["status"], d["reason"])
        if proc.returncode != 0:
            crashed = next(c for c in todo if c not in results)
            last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
            results[crashed] = Outcome(FAIL, f"the process died (exit code {proc.returncode}) {last}".strip())
    return results


def _child(name: str, cells: list[str]) -> None:
    for mode in MODES:
        schemes = tuple(s for m, _, s in (c.partition(":") for c in cells) if m == mode)
        if schemes:
            for scheme, outcome in check(name, mode, schemes):
                print(json.dumps({"mode": mode, "scheme": scheme, "status": outcome.status,
                                  "reason": outcome.reason}), flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    _child(sys.argv[1], sys.argv[2:])
