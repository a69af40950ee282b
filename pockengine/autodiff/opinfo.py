"""PyTorch's OpInfo database as a second oracle for the VJP rules.

Every differentiable op of `torch.testing._internal.common_methods_invocations.op_db` that runs in fp32 on the CPU
is run on its first few sample inputs through pockengine: a tiny module whose parameters are the sample's float
tensors (the other tensors are buffers), loss = sum over the float outputs of (out * fixed random weights).sum(), so
that every output element matters, compiled with `pe.compile(..., scheme=pe.Scheme.full())` and differentiated with
`Trainer.gradients`. The gradients are compared with torch.autograd's on a copy of the module.

Each (op, sample) lands in one category:

- `pass`: every gradient within TOL (relative error) of autograd's, or, where fp32 autograd is itself further than
  TOL from float64 autograd, at most as far from float64 autograd as fp32 autograd is (times SLACK);
- `no rule`: `MissingVJPError` (an op of the captured graph has no rule);
- `refused`: another `PockEngineError` (torch.export cannot capture it: `CaptureError`; a bad input...);
- `wrong`: a gradient outside the tolerance;
- `crash`: any other exception, from inside pockengine.

`through="graph"` skips the trainer (its passes, optimizer and second capture): capture -> differentiate ->
generated code, as tests/test_vjp_rules.py does, at about half the cost (tests/test_opinfo.py).

Samples that autograd cannot differentiate, without a float output that depends on a float input, with complex
tensors, or whose program draws random numbers (an op tagged `nondeterministic_seeded`) are not counted. An op's
category is that of its worst sample (crash > wrong > refused > no rule > pass).

`python -m pockengine.autodiff.opinfo` (or `python scripts/opinfo_coverage.py`) prints the counts and the most
frequent missing rules as markdown.
"""

from __future__ import annotations

import copy
import gc
import re
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pockengine.errors import MissingVJPError, PockEngineError
from pockengine.ir.ops import draws_random

TOL = 1e-4  # relative error, fp32
SLACK = 2.0  # how much further from float64 than fp32 autograd pockengine may be, where autograd is past TOL
TINY = 1e-12
SAMPLES = 3  # samples per op
CATEGORIES = ("pass", "no rule", "refused", "wrong", "crash")
_SEVERITY = {c: i for i, c in enumerate(CATEGORIES)}


@dataclass
class Outcome:
    category: str
    detail: str = ""  # the missing op, the error, the relative error


@dataclass
class OpResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def category(self) -> str | None:
        """The worst outcome over the samples; None when no sample counted."""
        return max((o.category for o in self.outcomes), key=_SEVERITY.__getitem__, default=None)

    @property
    def worst(self) -> Outcome | None:
        return next((o for o in self.outcomes if o.category == self.category), None)


def differentiable_ops() -> list:
    """The OpInfos of op_db that support autograd in fp32 on the CPU."""
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_autograd and torch.float32 in op.supported_dtypes("cpu")]


class SampleModule(nn.Module):
    """forward() = op(*sample) with the sample's float tensors as parameters p0, p1, ... and other tensors as
    buffers b0, b1, ...: Scheme.full() trains exactly the inputs autograd differentiates."""

    def __init__(self, op: Any, leaves: list, spec: Any, process: Any):
        super().__init__()
        self.op, self.spec, self.process = op, spec, process
        self.slots: list[tuple[str, Any]] = []  # per leaf: ("param"|"buffer", name) or ("const", value)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad:
                name = f"p{len(self._parameters)}"
                self.register_parameter(name, nn.Parameter(leaf.detach().clone()))
                self.slots.append(("attr", name))
            elif isinstance(leaf, torch.Tensor):
                name = f"b{len(self._buffers)}"
                self.register_buffer(name, leaf.detach().clone(), persistent=False)
                self.slots.append(("attr", name))
            else:
                self.slots.append(("const", leaf))

    def forward(self) -> Any:
        leaves = [getattr(self, v) if kind == "attr" else v for kind, v in self.slots]
        inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.process(self.op(inp, *args, **kwargs))


