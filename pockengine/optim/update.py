"""What a program does with the gradients autodiff gives (its `grad:<name>` outputs): the output stage.

The step program (`emit_updates`) updates every trained parameter in place with the optimizer's ops: a whole
parameter directly, a prefix of its channels through a view (`slice`), scattered channels gathered
(`index_select`), updated and put back (`index_copy_`); the optimizer state is bound as program inputs, one per
parameter and state name. Train-mode BatchNorm statistics, the captured program's new buffer values, are copied
into the buffers. The gradient program (`emit_gradient_outputs`) returns each gradient at the parameter's full
shape instead, and updates nothing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from pockengine.ir.graph import SCALAR, STATE, Graph, Node
from pockengine.optim.base import Optimizer
from pockengine.scheme import Selection

if TYPE_CHECKING:
    from pockengine.pipeline import Context

aten = torch.ops.aten
BUFFER_OUTPUT = "buffer:"  # graph output names of the captured program's new buffer values: BUFFER_OUTPUT + name
GRADIENT_OUTPUT = "grad:"


def zero_state(optimizer: Optimizer, model: nn.Module, trained: dict[str, Selection]
               ) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state for every trained parameter: zeros shaped as its trained part (a whole parameter's
    in its layout)."""
    params = dict(model.named_parameters())
    return {name: {s: torch.zeros_like(params[name]) if sel.kind == "full" else
                   torch.zeros(_trained_shape(params[name].shape, sel), dtype=params[name].dtype,
                               device=params[name].device) for s in optimizer.state_names}
            for name, sel in trained.items()}


def _trained_shape(shape: torch.Size, sel: Selection) -> tuple[int, ...]:
    return tuple(len(sel.channels) if d == sel.dim else s for d, s in enumerate(shape))


def _gradients(graph: Graph, ctx: Context, outputs: dict[str, Node]
               ) -> Iterator[tuple[str, Node, Node, Callable[..., Node]]]:
    """(name, parameter, gradient, emit) per trained parameter, in turn, from autodiff's `grad:<name>` outputs;
    the gradient of a parameter the loss does not depend on (autodiff gave none) is 0."""
    for name, p in ctx.trained.items():
        emit = functools.partial(_emit, graph, module=p.module)
        sl = ctx.slices.get(p)
        g = outputs.get(f"{GRADIENT_OUTPUT}{name}")
        if g is None:
            g = emit(aten.new_zeros.default, p, list(sl.shape(p.meta.shape) if sl else p.meta.shape))
        yield name, p, g, emit


def _emit(graph: Graph, target: Callable, *args: Any, module: str = "", **kwargs: Any) -> Node:
    return graph.call(target, args, kwargs, module=module, section="update")


def emit_gradient_outputs(graph: Graph, ctx: Context) -> None:
    """The gradient program's outputs: the loss, then `grad:<name>` for every trained parameter at its full
    shape (a partially trained one is 0 outside its channels); the new buffer values are dropped."""
    outputs, graph.outputs = graph.outputs, {"loss": graph.outputs["loss"]}
    for name, p, g, emit in _gradients(graph, ctx, outputs):
        sl = ctx.slices.get(p)
        if sl is not None:
            g = emit(aten.index_copy.default, emit(aten.zeros_like.default, p), sl.dim, sl.index, g)
        graph.outputs[f"{GRADIENT_OUTPUT}{name}"] = g


def emit_updates(graph: Graph, ctx: Context) -> None:
    """The step program: the optimizer's in-place update of every trained parameter, then the buffers' copy-back;
    its only output is the loss."""
    optimizer = ctx.optimizer
    outputs, graph.outputs = graph.outputs, {"loss": graph.outputs["loss"]}
    scalars = {s: graph.input(s, SCALAR, None) for s in optimizer.scalar_names}
    for name, p, g, emit in _gradients(graph, ctx, outputs):
        state = {s: graph.input(f"{name}.{s}", STATE, g.meta, module=p.module) for s in optimizer.state_names}
        ctx.static.update({node: ctx.state[name][s] for s, node in state.items()})
        sl = ctx.slices.get(p)
        # A prefix of channels is updated through a view; scattered channels are gathered, updated, put back.
        target = sl.take(emit, p) if sl is not None else p
        updated = optimizer.emit_update(emit, target, g, state, scalars)
        if sl is not None and not sl.is_prefix:
            emit(aten.index_copy_.default, p, sl.dim, sl.index, updated)
    for key, new in outputs.items():
        if key.startswith(BUFFER_OUTPUT):
            name = key.removeprefix(BUFFER_OUTPUT)
            _emit(graph, aten.copy_.default, ctx.captured.buffers[name], new, module=name.rpartition(".")[0])
