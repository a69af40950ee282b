"""Capture: model + loss -> our IR, through torch.export and the core ATen decompositions.

Parameters and buffers are lifted to graph inputs named by their `model.named_parameters()` names, the batch is
flattened into tensor inputs, and every node keeps the dotted path of the module that produced it.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import operator
import sys
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch._decomp import decompositions as torch_decompositions
from torch.export import ExportedProgram
from torch.export import exported_program as torch_exported_program
from torch.export.graph_signature import InputKind, OutputKind
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from pockengine.capture.causal_mask_hint import causal_mask_hint_unread
from pockengine.capture.ctc_loss import traceable_ctc_loss
from pockengine.capture.distributions import distribution_checks_off
from pockengine.capture.export_errors import export_failure, parameter_mutation_error
from pockengine.capture.functions import FunctionCall, recording_autograd_functions
from pockengine.capture.gradient_hooks import refuse_gradient_hooks, tensor_hooks_refused
from pockengine.capture.kernel_layouts import views_tolerate_kernel_layouts
from pockengine.capture.layer_drop import traceable_layer_drop
from pockengine.capture.locations import module_path, strip_model_prefix
from pockengine.capture.masked_rows import rewrite_masked_rows
from pockengine.capture.module_casts import unchanging_module_casts_skipped
from pockengine.capture.patched import patched
from pockengine.capture.position_loops import rewrite_position_loops, traceable_position_loops
from pockengine.capture.python_random import no_python_random
from pockengine.capture.spec_augment import traceable_spec_augment
from pockengine.capture.stop_gradient import mark_stop_gradients, traceable_gradient_cuts
from pockengine.capture.tensor_checks import rewrite_tensor_checks
from pockengine.capture.strided_windows import read_windows_from_storage_order
from pockengine.capture.value_branches import Site, branches_taken, traceable_value_branches
from pockengine.errors import CaptureError, UserInputError
from pockengine.ir.graph import BATCH, BUFFER, PARAM, Graph, Node, TensorMeta, meta_of

FUNCTION_CALLS = "pockengine_function_calls"  # key of the exported graph module's meta


class _ModelWithLoss(nn.Module):
    # holds the user's model as `model`: capture/locations.py reads module paths relative to it
    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: Any, target: Any) -> torch.Tensor:
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(*inputs)
        return self.loss_fn(out, target)


@dataclass
class Captured:
    graph: Graph
    params: dict[str, Node]  # parameter name -> input node
    buffers: dict[str, Node]
    batch: list[Node | None]  # flattened batch leaves, in pytree order; None for a leaf traced as a constant
    loss: Node
    buffer_updates: dict[str, Node] = field(default_factory=dict)  # buffer name -> its new value
    function_calls: list[FunctionCall] = field(default_factory=list)  # the custom Functions' records the rules read

    def copy(self) -> Captured:
        """The same capture on a copy of its graph, for a pipeline to change in place (exporting again would cost
        most of a compile)."""
        graph, nodes = self.graph.copy()
        return Captured(graph, {k: nodes[v] for k, v in self.params.items()},
                        {k: nodes[v] for k, v in self.buffers.items()},
                        [None if n is None else nodes[n] for n in self.batch], nodes[self.loss],
                        {k: nodes[v] for k, v in self.buffer_updates.items()}, self.function_calls)


def normalize_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, target) with inputs a tuple of positional arguments or a dict of keyword arguments."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise UserInputError(
            "a batch must be a pair (inputs, target); inputs is a tuple of positional model arguments or a dict "
            f"of keyword arguments. Got {type(batch).__name__}" + (f" of length {len(batch)}" if
                                                                    isinstance(batch, (tuple, list)) else ""))
    inputs, target = batch
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, (tuple, dict)):
        raise UserInputError(f"batch inputs must be a tensor, a tuple or a dict, got {type(inputs).__name__}")
    return inputs, target


# Activations the default core-ATen table would split into element-wise ops (silu -> x * sigmoid(x)). Whole, their
# VJP rules keep just the input for the backward pass; split, the backward would keep the input, the sigmoid and the
# product: three activations instead of one (SmolLM2's MLP). Attention stays whole too: its rule chooses between
# the math form and the fused flash kernels per shape (pockengine/autodiff/rules/attention.py).
# Ops whose decomposition computes a branch that `where` then drops are kept whole too: the dropped branch's
# backward multiplies its zero cotangent by an infinite derivative, and the NaN reaches the input.
# _safe_softmax (attention with fully masked rows: the softmax of an all -inf row), special_log_ndtr (log1p(-1)).
KEEP_WHOLE = (torch.ops.aten.silu.default, torch.ops.aten.hardswish.default, torch.ops.aten.hardsigmoid.default,
              torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten._safe_softmax.default,
              torch.ops.aten.special_log_ndtr.default)


def _stacked_recurrent_layers(input: torch.Tensor, hidden: Any, params: Any, has_biases: bool, num_layers: int,
                              dropout: float, train: bool, bidirectional: bool, batch_first: bool,
                              layer_fn: Callable) -> tuple[torch.Tensor, list]:
    """torch's `_rnn_helper` (the decomposition of stacked LSTM/GRU/RNN layers) with the dropout between layers
    that torch 2.13's leaves out: it zeroes its rate unless `num_layers < i - 1`, which never holds, so a model
    with `nn.LSTM(num_layers=2, dropout=0.1)` in training mode would be captured without dropout."""
    input = input.transpose(0, 1) if batch_first else input
    final_hiddens = []
    for i in range(num_layers):
        cur_params, cur_hidden, bidir_params, bidir_hidden = torch_decompositions.params_hiddens(
            params, hidden, i, bidirectional)
        output, out_hidden = layer_fn(input, cur_hidden, cur_params, has_biases)
        final_hiddens.append(out_hidden)
        if bidirectional:
            backward_output, backward_hidden = layer_fn(input, bidir_hidden, bidir_params, has_biases, reverse=True)
            final_hiddens.append(backward_hidden)
            output = torch.cat([output, backward_output], output.dim() - 1)
        input = output
        if dropout != 0 and train and i < num_layers - 1:
            input = torch.dropout(input, dropout, train=True)
    input = input.transpose(0, 1) if batch_first else input
    return input, final_hiddens


def _recurrent_dropout_kept() -> AbstractContextManager:
    """torch's LSTM/GRU/RNN decompositions look `_rnn_helper` up when they run: they get the corrected one."""
    return patched(torch_decompositions, "_rnn_helper", _stacked_recurrent_layers)


