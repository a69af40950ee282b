"""Reverse-mode differentiation over the IR, at compile time.

`differentiate` walks the forward graph backwards from the loss and asks the VJP rule of each op (looked up in
`pockengine.autodiff.registry.VJP`) for the cotangents of its inputs, appending the backward nodes to the same
graph. Only nodes that lie between a wanted input and the loss get a backward node, and a rule is told which of
its inputs need a cotangent, so frozen inputs cost nothing.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch

from pockengine.autodiff.registry import VJP
from pockengine.errors import MissingVJPError
from pockengine.ir.graph import Graph, Node, TensorMeta

aten = torch.ops.aten


def _is_float(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return meta.is_float
    if isinstance(meta, tuple):
        return any(_is_float(m) for m in meta)
    return False


def _tensor_args(args: Sequence) -> list[tuple[int, int | None, Node]]:
    """(arg position, index inside a list argument or None, node) of every node argument."""
    found = []
    for i, a in enumerate(args):
        if isinstance(a, Node):
            found.append((i, None, a))
        elif isinstance(a, (list, tuple)):
            found.extend((i, j, x) for j, x in enumerate(a) if isinstance(x, Node))
    return found


class VJPContext:
    """What a VJP rule sees: the forward node, which inputs need a cotangent, and a way to emit backward ops."""

    def __init__(self, graph: Graph, node: Node, needs: dict[Node, bool]):
        self.graph = graph
        self.node = node
        self._needs = needs

    @property
    def args(self) -> list[Any]:
        """The positional arguments of the forward op, with the schema's defaults filled in."""
        schema = self.node.target._schema
        positional = [a for a in schema.arguments if not a.kwarg_only]
        return [self.node.args[i] if i < len(self.node.args) else self.node.kwargs.get(a.name, a.default_value)
                for i, a in enumerate(positional)]

    def kwarg(self, name: str) -> Any:
        """A keyword-only argument of the forward op, or its schema default."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        return next(a.default_value for a in self.node.target._schema.arguments if a.name == name)

    def needs(self, arg: Any) -> bool:
        """Whether the forward input `arg` (a node argument of this op) needs a cotangent."""
        return isinstance(arg, Node) and self._needs.get(arg, False)

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self.graph.call(target, args, kwargs, module=self.node.module, section="backward")

    def sum_to(self, g: Node, shape: tuple[int, ...]) -> Node:
        """Undo broadcasting: sum `g` down to `shape`."""
        gshape = g.meta.shape
        if gshape == tuple(shape):
            return g
        lead = len(gshape) - len(shape)
        dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and gshape[lead + i] != 1]
        if dims:
            g = self(aten.sum.dim_IntList, g, dims, True)
        if g.meta.shape != tuple(shape):
            g = self(aten.view.default, g, list(shape))
        return g

    def zeros_like(self, x: Node) -> Node:
        return self(aten.zeros_like.default, x)


def _add(graph: Graph, a: Node | None, b: Node, module: str) -> Node:
    return b if a is None else graph.call(aten.add.Tensor, (a, b), module=module, section="backward")


def differentiate(graph: Graph, loss: Node, wrt: Sequence[Node]) -> dict[Node, Node | None]:
    """Append backward nodes computing d(loss)/d(w) for every w in `wrt`; returns {w: gradient node or None}.

    None means the loss does not depend on w.
    """
    forward = list(graph.nodes)
    # Forward sweep: which float values depend on a wanted input.
    depends: set[Node] = {w for w in wrt}
    for n in forward:
        if not n.is_input and _is_float(n.meta) and any(i in depends for i in n.inputs):
            depends.add(n)
    # Backward sweep: which of those the loss depends on.
    on_path: set[Node] = {loss} if loss in depends else set()
    for n in reversed(forward):
        if n in on_path:
            on_path.update(i for i in n.inputs if i in depends)

    cot: dict[Node, Any] = {}
    if loss in on_path:
        cot[loss] = graph.call(aten.ones_like.default, (loss,), module=loss.module, section="backward",
                               name="grad_seed")
    needs = {n: True for n in on_path}
    for n in reversed(forward):
        if n.is_input or n not in cot:
            continue  # inputs keep their cotangent for the caller
        g = cot.pop(n)
        if n.target is operator.getitem:
            parent, idx = n.args
            slots = cot.setdefault(parent, [None] * len(parent.meta))
            slots[idx] = _add(graph, slots[idx], g, n.module)
            continue
        rule = VJP.get(n.target)
        if rule is None:
            raise MissingVJPError(
                f"no VJP rule for {n.op_name} (node %{n.name}, module '{n.module or '<top level>'}') on the "
                "path from the trained parameters to the loss. Either freeze the parameters before that module "
                "in the scheme, or add a rule: @pockengine.autodiff.register(torch.ops.aten.<op>) returning the "
                "input cotangents (see pockengine/autodiff/rules/).")
        grads = rule(VJPContext(graph, n, needs), g)
        for pos, j, arg in _tensor_args(n.args):
            if arg not in on_path:
                continue
            gi = grads[pos] if j is None else grads[pos][j]
            if gi is None:
                continue
            if isinstance(arg.meta, TensorMeta) and gi.meta.shape != arg.meta.shape:
                raise AssertionError(f"VJP rule of {n.op_name} returned a cotangent of shape {gi.meta.shape} "
                                     f"for an input of shape {arg.meta.shape}")
            cot[arg] = _add(graph, cot.get(arg), gi, n.module)
    return {w: cot.get(w) for w in wrt}
