"""Reverse-mode differentiation over the IR, at compile time.

`differentiate` walks the forward graph backwards from the loss and asks the VJP rule of each op (looked up in
`pockengine.autodiff.registry`) for the cotangents of its inputs, appending the backward nodes to the same
graph. Only nodes that lie between a wanted input and the loss get a backward node, and a rule is told which of
its inputs need a cotangent, so frozen inputs cost nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from pockengine.autodiff.registry import rule_for
from pockengine.errors import MissingVJPError
from pockengine.ir.graph import Graph, Node, TensorMeta, meta_of

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


def _detached_by_autograd(n: Node) -> bool:
    """Whether autograd gives `n`'s op no derivative at all for these arguments: factory ops that read an input
    only for its shape, dtype and device (`full_like`, `zeros_like`, `new_zeros`, `rand_like`...). ATen's own
    autograd registration says so: run on meta tensors that require grad, their outputs do not. Such an output
    depends on no input value, so nothing flows back through it (a zero cotangent, not a missing rule)."""

    def probe(a: Any) -> Any:
        if isinstance(a, Node) and isinstance(a.meta, TensorMeta):
            t = torch.empty(a.meta.shape, dtype=a.meta.dtype, device="meta")
            return t.requires_grad_() if t.is_floating_point() or t.is_complex() else t
        return torch.device("meta") if isinstance(a, torch.device) else a

    try:
        with torch.enable_grad():
            out = n.target(*pytree.tree_map(probe, n.args), **pytree.tree_map(probe, n.kwargs))
    except Exception:  # the op cannot run on meta tensors: leave the verdict to its rule (or its absence)
        return False
    return not any(t.requires_grad for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class ChannelSlice:
    """Only `channels` (sorted indices, held by the int64 node `index`) along `dim` of a value are wanted: the
    trained part of a partially trained parameter. Its cotangent has `len(channels)` entries along `dim`."""

    dim: int
    channels: tuple[int, ...]
    index: Node

    @property
    def is_prefix(self) -> bool:
        return self.channels == tuple(range(len(self.channels)))

    def moved(self, dim: int) -> ChannelSlice:
        return ChannelSlice(dim, self.channels, self.index)

    def take(self, emit: Callable[..., Node], x: Node, dim: int | None = None) -> Node:
        """The selected channels of `x` along `dim` (default: this slice's): a view for a prefix."""
        dim = self.dim if dim is None else dim
        if self.is_prefix:
            return emit(aten.slice.Tensor, x, dim, 0, len(self.channels))
        return emit(aten.index_select.default, x, dim, self.index)

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return full[:self.dim] + (len(self.channels),) + full[self.dim + 1:]


def _propagate_slices(forward: list[Node], slices: dict[Node, ChannelSlice]) -> None:
    """Carry a parameter's channel slice through the transposes that feed it to a matmul (linear layers)."""
    for n in forward:
        if n.is_input or not n.args or not isinstance(n.args[0], Node) or n.args[0] not in slices:
            continue
        src = slices[n.args[0]]
        if n.target is aten.permute.default:
            slices[n] = src.moved(list(n.args[1]).index(src.dim))
        elif n.target is aten.t.default:
            slices[n] = src.moved(1 - src.dim)
        elif n.target is aten.transpose.int:
            a, b = (d % len(n.meta.shape) for d in n.args[1:3])
            slices[n] = src.moved(b if src.dim == a else a if src.dim == b else src.dim)


class VJPContext:
    """What a VJP rule sees: the forward node, which inputs need a cotangent, and a way to emit backward ops."""

    def __init__(self, graph: Graph, node: Node, needs: dict[Node, bool], slices: dict[Node, ChannelSlice]):
        self.graph = graph
        self.node = node
        self._needs = needs
        self._slices = slices

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

    def slice_of(self, arg: Any) -> ChannelSlice | None:
        """The channel slice wanted of input `arg`, if only part of its cotangent is needed. A rule that honours
        it returns the sliced cotangent (and computes only that); otherwise the engine slices the full one."""
        return self._slices.get(arg) if isinstance(arg, Node) else None

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self.graph.call(target, args, kwargs, module=self.node.module, section="backward")

    def saved(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        """Emit a forward-section op right after its newest input, so that the backward section keeps only its
        (smaller) result alive instead of the input: a slice of an activation, a compact mask."""
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        newest = max((a for a in Node.inputs_of(args, kwargs)), key=position.__getitem__)
        if newest.is_input:  # ops start after the last input: inputs lead the program, passes rely on it
            newest = self.graph.inputs()[-1]
        return self.graph.call(target, args, kwargs, module=newest.module, section=newest.section, after=newest)

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

    def inline(self, program: torch.fx.GraphModule, args: Sequence[Node]) -> Any:
        """Emit the ops of `program` (an fx graph of ATen ops traced at compile time: a custom Function's
        backward) as backward ops, its placeholders bound to `args`; returns its outputs as nodes."""
        bound = iter(args)
        env: dict[torch.fx.Node, Any] = {}

        def value(a: Any) -> Any:
            return env[a] if isinstance(a, torch.fx.Node) else a

        for fx_node in program.graph.nodes:
            if fx_node.op == "placeholder":
                env[fx_node] = next(bound)
            elif fx_node.op == "get_attr":  # a tensor the traced code made from Python values
                env[fx_node] = self.graph.constant(fx_node.target, getattr(program, fx_node.target))
            elif fx_node.op == "call_function":
                call_args, call_kwargs = pytree.tree_map(value, (fx_node.args, fx_node.kwargs))
                val = fx_node.meta.get("val")
                env[fx_node] = self.graph.call(fx_node.target, call_args, call_kwargs, module=self.node.module,
                                               section="backward", meta=None if val is None else meta_of(val))
            elif fx_node.op == "output":
                return pytree.tree_map(value, fx_node.args[0])
        raise AssertionError("an fx graph without an output node")


def _add(graph: Graph, a: Node | None, b: Node, module: str) -> Node:
    return b if a is None else graph.call(aten.add.Tensor, (a, b), module=module, section="backward")


def differentiate(graph: Graph, loss: Node, wrt: Sequence[Node],
                  slices: dict[Node, ChannelSlice] | None = None) -> dict[Node, Node | None]:
    """Append backward nodes computing d(loss)/d(w) for every w in `wrt`; returns {w: gradient node or None}.

    For a w in `slices` only the selected channels' gradient is computed (and returned). None means the loss
    does not depend on w.
    """
    forward = list(graph.nodes)
    slices = dict(slices or {})
    _propagate_slices(forward, slices)
    # Forward sweep: which float values depend on a wanted input.
    depends: set[Node] = {w for w in wrt}
    for n in forward:
        if not n.is_input and _is_float(n.meta) and any(i in depends for i in n.inputs) and (
                rule_for(n.target) is not None or n.target is operator.getitem or not _detached_by_autograd(n)):
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
        rule = rule_for(n.target)
        if rule is None:
            raise MissingVJPError(
                f"no VJP rule for {n.op_name} (node %{n.name}, module '{n.module or '<top level>'}') on the "
                "path from the trained parameters to the loss. Either freeze the parameters before that module "
                "in the scheme, or add a rule: @pockengine.autodiff.register(torch.ops.aten.<op>) returning the "
                "input cotangents (see pockengine/autodiff/rules/).")
        grads = rule(VJPContext(graph, n, needs, slices), g)
        for pos, j, arg in _tensor_args(n.args):
            if arg not in on_path:
                continue
            gi = grads[pos] if j is None else grads[pos][j]
            if gi is None:
                continue
            sl = slices.get(arg)
            if sl is not None and gi.meta.shape == arg.meta.shape and sl.shape(arg.meta.shape) != arg.meta.shape:
                gi = sl.take(lambda t, *a: graph.call(t, a, module=n.module, section="backward"), gi)
            if gi.meta.dtype != arg.meta.dtype:  # as autograd's engine: a cotangent has its value's dtype
                gi = graph.call(aten._to_copy.default, (gi,), {"dtype": arg.meta.dtype}, module=n.module,
                                section="backward")
            expected = sl.shape(arg.meta.shape) if sl is not None else arg.meta.shape
            if gi.meta.shape != expected:
                raise AssertionError(f"VJP rule of {n.op_name} returned a cotangent of shape {gi.meta.shape} "
                                     f"for an input of shape {expected}")
            cot[arg] = _add(graph, cot.get(arg), gi, n.module)
    return {w: cot.get(w) for w in wrt}
