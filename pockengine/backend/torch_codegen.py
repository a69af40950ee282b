"""The torch backend: turn a program into one straight-line Python function of ATen calls.

Each node becomes one line `name = aten.op.overload(args)` (or the op's plain Python binding, `torch.mm(args)`, where
one dispatches to exactly that overload: `pockengine.ir.ops.FAST_CALLS`); a `del` follows the last use of every
value, so intermediates are released as early as the schedule allows and nothing but the outputs survives the call.
The per-step Python work is one function call with one line per op: no graph walking, no autograd.

Every random op (`torch.Tag.nondeterministic_seeded`) draws from the program's generator, the trainer's (seeded by
its `seed`, saved in checkpoints), in program order: `rand` is called as `rand.generator(..., generator=_generator)`,
and so is every op with such an overload; `native_dropout`, which has none, runs as pockengine's own. A random op
without either cannot be seeded and is refused at compile time (`seeded_target`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch

from pockengine.errors import CaptureError, NonFiniteLossError
from pockengine.ir.graph import Graph, Node
from pockengine.ir.ops import FAST_CALLS, draws_nothing, draws_random, generator_variant
from pockengine.memory.liveness import Liveness

aten = torch.ops.aten


def seeded_native_dropout(x: torch.Tensor, p: float, train: bool | None, *, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """native_dropout drawing its mask from `generator` (ATen's has no generator argument)."""
    if not train or p == 0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    if p == 1:
        return torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
    mask = torch.empty_like(x).bernoulli_(1 - p, generator=generator).bool()
    return x * mask * (1.0 / (1 - p)), mask


# pockengine's implementations, with a generator, of the random ops ATen has no overload with one for.
SEEDED_IMPLEMENTATIONS: dict[Any, Callable] = {aten.native_dropout.default: seeded_native_dropout}


def seeded_target(op: Any, args: tuple, kwargs: dict, where: str) -> Callable | None:
    """What to call for the random op `op` (`draws_random`) with these arguments so that it draws from the
    generator passed as `generator=`: its ATen overload taking one, or pockengine's implementation; None when it
    draws nothing with them (an attention kernel without dropout). Raises CaptureError, naming `where` (the node
    and module), for a random op neither gives a generator: the trainer's seed could not reproduce its draws."""
    if op in SEEDED_IMPLEMENTATIONS:
        return SEEDED_IMPLEMENTATIONS[op]
    if (variant := generator_variant(op)) is not None:
        return variant
    if draws_nothing(op, args, kwargs):
        return None
    raise CaptureError(
        f"{op} ({where}) draws random numbers, but ATen has no overload of it that takes a generator, so the "
        "trainer's seed cannot reproduce its draws (and checkpoints could not resume them). Put that module in eval "
        "mode or set its dropout to 0 before compiling, or draw the numbers with an op that takes a generator "
        "(torch.rand, torch.bernoulli, torch.nn.functional.dropout).")


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


def _op_name(target: Any) -> str:
    """How the program names `target`: `aten.op.overload`, `torch.ops.namespace.op.overload`, or the name of one of
    pockengine's functions (`SEEDED_IMPLEMENTATIONS`, bound by that name in the program's globals)."""
    if target in SEEDED_IMPLEMENTATIONS.values():
        return target.__name__
    namespace, _, rest = str(target).partition(".")
    packet, _, overload = rest.partition(".")
    return f"{'aten' if namespace == 'aten' else 'torch.ops.' + namespace}.{packet}.{overload or 'default'}"


def _call_expr(n: Node, src: _Source, fast: bool) -> str:
    if n.target is operator.getitem:
        return f"{n.args[0].name}[{n.args[1]}]"
    target, kwargs = n.target, dict(n.kwargs)
    seeded = seeded_target(target, n.args, kwargs, f"node {n.name}, module {n.module!r}") if draws_random(
        target) else None
    if seeded is not None:
        target = seeded
        kwargs.pop("generator", None)
    args = ([src.expr(a) for a in n.args] + [f"{k}={src.expr(v)}" for k, v in kwargs.items()]
            + (["generator=_generator"] if seeded is not None else []))
    fn = FAST_CALLS[target] if fast and target in FAST_CALLS and not kwargs else _op_name(target)
    return f"{fn}({', '.join(args)})"


class CompiledProgram:
    """An executable program: call it with one value per input node (in `inputs` order)."""

    def __init__(self, graph: Graph, inputs: list[Node], check_finite: Node | None,
                 generator: torch.Generator | None = None, fast_calls: bool = True):
        self.graph = graph
        self.inputs = inputs
        self.output_names = list(graph.outputs)
        self.source, constants = self._generate(graph, inputs, check_finite, fast_calls)
        env: dict[str, Any] = {"aten": aten, "torch": torch, "_check_finite": _check_finite,
                               "_generator": generator or torch.Generator(), **constants}
        env.update({f.__name__: f for f in SEEDED_IMPLEMENTATIONS.values()})
        exec(compile(self.source, "<pockengine program>", "exec"), env)
        self.fn: Callable[..., tuple] = env["program"]

    @staticmethod
    def _generate(graph: Graph, inputs: list[Node], check_finite: Node | None,
                  fast_calls: bool) -> tuple[str, dict[str, Any]]:
        src = _Source()
        live = Liveness.of(graph)
        dying = {i: [n.name for n in nodes] for i, nodes in live.dying.items()}
        lines = [f"def program({', '.join(n.name for n in inputs)}):"]
        if -1 in dying:
            lines.append(f"    del {', '.join(dying[-1])}")
        for i, n in enumerate(live.body):
            lines.append(f"    {n.name} = {_call_expr(n, src, fast_calls)}")
            if n is check_finite:
                lines.append(f"    _check_finite({n.name})")
            if i in dying:
                lines.append(f"    del {', '.join(dying[i])}")
        lines.append(f"    return ({''.join(f'{n.name}, ' for n in graph.outputs.values())})")
        return "\n".join(lines) + "\n", src.constants

    def __call__(self, *values: Any) -> tuple:
        return self.fn(*values)
