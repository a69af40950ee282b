"""The one IR of pockengine: a flat, topologically ordered list of ATen calls.

A training program is a `Graph`: inputs (parameters, buffers, optimizer state, the batch, run-time scalars) and
`Node`s calling core ATen operators, each tagged with the section it belongs to (forward, loss, backward, update)
and the source module it came from. Multi-output operators produce a tuple value that `getitem` nodes unpack,
as in torch.fx. Shapes are static: every tensor node carries its `TensorMeta`, inferred by running the operator
on meta tensors, so later passes (pruning, memory planning) can reason about sizes without running anything.
"""

from __future__ import annotations

import functools
import itertools
import keyword
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch._higher_order_ops.effects import has_effects
from torch.utils._pytree import tree_map

from pockengine.ir.ops import is_mutating

SECTIONS = ("forward", "loss", "backward", "update")

# Names the generated code uses for itself, never given to a value.
_RESERVED = {"aten", "torch", "program", "native_dropout", "_check_finite"}

# Roles of graph inputs: what the runner binds them to.
PARAM, BUFFER, STATE, BATCH, SCALAR, CONST = "param", "buffer", "state", "batch", "scalar", "const"


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


Meta = TensorMeta | tuple | None


class Node:
    """One value of the program: an input, or the result of calling `target` on earlier nodes and constants."""

    __slots__ = ("name", "target", "_args", "_kwargs", "meta", "module", "section", "role", "_inputs")

    def __init__(self, name: str, target: Any, args: tuple, kwargs: dict, meta: Meta, module: str,
                 section: str, role: str | None = None):
        self.name = name
        self.target = target  # an OpOverload, operator.getitem, or None for inputs
        self.args = args
        self.kwargs = kwargs
        self.meta = meta
        self.module = module  # dotted path of the nn.Module that produced it ("" for the top level)
        self.section = section
        self.role = role  # set for inputs only

    @property
    def is_input(self) -> bool:
        return self.target is None

    @property
    def op_name(self) -> str:
        return op_name(self.target)

    # The arguments are replaced whole (`node.args = ...`), never changed in place, so the nodes they read are found
    # once per assignment: passes, dead-code elimination and the lint ask for them millions of times per compile.
    @property
    def args(self) -> tuple:
        return self._args

    @args.setter
    def args(self, value: tuple) -> None:
        self._args, self._inputs = value, None

    @property
    def kwargs(self) -> dict:
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: dict) -> None:
        self._kwargs, self._inputs = value, None

    @property
    def inputs(self) -> tuple[Node, ...]:
        if self._inputs is None:
            self._inputs = tuple(Node.inputs_of(self._args, self._kwargs))
        return self._inputs

    @staticmethod
    def inputs_of(args: Any, kwargs: Any = None) -> list[Node]:
        found: list[Node] = []
        _collect_nodes((args, kwargs), found)
        return found

    @property
    def mutates(self) -> bool:
        return is_mutating(self.target)

    def __repr__(self) -> str:
        return f"%{self.name}"


# Node arguments are nested tuples, lists and dicts (torch.fx's immutable variants among them). These two walk them
# directly: compiling a model calls them millions of times, and torch's pytree is several times slower.
def _collect_nodes(a: Any, found: list[Node]) -> None:
    if isinstance(a, Node):
        found.append(a)
    elif isinstance(a, (tuple, list)):
        for x in a:
            _collect_nodes(x, found)
    elif isinstance(a, dict):
        for x in a.values():
            _collect_nodes(x, found)


def _substitute(a: Any, old: Node, new: Node) -> Any:
    """`a` with `new` in place of `old`; `a` itself when it does not contain `old`."""
    if a is old:
        return new
    if isinstance(a, (tuple, list)):
        items = [_substitute(x, old, new) for x in a]
        if all(x is y for x, y in zip(items, a)):
            return a
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    if isinstance(a, dict):
        changed = {k: _substitute(v, old, new) for k, v in a.items()}
        return a if all(changed[k] is v for k, v in a.items()) else type(a)(changed)
    return a


def _mapped(a: Any, nodes: dict[Node, Node]) -> Any:
    """`a` with every node replaced by its image in `nodes` (containers rebuilt as their own types)."""
    if isinstance(a, Node):
        return nodes[a]
    if isinstance(a, (tuple, list)):
        items = [_mapped(x, nodes) for x in a]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    if isinstance(a, dict):
        return type(a)({k: _mapped(v, nodes) for k, v in a.items()})
    return a


def op_name(target: Any) -> str:
    if target is None:
        return "input"
    if target is operator.getitem:
        return "getitem"
    return str(target).removeprefix("aten.")


@functools.cache
def has_side_effects(target: Any) -> bool:
    """Whether a call must run even when nothing reads its result: it writes to an input, torch registers it
    as effectful (error checks such as `_linalg_check_errors`, which torch.export orders with effect tokens), or it
    returns nothing, so it is called for its effect alone (`_assert_async`, a model's runtime check)."""
    return is_mutating(target) or (isinstance(target, torch._ops.OpOverload) and (
        has_effects(target) or not _returns_something(target)))


