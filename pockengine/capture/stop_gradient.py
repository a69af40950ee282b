"""Where a model cuts the gradient, the captured program says so: `pockengine::stop_gradient`.

A model cuts the gradient with `x.detach()` (or `x.data`) or by computing a value under `torch.no_grad()` or
`torch.inference_mode()` (a `with` block or a decorated method: Hugging Face's rotary embeddings, spectral norm's
power iteration, normalizations that scale by a detached statistic). The core ATen decompositions lose both:
`detach` becomes `alias`, differentiated as the identity, and a program exported under `no_grad` carries no trace
of a `no_grad` block inside it. Differentiated as captured, such a model would get
gradients autograd never computes, silently. So the model is exported with gradients enabled (its own `no_grad`
blocks become `wrap_with_set_grad_enabled(False, ...)` regions of the pre-decomposition graph) and, before the
decompositions, every `detach` and every float output of such a region goes through `stop_gradient`: an op that
copies its input and that autograd's own registration gives no derivative (`mark_non_differentiable`), so the
autodiff, which asks that registration (`autodiff.engine._detached_by_autograd`), sends nothing back through it.
Once the backward pass exists the op has done its job: `drop_stop_gradients` makes its readers read its input.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pockengine.capture.locations import described
from pockengine.errors import CaptureError
from pockengine.ir.graph import Graph
from pockengine.ir.ops import is_mutating, is_view


@torch.library.custom_op("pockengine::stop_gradient", mutates_args=())
def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # a custom op may not return its input; the copy never runs (dropped after autodiff)


@stop_gradient.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _no_derivative(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.mark_non_differentiable(output)


stop_gradient.register_autograd(lambda ctx, grad: None, setup_context=_no_derivative)

STOP_GRADIENT = torch.ops.pockengine.stop_gradient.default
_SET_GRAD_ENABLED = torch.ops.higher_order.wrap_with_set_grad_enabled


_TENSOR_DATA = torch._C.TensorBase.data


@contextmanager
def traceable_gradient_cuts() -> Iterator[None]:
    """While tracing, the cuts torch.export cannot see are spelled as ones it can:
    - reading `x.data` is `x.detach()`, which is what it means for the values (the same storage, no gradient);
      torch.export cannot trace the tensor `.data` makes, which reaches the program as an untraced constant ("a fake
      tensor in the exported program constant's list"). Assigning to `.data` is left as it is.
    - `torch.inference_mode()` (a block or a decorator) is `torch.no_grad()`: torch.export drops inference mode
      without a trace, so the values computed under it would be differentiated; for gradients the two are the
      same (eager PyTorch refuses to save an inference tensor for the backward pass, so a model that trains only
      reads them in ways that need no gradient)."""
    enter, exit_ = torch.inference_mode.__enter__, torch.inference_mode.__exit__

    def enter_no_grad(self: torch.inference_mode) -> None:
        self._pockengine_no_grad = torch.set_grad_enabled(not self.mode and torch.is_grad_enabled())

    def exit_no_grad(self: torch.inference_mode, *exc: Any) -> None:
        self._pockengine_no_grad.__exit__(*exc)

    torch.Tensor.data = property(lambda self: self.detach(), _TENSOR_DATA.__set__)
    torch.inference_mode.__enter__, torch.inference_mode.__exit__ = enter_no_grad, exit_no_grad
    try:
        yield
    finally:
        del torch.Tensor.data
        torch.inference_mode.__enter__, torch.inference_mode.__exit__ = enter, exit_


def _stop(graph: torch.fx.Graph, value: torch.fx.Node) -> None:
    """Insert `stop_gradient(value)` right after `value`; every other reader of `value` reads it instead."""
    readers = list(value.users)
    with graph.inserting_after(value):
        stopped = graph.call_function(STOP_GRADIENT, (value,))
    stopped.meta = {**value.meta}
    for reader in readers:
        reader.replace_input_with(value, stopped)


def _is_float_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _written_through(node: torch.fx.Node) -> bool:
    """Whether an op writes into `node` or into a view of it (`weight.detach()` renormalized in place by
    `nn.Embedding(max_norm=...)`): a copy in its place would take the write away from the tensor it aliases."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and is_mutating(user.target) and any(
                argument.alias_info is not None and argument.alias_info.is_write and value is node
                for argument, value in zip(schema.arguments, user.args)):
            return True
        if is_view(user.target) and _written_through(user):
            return True
    return False


def _computed_from_inputs(node: torch.fx.Node) -> bool:
    """Whether `node` depends on a placeholder (a parameter, buffer or batch input), not only on tensors the
    program makes itself."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _refuse_write_into_activation(node: torch.fx.Node) -> None:
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.op == "placeholder":
        return
    if isinstance(source, torch.fx.Node) and not _computed_from_inputs(source):
        # a tensor made in the forward pass, initialized in place (BigBird builds new attention layers in its
        # forward pass at short sequences, nn.init's `uniform_` under no_grad): no gradient reaches it
        return
    raise CaptureError(
        f"the model writes in place into a detached value ({node.name} = x.detach(), then an in-place op on it "
        f"{described(node)}); the write changes x too, which the gradient cannot follow. Write into a copy instead: "
        "x.detach().clone().")


def mark_stop_gradients(gm: torch.fx.GraphModule) -> None:
    """Rewrite the exported (not yet decomposed) program in place: `detach` -> `stop_gradient`, and each float
    value leaving a `no_grad` region through `stop_gradient`. A region inside a `no_grad` region is the outer
    region's business: its outputs are stopped where the outer region's are."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in list(module.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is torch.ops.aten.detach.default:
                if _written_through(node):
                    _refuse_write_into_activation(node)
                    continue  # a parameter's or buffer's alias, written: the capture reports the write
                node.target = STOP_GRADIENT
                changed = True
            elif node.target is _SET_GRAD_ENABLED and node.args[0] is False:
                for item in list(node.users):
                    if item.target is operator.getitem and _is_float_tensor(item):
                        _stop(module.graph, item)
                        changed = True
        if changed:
            module.recompile()


def drop_stop_gradients(graph: Graph) -> None:
    """After differentiation nothing reads the cut any more: each `stop_gradient`'s readers read its input."""
    for node in [n for n in graph.nodes if n.target is STOP_GRADIENT]:
        graph.replace_all_uses(node, node.args[0])
        graph.nodes.remove(node)
