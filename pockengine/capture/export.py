"""Capture: model + loss -> our IR, through torch.export and the core ATen decompositions.

Parameters and buffers are lifted to graph inputs named by their `model.named_parameters()` names, the batch is
flattened into tensor inputs, and every node keeps the dotted path of the module that produced it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from pockengine.errors import CaptureError, UserInputError
from pockengine.ir.graph import BATCH, BUFFER, PARAM, Graph, Node, TensorMeta, meta_of

_MODEL = "model"  # attribute name of the user's model inside the capture wrapper


class _ModelWithLoss(nn.Module):
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
    batch: list[Node]  # flattened batch leaves, in pytree order
    loss: Node
    buffer_updates: dict[str, Node] = field(default_factory=dict)  # buffer name -> its new value


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


def _strip_model_prefix(path: str) -> str:
    if path == _MODEL:
        return ""
    return path.removeprefix(_MODEL + ".")


def _module_path(fx_node: torch.fx.Node) -> tuple[str, bool]:
    """(module path relative to the model, whether the node lies inside the model rather than in the loss)."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", False
    path = list(stack.values())[-1][0]
    inside = path == _MODEL or path.startswith(_MODEL + ".")
    return (_strip_model_prefix(path) if inside else ""), inside


# Activations the default core-ATen table would split into element-wise ops (silu -> x * sigmoid(x)). Whole, their
# VJP rules keep just the input for the backward pass; split, the backward would keep the input, the sigmoid and the
# product: three activations instead of one (SmolLM2's MLP).
# Ops whose decomposition computes a branch that `where` then drops are kept whole too: the dropped branch's
# backward multiplies its zero cotangent by an infinite derivative, and the NaN reaches the input.
# _safe_softmax (attention with fully masked rows: the softmax of an all -inf row), special_log_ndtr (log1p(-1)).
KEEP_WHOLE = (torch.ops.aten.silu.default, torch.ops.aten.hardswish.default, torch.ops.aten.hardsigmoid.default,
              torch.ops.aten._safe_softmax.default, torch.ops.aten.special_log_ndtr.default)


@functools.cache
def _decompositions() -> dict:
    """Built once: materializing the default table takes a quarter of a second (run_decompositions copies it)."""
    table = dict(torch.export.default_decompositions().items())
    for op in KEEP_WHOLE:
        table.pop(op, None)
    return table


def export(model: nn.Module, loss_fn: Callable, batch: Any) -> ExportedProgram:
    inputs, target = normalize_batch(batch)
    wrapper = _ModelWithLoss(model, loss_fn)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, (inputs, target))
        return ep.run_decompositions(_decompositions())
    except Exception as e:  # torch.export raises many types; one error that says what to do instead
        raise CaptureError(
            f"torch.export could not capture the model with its loss: {type(e).__name__}: {str(e)[:2000]}\n"
            "pockengine needs a model whose forward (and loss_fn) torch.export can trace: no data-dependent "
            "Python control flow on tensor values and no calls that leave PyTorch (.item(), numpy)."
        ) from e


def _check_static_shape(fx_node: torch.fx.Node, val: Any) -> None:
    """pockengine plans every tensor's size at compile time: an op whose output size depends on tensor values
    (masked_select, nonzero, unique...) cannot be compiled."""
    for leaf in pytree.tree_leaves(val):
        sizes = leaf.shape if isinstance(leaf, torch.Tensor) else [leaf]
        if any(isinstance(s, torch.SymInt) for s in sizes):
            raise CaptureError(
                f"{fx_node.target} (node {fx_node.name}) returns a tensor whose size depends on tensor values; "
                "pockengine compiles static shapes. Compute it outside the model, or use a fixed-size form "
                "(torch.where instead of masked_select, a padded index instead of nonzero).")


def capture(model: nn.Module, loss_fn: Callable, batch: Any) -> Captured:
    ep = export(model, loss_fn, batch)
    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs}
    graph = Graph()
    env: dict[torch.fx.Node, Node] = {}
    params: dict[str, Node] = {}
    buffers: dict[str, Node] = {}
    batch_nodes: list[Node] = []
    loss: Node | None = None
    buffer_updates: dict[str, Node] = {}
    # Tied parameters (an LM head sharing the embedding) are lifted once per name; all of them are one tensor,
    # so they become one input under the name named_parameters() gives it.
    canonical = {id(p): n for n, p in model.named_parameters()}

    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            spec = kinds[fx_node.name]
            val = fx_node.meta["val"]
            meta = TensorMeta(tuple(int(s) for s in val.shape), val.dtype)
            if spec.kind == InputKind.PARAMETER:
                name = canonical[id(model.get_parameter(_strip_model_prefix(spec.target)))]
                if name not in params:
                    params[name] = graph.input(name, PARAM, meta, module=name.rpartition(".")[0])
                env[fx_node] = params[name]
            elif spec.kind == InputKind.BUFFER:
                name = _strip_model_prefix(spec.target)
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
            module, inside = _module_path(fx_node)
            val = fx_node.meta.get("val")
            _check_static_shape(fx_node, val)
            meta = meta_of(val)  # lists of outputs (split) become tuples, like every multi-output op
            env[fx_node] = graph.call(fx_node.target, args, kwargs, module=module,
                                      section="forward" if inside else "loss", name=fx_node.name,
                                      meta=meta if val is not None else None)
        elif fx_node.op == "output":
            for spec, out in zip(sig.output_specs, fx_node.args[0]):
                if spec.kind == OutputKind.USER_OUTPUT:
                    loss = env[out]
                elif spec.kind == OutputKind.BUFFER_MUTATION:
                    buffer_updates[_strip_model_prefix(spec.target)] = env[out]
                else:
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
    return Captured(graph, params, buffers, batch_nodes, loss, buffer_updates)
