"""The torch backend: turn a program into one straight-line Python function of ATen calls.

Each node becomes one line `name = aten.op.overload(args)` (or the op's plain Python binding, `torch.mm(args)`, where
one dispatches to exactly that overload: `pockengine.ir.ops.FAST_CALLS`); a `del` follows the last use of every
value, so intermediates are released as early as the schedule allows and nothing but the outputs survives the call.
The per-step Python work is one function call with one line per op: no graph walking, no autograd.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch

from pockengine.errors import NonFiniteLossError
from pockengine.ir.graph import Graph, Node
from pockengine.ir.ops import FAST_CALLS
from pockengine.memory.liveness import Liveness

aten = torch.ops.aten


def _seeded_dropout(generator: torch.Generator) -> Callable:
    """native_dropout drawing its mask from the trainer's generator, so runs are reproducible from a seed."""

    def native_dropout(x: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not train or p == 0:
            return x.clone(), torch.ones_like(x, dtype=torch.bool)
        if p == 1:
            return torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
        mask = torch.empty_like(x).bernoulli_(1 - p, generator=generator).bool()
        return x * mask * (1.0 / (1 - p)), mask

    return native_dropout


def _check_finite(loss: torch.Tensor) -> None:
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the loss is {value}; the step was stopped before any update, the weights are unchanged. Lower the "
            "learning rate, check the batch for NaN/inf, or pass on_nonfinite='skip' to skip such steps.")


class _Source:
    """Renders node arguments as Python expressions, keeping non-literal constants in a table."""

    def __init__(self) -> None:
        self.constants: dict[str, Any] = {}

    def expr(self, a: Any) -> str:
        if isinstance(a, Node):
            return a.name
        if isinstance(a, (list, tuple)):
            body = ", ".join(self.expr(x) for x in a)
            return f"[{body}]" if isinstance(a, list) else f"({body}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, str)):
            return repr(a)
        if isinstance(a, float):
            return repr(a) if math.isfinite(a) else f"float('{a}')"
        if isinstance(a, torch.dtype):
            return str(a)
        name = f"_c{len(self.constants)}"
        self.constants[name] = a
        return name


def _call_expr(n: Node, src: _Source, overrides: dict, fast: bool) -> str:
    if n.target is operator.getitem:
        return f"{n.args[0].name}[{n.args[1]}]"
    args = [src.expr(a) for a in n.args] + [f"{k}={src.expr(v)}" for k, v in n.kwargs.items()]
    if n.target in overrides:
        fn = overrides[n.target].__name__
    elif fast and n.target in FAST_CALLS and not n.kwargs:
        fn = FAST_CALLS[n.target]
    else:
        namespace, _, rest = str(n.target).partition(".")
        packet, _, overload = rest.partition(".")
        fn = f"{'aten' if namespace == 'aten' else 'torch.ops.' + namespace}.{packet}.{overload or 'default'}"
    return f"{fn}({', '.join(args)})"


class CompiledProgram:
    """An executable program: call it with one value per input node (in `inputs` order)."""

    def __init__(self, graph: Graph, inputs: list[Node], check_finite: Node | None,
                 generator: torch.Generator | None = None, fast_calls: bool = True):
        self.graph = graph
        self.inputs = inputs
        self.output_names = list(graph.outputs)
        overrides = {aten.native_dropout.default: _seeded_dropout(generator or torch.Generator())}
        self.source, constants = self._generate(graph, inputs, check_finite, overrides, fast_calls)
        env: dict[str, Any] = {"aten": aten, "torch": torch, "_check_finite": _check_finite, **constants}
        env.update({f.__name__: f for f in overrides.values()})
        exec(compile(self.source, "<pockengine program>", "exec"), env)
        self.fn: Callable[..., tuple] = env["program"]

    @staticmethod
    def _generate(graph: Graph, inputs: list[Node], check_finite: Node | None,
                  overrides: dict, fast_calls: bool) -> tuple[str, dict[str, Any]]:
        src = _Source()
        live = Liveness.of(graph)
        dying = {i: [n.name for n in nodes] for i, nodes in live.dying.items()}
        lines = [f"def program({', '.join(n.name for n in inputs)}):"]
        if -1 in dying:
            lines.append(f"    del {', '.join(dying[-1])}")
        for i, n in enumerate(live.body):
            lines.append(f"    {n.name} = {_call_expr(n, src, overrides, fast_calls)}")
            if n is check_finite:
                lines.append(f"    _check_finite({n.name})")
            if i in dying:
                lines.append(f"    del {', '.join(dying[i])}")
        lines.append(f"    return ({''.join(f'{n.name}, ' for n in graph.outputs.values())})")
        return "\n".join(lines) + "\n", src.constants

    def __call__(self, *values: Any) -> tuple:
        return self.fn(*values)