def _returns_something(target: Any) -> bool:
    """False for an op called only for its effect (an error check such as `_linalg_check_errors`)."""
    schema = getattr(target, "_schema", None)
    return schema is None or bool(schema.returns)


def _to_meta_tensor(x: Any) -> Any:
    if isinstance(x, Node):
        m = x.meta
        if isinstance(m, TensorMeta):
            return torch.empty(m.shape, dtype=m.dtype, device="meta")
        if x.role == SCALAR:
            return 1.0  # run-time scalars (learning rate...) never change shapes
        raise TypeError(f"node {x} has no tensor value")
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


def meta_of(value: Any) -> Meta:
    """The static metadata of a (fake, meta or real) value; lists of tensors become tuples."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(meta_of(v) for v in value)
    return None


def infer_meta(target: Callable, args: tuple, kwargs: dict) -> Meta:
    if target is operator.getitem:
        return args[0].meta[args[1]]
    margs, mkwargs = tree_map(_to_meta_tensor, (args, kwargs))
    return meta_of(target(*margs, **mkwargs))


class Graph:
    """A training program under construction or finished. Nodes are kept in execution order."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.outputs: dict[str, Node] = {}
        self.constants: dict[Node, torch.Tensor] = {}  # values of the CONST inputs
        self.notes: dict[Node, str] = {}  # why a node is there, printed in the listing (the attention kernel chosen)
        # attention node -> (batch input, is_causal): its mask is the causal one (is_causal) or keeps every key
        # whenever that input (a padding mask) is all ones at run time (pass attention_masks; the attention reads it)
        self.unpadded_masks: dict[Node, tuple[Node, bool]] = {}
        self.remarks: list[str] = []  # choices about the whole program, printed under its first line (the backend)
        self._names: set[str] = set()

    # -- building -------------------------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "v"
        if base[0].isdigit() or keyword.iskeyword(base) or base in _RESERVED:
            base = f"v_{base}"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def input(self, name: str, role: str, meta: Meta, module: str = "") -> Node:
        """A new program input, placed after the existing inputs so that they all lead the program."""
        node = Node(self._fresh(name), None, (), {}, meta, module, "forward", role)
        self.nodes.insert(sum(1 for _ in itertools.takewhile(lambda n: n.is_input, self.nodes)), node)
        return node

    def constant(self, name: str, value: torch.Tensor) -> Node:
        """A tensor fixed at compile time (channel indices, lifted constants), bound as a CONST input."""
        node = self.input(name, CONST, TensorMeta(tuple(value.shape), value.dtype))
        self.constants[node] = value
        return node

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, module: str = "",
             section: str = "forward", name: str | None = None, meta: Meta = None,
             after: Node | None = None) -> Node:
        """Append a call, or insert it right `after` a node (and the getitems unpacking it)."""
        kwargs = kwargs or {}
        if meta is None:
            meta = infer_meta(target, args, kwargs)
        # named after the op without its namespace (`mm`, `grouped_mm_fallback_backward`)
        default_name = getattr(target, "_opname", None) or op_name(target).split(".")[0]
        node = Node(self._fresh(name or default_name), target, tuple(args), kwargs, meta, module, section)
        if after is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._end_of(after), node)
        return node

    def emitter(self, after: Node, module: str, section: str) -> Callable[..., Node]:
        """`emit(target, *args, **kwargs)`: insert ops one after another, starting right after `after`."""
        anchor = after

        def emit(target: Callable, *args: Any, **kwargs: Any) -> Node:
            nonlocal anchor
            anchor = self.call(target, args, kwargs, module=module, section=section, after=anchor)
            return anchor

        return emit

    def _end_of(self, node: Node) -> int:
        pos = self.nodes.index(node) + 1
        while pos < len(self.nodes) and self.nodes[pos].target is operator.getitem and self.nodes[pos].args[0] is node:
            pos += 1
        return pos

    def getitem(self, node: Node, index: int) -> Node:
        """The node for output `index` of the multi-output `node`, placed right after it so that the tuple it
        unpacks is released early even when the output is first wanted much later (in the backward section)."""
        for n in self.nodes:
            if n.target is operator.getitem and n.args[0] is node and n.args[1] == index:
                return n
        pos = self._end_of(node)
        item = Node(self._fresh(f"{node.name}_{index}"), operator.getitem, (node, index), {}, node.meta[index],
                    node.module, node.section)
        self.nodes.insert(pos, item)
        return item

    # -- queries --------------------------------------------------------------------------------------------
    def inputs(self, role: str | None = None) -> list[Node]:
        return [n for n in self.nodes if n.is_input and (role is None or n.role == role)]

    def users(self) -> dict[Node, list[Node]]:
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n)
        return users

    def section(self, name: str) -> list[Node]:
        return [n for n in self.nodes if not n.is_input and n.section == name]

    def replace_all_uses(self, old: Node, new: Node) -> None:
        # Only the readers of `old` get new arguments: rebuilding every node's would make each call walk every
        # argument of the program and forget every node's inputs (found again on the next ask), and passes that
        # replace one value per fold (BatchNorm folding, constant folding) call this hundreds of times per compile.
        for n in self.nodes:
            if old in n.inputs:
                n.args, n.kwargs = _substitute(n.args, old, new), _substitute(n.kwargs, old, new)
        self.outputs = _substitute(self.outputs, old, new)

    def copy(self) -> tuple[Graph, dict[Node, Node]]:
        """A graph of new nodes that passes can change without touching this one (constants' tensors are shared:
        no program writes into an input), and the map from this graph's nodes to the copy's."""
        copy = Graph()
        nodes: dict[Node, Node] = {}
        for n in self.nodes:
            args, kwargs = _mapped((n.args, n.kwargs), nodes)
            nodes[n] = Node(n.name, n.target, args, kwargs, n.meta, n.module, n.section, n.role)
        copy.nodes = list(nodes.values())
        copy.outputs = {k: nodes[v] for k, v in self.outputs.items()}
        copy.constants = {nodes[n]: t for n, t in self.constants.items()}
        copy.notes = {nodes[n]: note for n, note in self.notes.items()}
        copy.unpadded_masks = {nodes[n]: (nodes[mask], causal) for n, (mask, causal) in self.unpadded_masks.items()}
        copy.remarks = list(self.remarks)
        copy._names = set(self._names)
        return copy, nodes

    def lint(self) -> None:
        """Check the invariants every pass must keep; raise ValueError naming the first node that breaks one:
        inputs lead the program, every value is defined before it is used, names are unique (they become Python
        variables), every op has its section and the static metadata of its result."""
        defined: set[Node] = set()
        names: set[str] = set()
        ops_started = False
        for n in self.nodes:
            if n.name in names:
                raise ValueError(f"two values are named %{n.name}")
            names.add(n.name)
            if n.is_input:
                if ops_started:
                    raise ValueError(f"input %{n.name} comes after an op; inputs lead the program")
            else:
                ops_started = True
                undefined = [i for i in n.inputs if i not in defined]
                if undefined:
                    raise ValueError(f"%{n.name} = {n.op_name}(...) reads {undefined} before it is defined (or a "
                                     "value no longer in the program)")
                if n.section not in SECTIONS:
                    raise ValueError(f"%{n.name} has section {n.section!r}, not one of {SECTIONS}")
                if n.meta is None and _returns_something(n.target):
                    raise ValueError(f"%{n.name} = {n.op_name}(...) has no metadata (shape, dtype)")
            defined.add(n)
        missing = {k: v for k, v in self.outputs.items() if v not in defined}
        if missing:
            raise ValueError(f"outputs {missing} are not values of the program")

    def __str__(self) -> str:
        """The listing: inputs with their roles, then one block per section, each line an op with its result type
        and the module it came from (and, where the compiler made a choice there, why)."""
        return _format_graph(self)


