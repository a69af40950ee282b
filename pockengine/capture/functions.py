"""Custom torch.autograd.Functions: their gradient is their own backward, traced at compile time.

torch.export records what a Function's forward computes and drops its backward, and differentiating the forward
instead is wrong wherever the backward is not its derivative (a gradient reversal, a straight-through estimator,
PhiMoE's sparse-mixer router, YOSO's approximate cumulation). So while capturing, every `Function.apply` runs the
forward itself with a recording ctx (`_RecordingContext`: what the forward saves and sets on ctx) and passes the
tensors it returns through one marker op, `pockengine::autograd_function(outputs, inputs, saved, function, call)`:
a copy of `outputs` when the program runs, whose other arguments keep as values of the captured program the
Function's tensor inputs and every tensor its backward reads from ctx (saved tensors, also intermediates of the
forward, and tensor attributes). `call` numbers the call's `FunctionCall` record: the class, ctx's other
attributes, which outputs are differentiable, the shapes.

The marker's VJP (autodiff/rules/custom_function.py) is the Function's backward: `trace_backward` runs it with make_fx
on fake tensors of the call's shapes, with a ctx rebuilt from the record and `needs_input_grad` saying which inputs
need a gradient, into functional core ATen ops, and the autodiff inlines them. A backward that cannot be traced
(it reads tensor values into Python, or calls a kernel without a fake implementation) is refused naming the
Function. The forward's own ops get no cotangent through the marker, as in autograd. Autograd over the exported
program (the tests' oracle) runs the same backward eagerly (`run_backward`).
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch.autograd.function import Function, _is_setup_context_defined
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from pockengine.errors import CaptureError


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: torch.Tensor) -> _Shape:
        return _Shape(tuple(int(s) for s in t.shape), t.dtype, t.device)

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class FunctionCall:
    """What one call of a Function's `apply` left for its backward."""

    cls: type[Function]
    name: str  # module.qualname, as errors name it
    arity: int  # positional arguments of apply: backward returns one gradient per argument
    input_positions: tuple[int, ...]  # of each tensor input of the marker among them
    outputs: tuple[_Shape | None, ...]  # each output of the forward (None: not a tensor)
    differentiable: tuple[bool, ...]  # per tensor output: not marked non-differentiable, floating point
    materialize_grads: bool  # absent output gradients are passed as zeros (ctx.set_materialize_grads)
    ctx_leaves: tuple[Any, ...]  # (saved_tensors, attributes) flattened, tensors replaced by None
    ctx_spec: pytree.TreeSpec
    tensor_leaves: tuple[int, ...]  # positions of the tensors (the marker's `saved`) among ctx_leaves
    saved: tuple[_Shape, ...]

    def _ctx(self, saved: Sequence[torch.Tensor], needs: Sequence[bool]) -> _BackwardContext:
        leaves = list(self.ctx_leaves)
        for i, t in zip(self.tensor_leaves, saved):
            leaves[i] = t
        saved_tensors, attributes = pytree.tree_unflatten(leaves, self.ctx_spec)
        needs_input_grad = [False] * self.arity
        for position, need in zip(self.input_positions, needs):
            needs_input_grad[position] = need
        return _BackwardContext(saved_tensors, attributes, tuple(needs_input_grad))

    def backward(self, saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        """The Function's backward on `saved` (the marker's) and one gradient per tensor output (None: absent);
        one gradient (or None) per tensor input, None where `needs` is False."""
        present = iter(grads)
        output_grads = []
        for shape in self.outputs:
            g = next(present) if shape is not None else None
            if g is None and shape is not None and self.materialize_grads:
                g = shape.zeros()
            output_grads.append(g)
        result = self.cls.backward(self._ctx(saved, needs), *output_grads)
        result = result if isinstance(result, tuple) else (result,)
        if len(result) < self.arity:
            raise CaptureError(f"the backward of the custom torch.autograd.Function {self.name} returned "
                               f"{len(result)} gradients for its {self.arity} inputs")
        return [result[p] if need and isinstance(result[p], torch.Tensor) else None
                for p, need in zip(self.input_positions, needs)]


class _BackwardContext:
    """The ctx a Function's backward gets: what its forward saved and set, and which inputs need a gradient."""

    def __init__(self, saved_tensors: tuple, attributes: dict[str, Any], needs_input_grad: tuple[bool, ...]):
        self.__dict__.update(attributes)
        self.saved_tensors = self.saved_variables = saved_tensors
        self.needs_input_grad = needs_input_grad


class _RecordingContext:
    """The ctx a Function's forward gets while capturing: it records, as autograd's does, what the backward will
    read. Its own state lives in `_recorded`; every other attribute is the Function's."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self._recorded = {"saved": (), "non_differentiable": [], "materialize": True}
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        self._recorded["saved"] = tensors

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        self._recorded["non_differentiable"].extend(tensors)

    def mark_dirty(self, *tensors: torch.Tensor) -> None:
        pass  # the captured program is functional: the written input is a new value, the output

    def set_materialize_grads(self, value: bool) -> None:
        self._recorded["materialize"] = value

    def attributes(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("_recorded", "needs_input_grad")}


# The records live as long as the exported program that holds their markers (export() keeps them in its graph
# module's meta, and the capture made from it keeps them too); the process does not accumulate them.
_CALLS: weakref.WeakValueDictionary[int, FunctionCall] = weakref.WeakValueDictionary()
_NEXT_CALL = itertools.count()


def function_call(call: int) -> FunctionCall:
    try:
        return _CALLS[call]
    except KeyError:
        raise CaptureError(f"the record of custom autograd.Function call {call} is gone: the exported program it "
                           "was captured in has been freed; capture the model again") from None


def function_name(cls: type[Function]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@torch.library.custom_op("pockengine::autograd_function", mutates_args=())
def autograd_function(outputs: list[torch.Tensor], inputs: list[torch.Tensor], saved: list[torch.Tensor],
                      function: str, call: int) -> list[torch.Tensor]:
    return [o.clone() for o in outputs]


@autograd_function.register_fake
def _(outputs: list[torch.Tensor], inputs: list[torch.Tensor], saved: list[torch.Tensor], function: str,
      call: int) -> list[torch.Tensor]:
    return [torch.empty_like(o) for o in outputs]


def _marker_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    outputs, function_inputs, saved, _, call = inputs
    ctx.call = call
    ctx.arguments = (len(outputs), len(function_inputs), len(saved))
    ctx.needs = [t.requires_grad for t in function_inputs]
    ctx.save_for_backward(*saved)


def _marker_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    """Autograd over the exported program runs the Function's own backward, as eager autograd does."""
    record = function_call(ctx.call)
    grads = [g if differentiable else None for g, differentiable in zip(grads, record.differentiable)]
    n_outputs, _, n_saved = ctx.arguments
    input_grads = record.backward(ctx.saved_tensors, grads, ctx.needs)
    return [None] * n_outputs, input_grads, [None] * n_saved, None, None


autograd_function.register_autograd(_marker_backward, setup_context=_marker_setup)


# Reentrant activation checkpointing (`checkpoint(..., use_reentrant=True)`) is a Function whose backward reruns the
# forward under autograd: its gradient is the forward's derivative by construction, and it reaches the parameters
# of the checkpointed block through `.grad`, not through its inputs. The checkpointed function is captured as plain
# ops and differentiated (pockengine plans what the backward keeps itself): called directly, since the Function's
# forward runs it under `no_grad`, which the capture would read as a cut gradient (capture/stop_gradient.py).
CHECKPOINT = torch.utils.checkpoint.CheckpointFunction


def _apply_recorded(cls: type[Function], args: tuple, kwargs: dict, records: list[FunctionCall]) -> Any:
    """Run `cls`'s forward as `Function.apply` would, and pass its tensors through the marker."""
    new_style = _is_setup_context_defined(cls.setup_context)
    if new_style:
        bound = inspect.signature(cls.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args, kwargs = bound.args, bound.kwargs
    needs = tuple(isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex()) for a in args)
    ctx = _RecordingContext(needs)
    if new_style:
        out = cls.forward(*args, **kwargs)
        cls.setup_context(ctx, args, out)
    else:
        out = cls.forward(ctx, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    tensors = [o for o in outs if isinstance(o, torch.Tensor)]
    if not tensors:
        return out
    non_differentiable = ctx._recorded["non_differentiable"]
    leaves, spec = pytree.tree_flatten((tuple(ctx._recorded["saved"]), ctx.attributes()))
    tensor_leaves = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    saved = [leaves[i] for i in tensor_leaves]
    call = next(_NEXT_CALL)
    record = FunctionCall(
        cls=cls, name=function_name(cls), arity=len(args),
        input_positions=tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
        outputs=tuple(_Shape.of(o) if isinstance(o, torch.Tensor) else None for o in outs),
        differentiable=tuple((t.is_floating_point() or t.is_complex()) and not any(t is m for m in non_differentiable)
                             for t in tensors),
        materialize_grads=ctx._recorded["materialize"],
        ctx_leaves=tuple(None if i in tensor_leaves else leaf for i, leaf in enumerate(leaves)), ctx_spec=spec,
        tensor_leaves=tensor_leaves, saved=tuple(_Shape.of(t) for t in saved))
    records.append(record)
    _CALLS[call] = record
    marked = iter(autograd_function(tensors, [a for a in args if isinstance(a, torch.Tensor)], saved,
                                    function_name(cls), call))
    outs = tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in outs)
    return outs if isinstance(out, tuple) else outs[0]


_ORIGINAL_APPLY = Function.__dict__["apply"]
# The records of the capture running in each thread. torch creates Function classes lazily (custom ops' autograd)
# and may keep the `apply` it finds while a capture runs, so the patched apply holds no capture's state itself and
# outside a capture behaves as the original.
_RECORDING = threading.local()
# torch.library wraps each custom op in a Function named after it (torch._library.autograd.make_autograd_impl):
# pockengine's own ops (CTC loss traced while capturing) are differentiated by their VJP rules, not recorded.
_OWN_OP_AUTOGRAD = "GeneratedBackwardFor_pockengine_"


def _recording_apply(cls: type[Function], *args: Any, **kwargs: Any) -> Any:
    records = getattr(_RECORDING, "records", None)
    if records is None:  # no capture in this thread (another thread's eager autograd): untouched
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
    if cls.__name__.startswith(_OWN_OP_AUTOGRAD):  # one of pockengine's ops: in the graph as itself, its rule's
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
    if issubclass(cls, CHECKPOINT):
        run_function, _preserve_rng_state, *function_args = args
        return run_function(*function_args)
    return _apply_recorded(cls, args, kwargs, records)


@contextmanager
def recording_autograd_functions() -> Iterator[list[FunctionCall]]:
    """While exporting (in this thread), `Function.apply` records each call and marks its outputs; yields the
    records, which the caller keeps alive as long as the program that refers to them."""
    records: list[FunctionCall] = []
    _RECORDING.records = records
    Function.apply = classmethod(_recording_apply)
    try:
        yield records
    finally:
        _RECORDING.records = None
        Function.apply = _ORIGINAL_APPLY


def trace_backward(call: int, grads_present: Sequence[bool], needs: Sequence[bool], module: str,
                   decompositions: dict) -> torch.fx.GraphModule:
    """The backward of Function call `call` as a functional graph of core ATen ops. Its placeholders are the
    marker's saved tensors, then the gradients of the tensor outputs that are present; it returns one gradient
    (or None) per tensor input. A backward that cannot be traced is a CaptureError naming the Function."""
    record = function_call(call)
    n_saved = len(record.saved)

    def backward(*tensors: torch.Tensor) -> list[torch.Tensor | None]:
        present = iter(tensors[n_saved:])
        grads = [next(present) if p else None for p in grads_present]
        return record.backward(tensors[:n_saved], grads, needs)

    outputs = [shape for shape in record.outputs if shape is not None]
    examples = [s.empty() for s in record.saved] + [s.empty() for s, p in zip(outputs, grads_present) if p]
    try:
        with torch.no_grad():
            return make_fx(torch.func.functionalize(backward, remove="mutations"), tracing_mode="fake",
                           decomposition_table=decompositions)(*examples)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever stops the trace, the Function is named with it
        raise CaptureError(
            f"the custom torch.autograd.Function {record.name} (module '{module or '<top level>'}') lies on the path "
            "from the trained parameters to the loss, and its backward could not be traced into ATen ops: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}\npockengine runs a Function's own backward, traced "
            "at compile time on tensors of the call's shapes, so the backward must not read tensor values into "
            "Python (`if g.sum() > 0`, .item(), .tolist(), numpy) nor call kernels PyTorch cannot trace (C++/CUDA "
            "extensions without a fake implementation). Either train only parameters after it (freeze the layers "
            "before it in the scheme, or set requires_grad=False on them), or write the backward with torch ops "
            "on shapes alone.") from e