_SPLITS: dict[tuple, tuple[dict, dict]] = {}  # the split of decompositions(), by state of the operator registry


def _decomposition_split_reused() -> AbstractContextManager:
    """run_decompositions splits its table into the CompositeImplicitAutograd ops to override and the decompositions
    applied after autograd, walking every operator namespace anew on each call: a fifth of a small model's capture.
    The table is always `decompositions()`, so the split is made once per state of what it depends on (the ops with
    a CompositeImplicitAutograd kernel and the operator namespaces; torch itself reads the aten namespace once)."""
    original = torch_exported_program._split_decomp_table_to_cia_and_python_decomp

    def split(table: dict) -> tuple[dict, dict]:
        key = (tuple(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd")),
               tuple((name, len(getattr(torch.ops, name)._dir)) for name in torch.ops._dir if name != "aten"))
        if key not in _SPLITS:
            _SPLITS.clear()
            _SPLITS[key] = original(table)
        cia, post_autograd = _SPLITS[key]
        return dict(cia), dict(post_autograd)

    return patched(torch_exported_program, "_split_decomp_table_to_cia_and_python_decomp", split)


@functools.cache
def decompositions() -> dict:
    """Built once: materializing the default table takes a quarter of a second (run_decompositions copies it)."""
    table = dict(torch.export.default_decompositions().items())
    for op in KEEP_WHOLE:
        table.pop(op, None)
    return table


@contextmanager
def _quiet_export() -> Iterator[None]:
    # A shape error inside export is logged with its whole traceback before it is raised, a data-dependent one with
    # a warning that it found no user code, and torch.export prints the graph it had traced so far to stderr before
    # it re-raises: we report the error ourselves (export_errors.py names the model's line). What else the export
    # writes to stderr (warnings) is written out as it was.
    # torch 2.13's export copies its own tree specs through an API it deprecates, warning once per compile.
    # Nothing reads the Python stack trace torch.fx records on every node (a tenth of a capture): not recorded
    # where torch has the switch (2.12 and later).
    logs = [logging.getLogger(name) for name in ("torch._subclasses.fake_tensor",
                                                  "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in logs]
    stack_traces = getattr(torch.fx.config, "do_not_emit_stack_traces", None)
    for log in logs:
        log.setLevel(logging.CRITICAL)
    if stack_traces is not None:
        torch.fx.config.do_not_emit_stack_traces = True
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stderr(stderr):
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    except BaseException as e:
        partial_graph = getattr(e, "partial_fx_graph", None)
        if partial_graph is not None:
            stderr = io.StringIO(stderr.getvalue().replace(f"{partial_graph}\n", ""))
        raise
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
        if stack_traces is not None:
            torch.fx.config.do_not_emit_stack_traces = stack_traces
        sys.stderr.write(stderr.getvalue())


def _eager_loss(model: nn.Module, loss_fn: Callable, inputs: Any, target: Any, grad: bool = False) -> torch.Tensor:
    """The loss of the model on this batch in plain PyTorch (the model's buffers and torch's random generators are
    restored afterwards); `grad`: with gradients enabled, as torch.export traces (a model may branch on them)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({b.device.index or 0 for b in [*buffers.values(), *model.parameters()] if b.device.type == "cuda"})
    try:
        with torch.set_grad_enabled(grad), torch.random.fork_rng(devices=devices):
            return _ModelWithLoss(model, loss_fn)(inputs, target)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _eager_error(model: nn.Module, loss_fn: Callable, inputs: Any, target: Any) -> Exception | None:
    """The error the model and loss raise on this batch in plain PyTorch, if any."""
    try:
        _eager_loss(model, loss_fn, inputs, target)
    except Exception as e:  # noqa: BLE001  (whatever the model raises is what the user must see)
        return e
    return None


def _shapes(tree: Any) -> str:
    return str(pytree.tree_map_only(torch.Tensor, lambda t: list(t.shape), tree))


def _tracing_contexts(model: nn.Module, loss_fn: Callable, inputs: Any, target: Any, skipped: frozenset,
                      branches: dict[Site, list[bool]]) -> list[AbstractContextManager]:
    """What is in force while torch.export traces the model with its loss, in order; each module says why.
    - gradients enabled, so that the model's own `no_grad` blocks leave regions in the graph (stop_gradient.py);
    - the math attention backend: traced with it, attention returns a dense (..., heads, L, E) tensor, and the views
      after it are recorded for that layout, which both of pockengine's attention kernels produce. Traced with the
      CPU's flash kernel, which lays its output out as (batch, L, heads, E), a model's `transpose(1, 2).reshape(...)`
      is recorded as a plain view that fails on any other layout (GPT-2: "Cannot view a tensor");
    - custom autograd.Functions recorded (functions.py); torch's noise kept off the terminal;
    - Hugging Face's random draws in Python (layer drop's branch, SpecAugment's numpy mask) traced as random ops of
      the program, any other draw from Python's or numpy's generator refused (python_random.py, spec_augment.py,
      layer_drop.py);
    - `.data` and `inference_mode` as the gradient cuts they are (stop_gradient.py), gradient hooks refused
      (gradient_hooks.py), torch.nn's causal-mask hint not read off the mask (causal_mask_hint.py), module casts
      that change nothing skipped (module_casts.py), torch.distributions without their argument checks
      (distributions.py), CTC loss with tensor lengths as one op (ctc_loss.py), branches on values that torch.export
      could not trace decided as eager PyTorch decides them on the batch, and asserted (value_branches.py)."""
    return [torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), _quiet_export(),
            no_python_random(model, lambda: _eager_loss(model, loss_fn, inputs, target)),
            traceable_spec_augment(model), traceable_layer_drop(model), traceable_gradient_cuts(),
            tensor_hooks_refused(), causal_mask_hint_unread(), unchanging_module_casts_skipped(model),
            distribution_checks_off(), traceable_position_loops(skipped), traceable_ctc_loss(),
            traceable_value_branches(branches)]


def export(model: nn.Module, loss_fn: Callable, batch: Any) -> ExportedProgram:
    inputs, target = normalize_batch(batch)
    refuse_gradient_hooks(model)
    wrapper = _ModelWithLoss(model, loss_fn)
    skipped: frozenset = frozenset()  # static loops' positions eager PyTorch did not find, where their bodies fail
    branches: dict[Site, list[bool]] = {}  # the branches on values decided so far, as eager PyTorch took them
    while True:
        try:
            with ExitStack() as tracing:
                function_calls = tracing.enter_context(recording_autograd_functions())
                for context in _tracing_contexts(model, loss_fn, inputs, target, skipped, branches):
                    tracing.enter_context(context)
                ep = torch.export.export(wrapper, (inputs, target))
                mark_stop_gradients(ep.graph_module)  # before the decompositions turn `detach` into `alias`
                with _recurrent_dropout_kept(), _decomposition_split_reused():
                    ep = ep.run_decompositions(decompositions())
            ep.graph_module.meta[FUNCTION_CALLS] = function_calls  # alive while the program refers to them
            break
        except CaptureError:
            raise  # ours, raised while tracing: it says what to do already
        except Exception as e:  # torch.export raises many types; one error that says what to do instead
            eager = _eager_error(model, loss_fn, inputs, target)
            if eager is not None:
                raise UserInputError(
                    f"the model and loss_fn fail on this batch in plain PyTorch too, so the batch does not fit the "
                    f"model: {type(eager).__name__}: {str(eager)[:1000]}\nBatch shapes: inputs {_shapes(inputs)}, "
                    f"target {_shapes(target)}. A batch may differ from the example batch only where the model "
                    "allows it (the batch size, a sequence length); its feature sizes must be the example's.") from e
            branch = getattr(e, "pockengine_value_branch", None)  # capture/value_branches.py
            if branch is not None and branch not in branches:
                taken = branches_taken(lambda: _eager_loss(model, loss_fn, inputs, target, grad=True))
                if branch in taken:
                    branches[branch] = taken[branch]
                    continue
            position = getattr(e, "pockengine_static_loop", None)  # capture/position_loops.py
            if position is None or position in skipped:
                raise export_failure(e, model) from e
            # eager PyTorch ran the batch, so it never found the position where the static loop's body failed:
            # traced again without it, the program asserting that it is not found
            skipped |= {position}
    rewrite_tensor_checks(ep.graph_module)
    rewrite_position_loops(ep.graph_module)
    rewrite_masked_rows(ep.graph_module)
    views_tolerate_kernel_layouts(ep.graph_module)
    read_windows_from_storage_order(ep.graph_module)
    return ep


_TOKEN = object()  # the value of torch.export's effect tokens: they only order side effects


@dataclass(frozen=True)
class _Effect:
    """The value of a `with_effects` call: (token, *outputs of `node`)."""

    node: Node
    outputs: int

    def item(self, graph: Graph, index: int) -> Any:
        if index == 0:
            return _TOKEN
        return self.node if self.outputs == 1 else graph.getitem(self.node, index - 1)


@dataclass(frozen=True)
class _Checked:
    """A number read out of a 0-d tensor (`.item()`) only to be checked (`assert lengths.max().item() <= n`), or a
    comparison of it: the check runs on `tensor`, the number is never read out."""

    tensor: Node


# A comparison of a number read out of a tensor, as the same comparison of the tensor (a 0-d bool tensor).
_TENSOR_COMPARISONS = {operator.le: torch.ops.aten.le.Scalar, operator.lt: torch.ops.aten.lt.Scalar,
                       operator.ge: torch.ops.aten.ge.Scalar, operator.gt: torch.ops.aten.gt.Scalar,
                       operator.eq: torch.ops.aten.eq.Scalar, operator.ne: torch.ops.aten.ne.Scalar}


def _checked_value(graph: Graph, fx_node: torch.fx.Node, args: tuple, module: str | None, section: str
                   ) -> _Checked | None:
    """torch.export records `assert x.item() <= n` as _local_scalar_dense -> le -> _assert_scalar. Where every use
    of the number is such a check, it becomes the tensor's own comparison and `_assert_async`, which checks it as
    the program runs without reading the number into Python; None for any other node."""
    def checks_only(n: torch.fx.Node) -> bool:
        return all(u.target is torch.ops.aten._assert_scalar.default or
                   (u.target in _TENSOR_COMPARISONS and checks_only(u)) for u in n.users)

    target = fx_node.target
    if target is torch.ops.aten._local_scalar_dense.default and checks_only(fx_node):
        return _Checked(args[0])
    if target in _TENSOR_COMPARISONS and len(args) == 2 and any(isinstance(a, _Checked) for a in args):
        (x, other), op = (args, target) if isinstance(args[0], _Checked) else (args[::-1], _MIRRORED[target])
        if not isinstance(other, (int, float, bool)):
            return None
        return _Checked(graph.call(_TENSOR_COMPARISONS[op], (x.tensor, other), {}, module=module, section=section,
                                   name=fx_node.name))
    if target is torch.ops.aten._assert_scalar.default and isinstance(args[0], _Checked):
        graph.call(torch.ops.aten._assert_async.msg, (args[0].tensor, args[1]), {}, module=module, section=section,
                   name=fx_node.name, meta=None)
        return _Checked(args[0].tensor)
    return None


_MIRRORED = {operator.le: operator.ge, operator.lt: operator.gt, operator.ge: operator.le, operator.gt: operator.lt,
             operator.eq: operator.eq, operator.ne: operator.ne}  # n <= x is x >= n


def _check_static_shapes(fx_node: torch.fx.Node, val: Any, module: str | None) -> None:
    """pockengine compiles one program per batch shape: an op whose output shape depends on tensor values
    (masked_select, nonzero, tensor_split at tensor indices: torch.export marks such sizes and the scalars read
    out of tensors to compute them with symbols) cannot be part of it."""
    leaves = pytree.tree_leaves(val)
    shapes = [v.shape for v in leaves if isinstance(v, torch.Tensor)]
    if any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in leaves) or any(
            not isinstance(d, int) for shape in shapes for d in shape):
        what = (f"returns a tensor whose shape depends on the values of its inputs "
                f"({', '.join(str(list(s)) for s in shapes)})" if shapes else
                "reads a tensor's value into a Python number (.item(), or a tensor used as a size or index)")
        where = "the loss" if module is None else f"module '{module}'" if module else "the model's forward"
        raise CaptureError(
            f"{fx_node.target} (node {fx_node.name}, {where}) {what}; pockengine compiles programs of fixed shapes. "
            "Write it with a fixed shape instead, for example torch.where(mask, x, 0) in place of x[mask] or "
            "masked_select, or split at Python integers rather than at tensor indices; or do it outside the model, "
            "when the batch is prepared.")


def _leaf_name(model: nn.Module, ep: ExportedProgram, index: int) -> str:
    """How the user knows batch leaf `index`: the model's argument name, or the target."""
    path = pytree.tree_flatten_with_path(ep.example_inputs[0])[0][index][0]
    if path[0] == pytree.SequenceKey(1) or len(path) < 2:
        return "the target"
    key = path[1]
    if isinstance(key, pytree.MappingKey):
        return f"input '{key.key}'"
    names = list(inspect.signature(model.forward).parameters)
    return f"input '{names[key.idx]}'" if key.idx < len(names) else f"positional input {key.idx}"


def _input_mutation_error(model: nn.Module, ep: ExportedProgram, name: str, new_value: torch.fx.Node
                          ) -> CaptureError:
    module, inside = module_path(new_value)
    where = (f"in module '{module}'" if module else "in the model's forward") if inside else "in loss_fn"
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    index = user_inputs.index(name)
    return CaptureError(
        f"the model writes in place to its {_leaf_name(model, ep, index)} (batch leaf {index}) {where}; "
        "pockengine does not write into the batch. Make the operation out-of-place (x = x * 2 instead of "
        "x.mul_(2), x = x + y instead of x += y), or clone the input before changing it (x = x.clone()).")


def capture(model: nn.Module, loss_fn: Callable, batch: Any) -> Captured:
    """Our IR of `model` with `loss_fn` on batches like `batch`. Nothing of the export outlives it: the exported
    program is dropped once read, and so is what torch.export leaves in its globals (`_export_leftovers_dropped`)."""
    with _export_leftovers_dropped():
        return from_exported(model, export(model, loss_fn, batch))


@contextmanager
def _export_leftovers_dropped() -> Iterator[None]:
    """torch.export keeps, after it returns, a global map from its last trace's fake tensors to their FX nodes
    (the whole pre-decomposition graph, with a fake tensor per value), the source of every GraphModule it
    generated (torch.fx's eval cache), and, in Python's linecache, the lines of every source file it read to record
    where ops come from (a megabyte for MobileNetV2). None of it is read again: the GraphModules are gone once the
    capture is read, and linecache reads a file again when asked. What the capture added is dropped; entries that
    were there before are not touched."""
    import linecache

    from torch.fx.experimental import proxy_tensor
    from torch.fx.graph_module import _loader

    sources, lines = set(_loader.eval_cache), set(linecache.cache)
    try:
        yield
    finally:
        proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()
        for key in set(_loader.eval_cache) - sources:
            del _loader.eval_cache[key]
        for key in set(linecache.cache) - lines:
            linecache.cache.pop(key, None)


def from_exported(model: nn.Module, ep: ExportedProgram) -> Captured:
    """Our IR of `ep`, the exported and decomposed `model` with its loss (see `export`)."""
    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs}
    graph = Graph()
    env: dict[torch.fx.Node, Any] = {}  # mostly Nodes; constants, tokens and _Effects too
    params: dict[str, Node] = {}
    buffers: dict[str, Node] = {}
    batch_nodes: list[Node | None] = []
    loss: Node | None = None
    buffer_updates: dict[str, Node] = {}
    # Tied parameters (an LM head sharing the embedding) are lifted once per name; all of them are one tensor,
    # so they become one input under the name named_parameters() gives it.
    canonical = {id(p): n for n, p in model.named_parameters()}

    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            spec = kinds[fx_node.name]
            val = fx_node.meta["val"]
            if spec.kind == InputKind.TOKEN:
                env[fx_node] = _TOKEN
                continue
            if spec.kind == InputKind.USER_INPUT and not isinstance(val, torch.Tensor):
                # A leaf that is not a tensor (a None target, a number) was traced as a constant.
                env[fx_node] = val
                batch_nodes.append(None)
                continue
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"the captured program takes {fx_node.name}, a {type(val).__name__} (not a tensor, "
                                   f"input kind {spec.kind.name}): an object the model builds or keeps, such as a "
                                   "torch.Generator made in forward(); pass random values in as tensors instead")
            meta = TensorMeta(tuple(int(s) for s in val.shape), val.dtype)
            if spec.kind == InputKind.PARAMETER:
                name = canonical[id(model.get_parameter(strip_model_prefix(spec.target)))]
                if name not in params:
                    params[name] = graph.input(name, PARAM, meta, module=name.rpartition(".")[0])
                env[fx_node] = params[name]
            elif spec.kind == InputKind.BUFFER:
                name = strip_model_prefix(spec.target)
                env[fx_node] = buffers[name] = graph.input(name, BUFFER, meta, module=name.rpartition(".")[0])
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                env[fx_node] = graph.constant(fx_node.name, ep.constants[spec.target])
            elif spec.kind == InputKind.USER_INPUT:
                node = graph.input(f"batch{len(batch_nodes)}", BATCH, meta)
                batch_nodes.append(node)
                env[fx_node] = node
            else:
                raise CaptureError(f"unsupported graph input kind {spec.kind} for {fx_node.name}")
        elif fx_node.op == "call_function" and fx_node.target is torch.ops.aten._assert_tensor_metadata.default:
            continue  # an export-time dtype check our static metadata already guarantees
        elif fx_node.op == "call_function":
            args, kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a,
                                           (fx_node.args, fx_node.kwargs))
            module, inside = module_path(fx_node)
            section = "forward" if inside else "loss"
            if (checked := _checked_value(graph, fx_node, args, module, section)) is not None:
                env[fx_node] = checked
                continue
            val = fx_node.meta.get("val")
            _check_static_shapes(fx_node, val, module if inside else None)
            if fx_node.target is operator.getitem and isinstance(args[0], _Effect):
                env[fx_node] = args[0].item(graph, args[1])
            elif fx_node.target is torch.ops.higher_order.with_effects:
                # (token, op, *args): the token only orders effects, and our program runs ops in graph order.
                # The op itself (an error check such as _linalg_check_errors) stays; dead-code elimination
                # keeps it although nothing reads it (ir.graph.has_side_effects).
                _, op, *op_args = args
                outputs = tuple(val[1:]) if isinstance(val, (tuple, list)) else ()
                meta = meta_of(outputs[0]) if len(outputs) == 1 else meta_of(outputs) if outputs else None
                node = graph.call(op, tuple(op_args), kwargs, module=module, section=section, name=fx_node.name,
                                  meta=meta)
                env[fx_node] = _Effect(node, len(outputs))
            else:
                meta = meta_of(val)  # lists of outputs (split) become tuples, like every multi-output op
                env[fx_node] = graph.call(fx_node.target, args, kwargs, module=module, section=section,
                                          name=fx_node.name, meta=meta if val is not None else None)
        elif fx_node.op == "output":
            _check_one_loss([out for spec, out in zip(sig.output_specs, fx_node.args[0])
                             if spec.kind == OutputKind.USER_OUTPUT])
            for spec, out in zip(sig.output_specs, fx_node.args[0]):
                if spec.kind == OutputKind.USER_OUTPUT:
                    loss = env[out]
                elif spec.kind == OutputKind.BUFFER_MUTATION:
                    buffer_updates[strip_model_prefix(spec.target)] = env[out]
                elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                    raise _input_mutation_error(model, ep, spec.target, out)
                elif spec.kind == OutputKind.PARAMETER_MUTATION:
                    raise parameter_mutation_error(strip_model_prefix(spec.target), module_path(out)[0], out)
                elif spec.kind != OutputKind.TOKEN:
                    raise CaptureError(f"unsupported graph output kind {spec.kind}")
        else:
            raise CaptureError(f"unexpected node {fx_node.op} {fx_node.target} in the exported graph")

    if loss is None or not isinstance(loss.meta, TensorMeta):
        raise UserInputError("loss_fn must return one tensor (the scalar loss)")
    if loss.meta.shape != ():
        raise UserInputError(
            f"loss_fn must return a scalar, got a tensor of shape {list(loss.meta.shape)}; "
            "reduce it, for example with .mean() or reduction='mean'")
    if not loss.meta.is_float:
        raise UserInputError(f"loss_fn must return a floating-point scalar, got {loss.meta.dtype}")
    return Captured(graph, params, buffers, batch_nodes, loss, buffer_updates,
                    ep.graph_module.meta.get(FUNCTION_CALLS, []))


def _check_one_loss(outputs: list[Any]) -> None:
    """loss_fn returns exactly one tensor: with more the trainer could only guess which one to minimise."""
    if len(outputs) != 1:
        raise UserInputError(
            f"loss_fn must return one scalar tensor, the loss to minimise; it returned {len(outputs)} values. "
            "Return only the loss (compute logged extras outside loss_fn, or add the terms into the loss)")
    if not isinstance(outputs[0], torch.fx.Node):
        raise UserInputError(f"loss_fn must return a scalar tensor, the loss to minimise; it returned "
                             f"{type(outputs[0]).__name__} {outputs[0]!r:.50}: compute the loss with torch ops on "
                             "the model output")