def eliminate_dead_code(graph: Graph, keep: Iterable[Node] = ()) -> Graph:
    """Drop every node that no output, no side effect and nothing in `keep` depends on. Inputs are kept."""
    live: set[Node] = set(graph.outputs.values()) | set(keep)
    live |= {n for n in graph.nodes if has_side_effects(n.target)}
    for n in reversed(graph.nodes):
        if n in live:
            live.update(n.inputs)
    graph.nodes = [n for n in graph.nodes if n.is_input or n in live]
    return graph


# ------------------------------------------------------------------------------------------------ the listing
def _fmt_arg(a: Any) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return f"{a:g}"
    return str(a).removeprefix("torch.")


def _fmt_meta(meta: Any) -> str:
    if isinstance(meta, TensorMeta):
        return str(meta)
    if isinstance(meta, tuple):
        return "(" + ", ".join(_fmt_meta(m) for m in meta) + ")"
    return ""


def _format_node(n: Node, note: str | None = None) -> str:
    args = [_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()]
    line = f"%{n.name} = {n.op_name}({', '.join(args)})"
    comment = "; ".join(c for c in (n.module, note) if c)
    return f"  {line:<96} {_fmt_meta(n.meta)}{f'  # {comment}' if comment else ''}"


def _format_graph(graph: Graph) -> str:
    counts = {s: len(graph.section(s)) for s in SECTIONS}
    lines = ["program: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " ops", *graph.remarks]
    lines.append("inputs:")
    for n in graph.inputs():
        where = f"  # {n.module}" if n.module else ""
        lines.append(f"  %{n.name:<40} {n.role:<7} {_fmt_meta(n.meta)}{where}")
    for s in SECTIONS:
        nodes = graph.section(s)
        if nodes:
            lines.append(f"{s}:")
            lines.extend(_format_node(n, graph.notes.get(n)) for n in nodes)
    lines.append("outputs:")
    lines.extend(f"  {k} = %{v.name}" for k, v in graph.outputs.items())
    return "\n".join(lines)