def _float_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def weighted_loss(out: Any, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """sum_k (out_k * w_k).sum() over the float outputs: every output element reaches the loss."""
    loss = None
    for o, w in zip(_float_outputs(out), weights):
        term = (o * w).sum()
        loss = term if loss is None else loss + term
    return loss


def _rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    g, ref = g.double(), ref.double()
    diff = (g - ref).abs()
    both_nan = g.isnan() & ref.isnan()
    same_inf = g.isinf() & (g == ref)
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    if diff.isnan().any():
        return float("inf")
    finite = ref[ref.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return diff.max().item() / max(scale, TINY)


def _autograd(model: nn.Module, weights: tuple, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).to(dtype)
    names, params = zip(*model.named_parameters())
    loss = weighted_loss(model(), tuple(w.to(dtype) for w in weights))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def _missing_op(e: MissingVJPError) -> str:
    """The op the error names: 'no VJP rule for OP ...', or a rule's own refusal 'OP (node ...): ...'."""
    m = re.search(r"no VJP rule for (\S+)", str(e)) or re.match(r"(\S+)", str(e))
    return m.group(1) if m else type(e).__name__


def _is_random(ops: Iterable) -> bool:
    """Whether the program draws random numbers (dropout...): pockengine draws from its own generator, so its
    values cannot match eager's (OpInfo's wrappers reseed the global one)."""
    return any(draws_random(op) for op in ops)


def _graph_gradients(model: nn.Module, batch: tuple) -> dict[str, torch.Tensor] | None:
    """capture -> differentiate -> generated code, without the trainer's passes, optimizer and second capture;
    None for a random program."""
    from pockengine.autodiff import differentiate
    from pockengine.backend import CompiledProgram
    from pockengine.capture import capture
    from pockengine.ir.graph import eliminate_dead_code

    cap = capture(model, weighted_loss, batch)
    graph = cap.graph
    if _is_random(n.target for n in graph.nodes):
        return None
    grads = differentiate(graph, cap.loss, list(cap.params.values()))
    graph.outputs = {"loss": cap.loss, **{name: g for name, node in cap.params.items()
                                          if (g := grads[node]) is not None}}
    eliminate_dead_code(graph)
    values = {node: model.get_parameter(name) for name, node in cap.params.items()}
    values.update({node: model.get_buffer(name) for name, node in cap.buffers.items()})
    values.update(graph.constants)
    values.update(zip(cap.batch, pytree.tree_leaves(batch)))
    program = CompiledProgram(graph, graph.inputs(), check_finite=None)
    with torch.no_grad():
        out = program(*[values[n] for n in graph.inputs()])
    return {name: g for name, g in zip(program.output_names, out) if name != "loss"}


def check_sample(op: Any, sample: Any, through: str = "trainer") -> Outcome | None:
    """The outcome of one sample, or None when it does not count (see the module docstring)."""
    import pockengine as pe

    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    if any(isinstance(t, torch.Tensor) and t.is_complex() for t in leaves):
        return None
    model = SampleModule(op.op, leaves, spec, sample.output_process_fn_grad)
    if not any(True for _ in model.parameters()):
        return None
    try:
        with torch.no_grad():
            out = model()
        outs = _float_outputs(out)
        complex_out = any(isinstance(t, torch.Tensor) and t.is_complex() for t in pytree.tree_leaves(out))
        if not outs or complex_out:
            return None
        gen = torch.Generator().manual_seed(1)
        weights = tuple(torch.randn(o.shape, generator=gen) for o in outs)
        ref = _autograd(model, weights, torch.float32)
    except Exception:  # autograd itself cannot differentiate this sample: nothing to compare with
        return None
    batch = ((), weights)
    try:
        if through == "trainer":
            trainer = pe.compile(model, weighted_loss, batch, scheme=pe.Scheme.full())
            grads = trainer.gradients(batch)
            if _is_random(n.target for n in trainer.program(gradients=True).graph.nodes):
                return None
        else:
            grads = _graph_gradients(model, batch)
            if grads is None:
                return None
    except MissingVJPError as e:
        return Outcome("no rule", _missing_op(e))
    except PockEngineError as e:
        return Outcome("refused", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:200]} ({tb.filename.split('site-packages/')[-1]}:"
                                f"{tb.lineno})")
    worst = 0.0
    for name, r in ref.items():
        g = grads.get(name)
        g = torch.zeros_like(r) if g is None else g
        if g.shape != r.shape:
            return Outcome("wrong", f"{name}: shape {tuple(g.shape)} instead of {tuple(r.shape)}")
        err = _rel_err(g, r)
        if err > TOL:  # fp32 autograd may itself be that far from the exact gradient: compare both with float64
            exact = _autograd(model, weights, torch.float64)[name]
            err = _rel_err(g, exact) / (SLACK * max(_rel_err(r, exact), TOL / SLACK)) * TOL
        worst = max(worst, err)
    if worst > TOL:
        return Outcome("wrong", f"relative error {worst:.2e}")
    return Outcome("pass")


def check_op(op: Any, samples: int = SAMPLES, through: str = "trainer") -> OpResult:
    """The outcomes of the first `samples` counted samples of `op`; stops at the first sample without a rule."""
    result = OpResult(op.name if not op.variant_test_name else f"{op.name}.{op.variant_test_name}")
    try:
        torch.manual_seed(0)  # OpInfo draws the samples' values: the same ones whichever ops were checked before
        sample_iter = iter(op.sample_inputs("cpu", torch.float32, requires_grad=True))
        while len(result.outcomes) < samples:
            sample = next(sample_iter, None)
            if sample is None:
                break
            torch.manual_seed(0)
            outcome = check_sample(op, sample, through)
            if outcome is not None:
                result.outcomes.append(outcome)
                if outcome.category == "no rule":
                    break
    except Exception:  # OpInfo's own sample generator failed: nothing to compare with
        pass
    return result


def run(ops: Iterable | None = None, samples: int = SAMPLES, through: str = "trainer") -> list[OpResult]:
    return [check_op(op, samples, through) for op in (differentiable_ops() if ops is None else ops)]


def report(results: list[OpResult], samples: int = SAMPLES, top: int = 25) -> str:
    """A markdown section: the counts per category, the most frequent missing rules, every wrong or crash."""
    counted = [r for r in results if r.category is not None]
    counts = Counter(r.category for r in counted)
    lines = [f"{len(results)} differentiable fp32 ops in `op_db`, {len(counted)} with at least one sample that "
             f"autograd differentiates (first {samples} such samples each; an op counts as its worst sample):", "",
             "| category | ops |", "|---|---|"]
    lines += [f"| {c} | {counts.get(c, 0)} |" for c in CATEGORIES]
    missing = Counter(r.worst.detail for r in counted if r.category == "no rule")
    lines += ["", "Most frequent missing rules (ops of `op_db` whose graph stops at them):", "",
              "| ATen op | ops |", "|---|---|"]
    lines += [f"| `{name}` | {n} |" for name, n in missing.most_common(top)]
    refused = Counter(r.worst.detail.split(":")[0] for r in counted if r.category == "refused")
    if refused:
        lines += ["", "Refused cleanly: " + ", ".join(f"{n} x `{k}`" for k, n in refused.most_common()) + "."]
    bad = [r for r in counted if r.category in ("wrong", "crash")]
    if bad:
        lines += ["", "Wrong or crashing:", ""] + [f"- `{r.name}`: {r.category}, {r.worst.detail}" for r in bad]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per op")
    parser.add_argument("--ops", nargs="*", help="only these OpInfo names")
    parser.add_argument("--through", choices=("trainer", "graph"), default="trainer",
                        help="pe.compile(...).gradients (default), or capture -> differentiate -> code alone")
    parser.add_argument("--verbose", action="store_true", help="print each op's category as it runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    gc.freeze()  # op_db is a large heap: keep it out of the collections pockengine runs after each compile
    ops = [op for op in differentiable_ops() if not args.ops or op.name in args.ops]
    results = []
    for op in ops:
        results.append(check_op(op, args.samples, args.through))
        if args.verbose:
            r = results[-1]
            print(f"{r.name}: {r.category} {r.worst.detail if r.worst else ''}", flush=True)
    print(report(results, args.samples))


if __name__ == "__main__":
    main()
