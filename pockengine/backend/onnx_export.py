"""The compiled training step as one ONNX model, for devices that have only an inference runtime (onnxruntime).

The program (`Trainer.program()`: forward, loss, backward and the optimizer's update, pruned by the scheme and
optimized by the passes) becomes a torch.fx module that torch.onnx's exporter (torch.export, then onnxscript's
torchlib) translates op by op:

- inputs: the batch's tensors, `lr` (float64) and `step` (int64, the 1-based number of this update: AdamW's bias
  corrections) where the optimizer has run-time scalars, then every tensor a step changes (the trained parameters,
  only the trained channels of a partially trained one; the optimizer state; train-mode BatchNorm statistics);
- outputs: `loss`, then the new value of each of those (named `new:` + the input's name), then the result of each
  check the program makes of its batch (`check:<i>`, a boolean: ONNX has no assertion; the runner raises, naming
  the check, and keeps the step's results out, as for a non-finite loss);
- frozen weights, buffers and constants are initializers (stored as external data above `EXTERNAL_DATA_BYTES`).

The optimizer's scalars (`Optimizer.schedule`) are computed inside the model from `lr` and `step`, in float64 as the
torch backend computes them in Python. A step's in-place updates run on copies of the inputs, which
torch.export's functionalization turns into plain values: the model never writes its inputs (the runner binds the
outputs to a second set of buffers instead, pockengine/runtime/onnx.py). pockengine's own ops are written as ATen
ops ONNX has: the bit masks of pockengine/kernels/masks.py as boolean masks (ONNX has no bit packing; see
`pack_keep`); the flash attention that drops its mask when the batch has no padding (pockengine/kernels/attention.py)
is exported in its masked form, which gives the same result without a run-time branch. A random op (dropout in train
mode) is refused: ONNX Runtime's generator is not the trainer's. Single-element operands of element-wise ops are
given their output's rank (`_full_rank_scalars`: onnxruntime's slow broadcast path).

The gradient program exports too (`gradients=True`): inputs the batch and the trained parameters, outputs `loss` and
`grad:<name>` per trained parameter at its full shape.

Beside the model, `<model>.init.safetensors` holds the initial value of every carried input (named as the input),
and, for a partially trained parameter, its full frozen tensor (`frozen:<name>`) from which the runner writes full
weights back. The model's metadata (`pockengine`, JSON) says what each input is (see `describe`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._decomp
from torch import fx

from pockengine.errors import PockEngineError
from pockengine.ir.graph import BATCH, BUFFER, CONST, PARAM, SCALAR, STATE, Graph, Node
from pockengine.ir.ops import draws_nothing, draws_random, is_mutating, is_view
from pockengine.kernels import (APPLY_KEEP_, ATEN_EQUIVALENTS, FLASH_UNMASKED_IF, FLASH_UNMASKED_IF_BACKWARD,
                                PACK_KEEP)
from pockengine.optim.update import GRADIENT_OUTPUT
from pockengine.runtime import FROZEN_PREFIX, METADATA_KEY, init_path

if TYPE_CHECKING:
    from pockengine.trainer import Trainer

aten = torch.ops.aten
FORMAT = 1  # version of the metadata layout the runner reads
NEW_PREFIX = "new:"  # output name of a carried input's value after the step
CHECK_PREFIX = "check:"  # output name of a check's result (a boolean the runner tests)
_ASSERTS = (aten._assert_async.msg, aten._assert_async.default)
EXTERNAL_DATA_BYTES = 256 * 2 ** 20  # initializers above this go to a `.data` file beside the model
OPSET = 18


class OnnxExportError(PockEngineError):
    """The program has an op ONNX (or torch.onnx's translator) cannot express; the message names it and its module."""


def export(trainer: Trainer, graph: Graph, static: dict[Node, torch.Tensor], batch_index: dict[Node, int],
           batch_names: list[str], path: str | os.PathLike, *, gradients: bool,
           external_data: bool | None = None) -> Path:
    """Write `graph` (the trainer's compiled step, or with `gradients` its gradient program) to the ONNX model
    `path` and its initial values beside it; returns `path`. `static` binds the fixed inputs, `batch_index` each
    batch input to its leaf (named `batch_names`)."""
    import safetensors.torch  # noqa: PLC0415  (only an export needs them)
    import onnx  # noqa: PLC0415

    module, args, input_names, output_names, meta, init = _Builder(trainer, graph, static, batch_index, batch_names,
                                                                  gradients).build()
    try:
        exported = torch.export.export(module, tuple(args), strict=False)
    except PockEngineError:
        raise
    except Exception as e:  # a bug of ours (the module is made of ops the program already ran), said as such
        raise OnnxExportError(f"torch.export could not trace the program for ONNX: {type(e).__name__}: {e}") from e
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms", four times
    try:
        # optimize=False: onnxscript's optimizer (0.7.2) drops `x + c` for |c| <= 1e-8 as an addition of zero,
        # AdamW's eps among them; onnxruntime optimizes the graph itself when it loads it.
        program = torch.onnx.export(exported, (), dynamo=True, input_names=input_names, output_names=output_names,
                                    opset_version=OPSET, optimize=False, verbose=False)
    except Exception as e:
        raise OnnxExportError(f"torch.onnx could not translate the program: {type(e).__name__}: {e}") from e
    finally:
        registration.setLevel(level)
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=weights > EXTERNAL_DATA_BYTES if external_data is None else external_data)
    model = onnx.load(path, load_external_data=False)
    _full_rank_scalars(model)
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    onnx.save(model, path)
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in init.items()}, init_path(path))
    return path


# Element-wise ops that broadcast their inputs (ONNX's multidirectional broadcasting).
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater",
                           "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"})


def _full_rank_scalars(model: Any) -> None:
    """Give every single-element operand of a broadcasting op its output's rank, by a Reshape of that scalar to
    (1, ..., 1). onnxruntime 1.31 multiplied a (1280, 320, 1, 1) tensor by a rank-0 scalar in 2.5 ms, by a
    (1, 1, 1, 1) one in 0.06 ms (2 threads; a (8, 96, 64, 64) tensor by a rank-0 scalar was not slow). The
    optimizer's updates of pointwise convolution weights, (out, in, 1, 1), are such products (momentum, learning
    rate): with rank-0 scalars they took a tenth of a full MobileNetV2 step."""
    import onnx  # noqa: PLC0415

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes: dict[str, list[int] | None] = {}
    for v in [*inferred.value_info, *inferred.input, *inferred.output]:
        t = v.type.tensor_type
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim] \
            if t.HasField("shape") else None
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    reshaped: dict[tuple[str, int], str] = {}
    ones: set[str] = set()
    nodes = []
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.op_type in _BROADCASTING else None
        if out:  # a tensor of rank 1 or more
            for i, name in enumerate(node.input):
                shape = shapes.get(name)
                if shape is None or len(shape) >= len(out) or math.prod(shape) != 1:
                    continue
                key = (name, len(out))
                if key not in reshaped:
                    target = f"pockengine_ones_{len(out)}"
                    if target not in ones:
                        ones.add(target)
                        graph.initializer.append(onnx.helper.make_tensor(target, onnx.TensorProto.INT64,
                                                                         [len(out)], [1] * len(out)))
                    reshaped[key] = f"{name}__rank{len(out)}"
                    nodes.append(onnx.helper.make_node("Reshape", [name, target], [reshaped[key]],
                                                       name=f"pockengine_reshape_{len(reshaped)}"))
                node.input[i] = reshaped[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


class _Builder:
    """Builds the torch.fx module of one program (see the module's docstring for its inputs and outputs)."""

    def __init__(self, trainer: Trainer, graph: Graph, static: dict[Node, torch.Tensor],
                 batch_index: dict[Node, int], batch_names: list[str], gradients: bool):
        self.trainer, self.graph, self.static, self.gradients = trainer, graph, static, gradients
        self.batch_index, self.batch_names = batch_index, batch_names
        self.fx = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[Node, fx.Node] = {}
        self.args: list[torch.Tensor] = []
        self.input_names: list[str] = []
        self.init: dict[str, torch.Tensor] = {}
        self.checks: list[tuple[fx.Node, str]] = []  # (the checked condition, its message)
        names = {id(t): name for name, t in trainer.model.named_parameters()}
        names.update({id(t): name for name, t in trainer.model.named_buffers()})
        names.update({id(t): f"{p}.{s}" for p, state in trainer.state.items() for s, t in state.items()})
        self.tensor_names = names

    # -- inputs ---------------------------------------------------------------------------------------------
    def _placeholder(self, name: str, example: torch.Tensor) -> fx.Node:
        # detached: the step never differentiates (a trained parameter requires grad); row-major, as every ONNX
        # tensor is (the trainer may keep convolution weights channels-last, and views traced on those fail)
        example = example.detach().contiguous()
        node = self.fx.placeholder(f"in{len(self.input_names)}")
        node.meta["val"] = example
        self.input_names.append(name)
        self.args.append(example)
        return node

    def _attribute(self, name: str, value: torch.Tensor) -> fx.Node:
        attr = f"w{len(self.root._buffers)}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
        self.root.register_buffer(attr, value.detach().contiguous())
        return self.fx.get_attr(attr)

    def _call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.fx.call_function(target, args, kwargs)

    def build(self) -> tuple[fx.GraphModule, list, list[str], list[str], dict, dict[str, torch.Tensor]]:
        graph, trainer = self.graph, self.trainer
        mutated = {n for node in graph.nodes if not node.is_input and is_mutating(node.target)
                   for n in _written_inputs(node)}
        for node in sorted(graph.inputs(BATCH), key=self.batch_index.__getitem__):
            i = self.batch_index[node]
            self.env[node] = self._placeholder(self.batch_names[i], self.static.get(node, _example(node)))
        batch = [{"name": self.batch_names[self.batch_index[n]], "shape": list(n.meta.shape),
                  "dtype": str(n.meta.dtype).removeprefix("torch.")} for n in graph.inputs(BATCH)]
        scalars = graph.inputs(SCALAR)
        if scalars:
            lr = self._placeholder("lr", torch.tensor(trainer.optimizer.lr, dtype=torch.float64))
            step = self._placeholder("step", torch.tensor(1, dtype=torch.int64))
            names = [node.name for node in scalars]

            def schedule(step: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
                values = trainer.optimizer.schedule(step.to(torch.float64), lr)
                return tuple(values[name].to(torch.float32) for name in names)

            values = self._call(schedule, step, lr)
            for i, node in enumerate(scalars):
                self.env[node] = self._call(operator.getitem, values, i)
        carried, outputs = [], {}
        trained = {name: sel for name, sel in trainer.trained.items()}
        for node in graph.inputs():
            if node.role in (BATCH, SCALAR):
                continue
            value = self.static[node] if node.role != CONST else graph.constants[node]
            name = self.tensor_names.get(id(value))
            if node.role == PARAM and name in trained or node.role == STATE or node in mutated:
                if node.role == CONST or name is None:
                    raise OnnxExportError(f"the program writes its constant input %{node.name}; pockengine "
                                          "cannot export it (a bug: report it)")
                carried.append(self._carried(node, name, value, trained.get(name) if node.role == PARAM else None,
                                             outputs))
            else:
                self.env[node] = self._attribute(name or node.name, value)
        for node in graph.nodes:
            if not node.is_input:
                self.env[node] = self._translate(node)
        results = {"loss": self.env[graph.outputs["loss"]]}
        if self.gradients:
            results.update({k: self.env[v] for k, v in graph.outputs.items() if k.startswith(GRADIENT_OUTPUT)})
        else:
            results.update({NEW_PREFIX + k: v() for k, v in outputs.items()})
        results.update({f"{CHECK_PREFIX}{i}": self._call(aten.all.default, cond)
                        for i, (cond, _) in enumerate(self.checks)})
        self.fx.output(tuple(results.values()))
        module = fx.GraphModule(self.root, self.fx)
        opt = None if self.gradients else trainer.optimizer.config()
        meta = {"format": FORMAT, "kind": "gradients" if self.gradients else "step", "optimizer": opt,
                "scalars": bool(scalars), "steps_done": trainer.steps_done, "batch": batch, "carried": carried,
                "outputs": list(results),
                "checks": [{"output": f"{CHECK_PREFIX}{i}", "message": message}
                           for i, (_, message) in enumerate(self.checks)]}
        return module, self.args, self.input_names, list(results), meta, self.init

    def _carried(self, node: Node, name: str, value: torch.Tensor, sel: Any, outputs: dict) -> dict:
        """A tensor the step changes: an input whose (copied) value the program updates, and an output."""
        role = {PARAM: "param", STATE: "state", BUFFER: "buffer"}[node.role]
        input_name = f"{role}:{name}"
        entry: dict[str, Any] = {"input": input_name, "output": NEW_PREFIX + input_name, "role": role,
                                 "tensor": name}
        if sel is not None and sel.kind == "partial":
            channels = torch.tensor(sel.channels, dtype=torch.int64)
            trained = value.index_select(sel.dim, channels)
            entry["partial"] = {"dim": sel.dim, "channels": list(sel.channels)}
            index = self._attribute(f"{name}.channels", channels)
            whole = self._call(aten.index_copy.default, self._attribute(f"{name}.frozen", value), sel.dim, index,
                               self._placeholder(input_name, trained))
            self.init[FROZEN_PREFIX + name] = value
            self.env[node] = whole
            self.init[input_name] = trained
            if not self.gradients:
                outputs[input_name] = lambda: self._call(aten.index_select.default, whole, sel.dim, index)
        else:
            copy = self._call(aten.clone.default, self._placeholder(input_name, value.contiguous()))
            self.env[node] = copy
            self.init[input_name] = value
            if not self.gradients:
                outputs[input_name] = lambda: copy
        return entry

    # -- ops ------------------------------------------------------------------------------------------------
    def _translate(self, node: Node) -> fx.Node:
        where = f"%{node.name} = {node.op_name}(...) of module {node.module or '(top level)'!r}"
        target = node.target
        args, kwargs = _map(node.args, self.env), _map(node.kwargs, self.env)
        if target is operator.getitem:
            return self._call(operator.getitem, *args)
        if draws_random(target) and not draws_nothing(target, node.args, node.kwargs):
            raise OnnxExportError(
                f"{where} draws random numbers; an exported step cannot reproduce the trainer's generator. Put "
                "that module in eval mode or set its dropout to 0 before compiling, then export.")
        if target in _ASSERTS:
            self.checks.append((args[0], args[1] if len(args) > 1 else f"the check %{node.name} failed"))
            return None
        if target is PACK_KEEP:
            return self._call(pack_keep, *args, **kwargs)
        if target is APPLY_KEEP_:
            return self._call(aten.copy_.default, args[0], self._call(apply_keep, *args, **kwargs))
        if (decomposition := _decomposition(target)) is not None:
            return self._call(decomposition, *args, **kwargs)
        if not _translatable(target):
            raise OnnxExportError(
                f"{where}: ONNX cannot express it (torch.onnx's torchlib has no translation of {target} and no "
                "decomposition into ops that have one). Freeze the layers up to it (a scheme that does not "
                "backpropagate through it, for a backward op), or give torch.onnx an onnxscript function for it.")
        runtime = {n for n in node.inputs if n.role == SCALAR}
        if runtime:
            return self._with_tensor_scalars(node, target, args, kwargs, runtime, where)
        return self._call(target, *args, **kwargs)

    def _with_tensor_scalars(self, node: Node, target: Any, args: tuple, kwargs: dict, runtime: set[Node],
                             where: str) -> fx.Node:
        """A call with run-time scalars (0-d tensors here) where its schema wants a number: `alpha` and `value`
        become multiplications, as ATen computes them (`self + alpha * other`, `self + value * t1 / t2`)."""
        schema = target._schema
        numbers = [a.name for a, v in zip(schema.arguments, node.args) if v in runtime
                   and not isinstance(a.type, torch.TensorType)]
        numbers += [k for k, v in node.kwargs.items() if v in runtime]
        if not numbers:
            return self._call(target, *args, **kwargs)
        packet = schema.name.removeprefix("aten::")
        in_place = packet.endswith("_")
        base = packet.removesuffix("_")
        kwargs = dict(kwargs)
        if numbers == ["alpha"] and base in ("add", "sub") and len(args) == 2:
            other = self._call(aten.mul.Tensor, kwargs.pop("alpha"), args[1])
            return self._call(target, args[0], other, **kwargs)
        if numbers == ["value"] and base in ("addcmul", "addcdiv") and len(args) == 3:
            scaled = self._call(aten.mul.Tensor, kwargs.pop("value"), args[1])
            term = self._call(aten.mul.Tensor if base == "addcmul" else aten.div.Tensor, scaled, args[2])
            return self._call(aten.add_.Tensor if in_place else aten.add.Tensor, args[0], term)
        raise OnnxExportError(f"{where} takes the run-time scalar(s) {numbers} as numbers; pockengine's ONNX "
                              "export passes them as tensors only to add/sub's alpha and addcmul/addcdiv's value")


def _example(node: Node) -> torch.Tensor:
    return torch.zeros(node.meta.shape, dtype=node.meta.dtype)


def _map(a: Any, env: dict[Node, fx.Node]) -> Any:
    if isinstance(a, Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_map(x, env) for x in a) if not hasattr(a, "_fields") else type(a)(*(_map(x, env) for x in a))
    if isinstance(a, dict):
        return {k: _map(v, env) for k, v in a.items()}
    return a


def _written_inputs(node: Node) -> list[Node]:
    """The program inputs an in-place op writes, through the chain of views and in-place results it writes to."""
    written = [a for a, arg in zip(node.args, node.target._schema.arguments)
               if isinstance(a, Node) and arg.alias_info is not None and arg.alias_info.is_write]
    found = []
    while written:
        n = written.pop()
        if n.is_input:
            found.append(n)
        elif (is_view(n.target) or is_mutating(n.target)) and n.args and isinstance(n.args[0], Node):
            written.append(n.args[0])  # views and in-place ops alias their first argument
    return found


# -- pockengine's bit-mask ops in ONNX's terms ------------------------------------------------------------------
# pockengine/kernels/masks.py packs 8 elements per byte. ONNX has no op that packs or unpacks bits: written with
# standard ops (a weighted sum of 8 booleans widened to int64, a table lookup by a Gather) the masks took more than
# half of a bias-only MobileNetV2 step on onnxruntime, four times its convolutions' share. The export keeps the mask
# as one boolean per element instead (a quarter of the float32 activation it replaces, eight times the bits): two
# comparisons and an And in the forward pass, one Where in the backward, both ends inside the step.
def pack_keep(x: torch.Tensor, lo: float, hi: float | None, order: list[int]) -> torch.Tensor:
    del order  # the layout of the bits, which the boolean mask does not have
    keep = x > lo
    return keep & (x < hi) if hi is not None else keep


def apply_keep(grad: torch.Tensor, keep: torch.Tensor, order: list[int]) -> torch.Tensor:
    del order
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype))


# -- backward ops torchlib lacks, as ops it has ----------------------------------------------------------------
def convolution_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                         stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                         output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple:
    """aten.convolution_backward of a 1-d or 2-d convolution: the input's gradient as the transposed convolution,
    the weight's as a grouped convolution of the input by the gradient (`_convolution_weight_grad`)."""
    if transposed or weight.dim() not in (3, 4):
        raise OnnxExportError(f"convolution_backward of a {'transposed ' if transposed else ''}{weight.dim() - 2}-d "
                              "convolution has no ONNX form in pockengine's export (1-d and 2-d convolutions have)")
    if weight.dim() == 3:  # a 1-d convolution is a 2-d one of height 1
        results = convolution_backward(grad.unsqueeze(2), x.unsqueeze(2), weight.unsqueeze(2), bias_sizes,
                                       [1, *stride], [0, *padding], [1, *dilation], False, [0, 0], groups,
                                       output_mask)
        return tuple(r.squeeze(2) if r is not None and r.dim() == 4 else r for r in results)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        out_size = [(g - 1) * s - 2 * p + d * (k - 1) + 1
                    for g, s, p, d, k in zip(grad.shape[2:], stride, padding, dilation, weight.shape[2:])]
        extra = [i - o for i, o in zip(x.shape[2:], out_size)]
        grad_input = convolution(grad, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1]:
        grad_weight = _convolution_weight_grad(grad, x, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad.sum([0, *range(2, grad.dim())])
    return grad_input, grad_weight, grad_bias


def convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
                groups: int) -> torch.Tensor:
    """aten.convolution; a depthwise transposed convolution at stride 1 (a depthwise layer's input gradient) as a
    depthwise convolution by the flipped kernel, which onnxruntime runs with its depthwise kernels where its
    transposed convolution multiplies each channel on its own."""
    kernel = list(weight.shape[2:])
    ones = [1] * len(kernel)
    zeros = [0] * len(kernel)
    if (transposed and groups == 1 and kernel == ones and list(stride) == ones and list(padding) == zeros
            and not any(output_padding)):
        # a pointwise layer's input gradient: onnxruntime's convolution by the transposed weight beats its
        # transposed convolution (which multiplies, then scatters the columns back into the image)
        return aten.convolution.default(x, weight.transpose(0, 1), bias, ones, zeros, ones, False, zeros, 1)
    if (transposed and groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1 and list(stride) == ones
            and list(dilation) == ones and not any(output_padding) and all(p < k for p, k in zip(padding, kernel))):
        return aten.convolution.default(x, weight.flip(list(range(2, weight.dim()))), bias, ones,
                                        [k - 1 - p for p, k in zip(padding, kernel)], ones, False,
                                        [0] * len(kernel), groups)
    return aten.convolution.default(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


def _convolution_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, stride: list[int],
                             padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """A 2-d convolution's weight gradient as one grouped convolution of the input by the output's gradient, the
    batch summed as the input channels of each group: no unfolded (im2col) copy of the input, whose kernel-area
    times the input's size set the step's peak on onnxruntime (every depthwise layer of MobileNetV2 had one)."""
    n, channels, height, width = x.shape
    per_group = channels // groups
    kernel = list(weight_shape[2:])
    if kernel == [1, 1] and groups == 1 and list(stride) == [1, 1] and list(padding) == [0, 0]:
        # a pointwise convolution is a matrix product per example (onnxruntime's grouped convolution with an
        # image-sized kernel runs this at a few GFLOP/s)
        out, positions = grad.shape[1], height * width
        if out * channels <= (out + channels) * positions:
            products = grad.reshape(n, out, -1) @ x.reshape(n, channels, -1).transpose(1, 2)
            return products.sum(0).reshape(weight_shape)
        # Small images, many channels (the last layers): one product over all examples' positions, from copies of
        # the gradient and the input with the examples next to the positions, writes less than one weight-sized
        # product per example, and multiplies along more than a few positions.
        grad_rows = grad.reshape(n, out, positions).transpose(0, 1).reshape(out, n * positions)
        x_rows = x.reshape(n, channels, positions).transpose(0, 1).reshape(channels, n * positions)
        return (grad_rows @ x_rows.transpose(0, 1)).reshape(weight_shape)
    if per_group == 1 and weight_shape[0] == groups:  # depthwise: one filter per channel
        return _depthwise_weight_grad(grad, x, kernel, stride, padding, dilation).reshape(weight_shape)
    # each (input channel within a group) becomes a batch row whose channels are (group, example)
    rows = x.reshape(n, groups, per_group, height, width).permute(2, 1, 0, 3, 4).reshape(per_group, groups * n,
                                                                                         height, width)
    filters = grad.transpose(0, 1)  # (out channels, examples, out height, out width): one filter per out channel
    full = aten.convolution.default(rows, filters, None, dilation, padding, stride, False, [0, 0], groups)
    return full[:, :, :kernel[0], :kernel[1]].transpose(0, 1)


def _depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, kernel: list[int], stride: list[int],
                           padding: list[int], dilation: list[int]) -> torch.Tensor:
    """A depthwise convolution's weight gradient, (channels, kernel height, kernel width), as a depthwise
    convolution of the input by the gradient over (example, channel) pairs, summed over the examples: both reshapes
    are free, where the general case permutes the input and the gradient to (channel, example) order, two copies
    (a full MobileNetV2 step on onnxruntime: 3-4% faster without them). A product and sum per kernel tap of the
    gradient and a shifted window of the input was 4% faster still, but onnxruntime ran the windows' copies side by
    side: 165 MB more memory in that step."""
    n, channels, height, width = x.shape
    rows = x.reshape(1, n * channels, height, width)
    filters = grad.reshape(n * channels, 1, *grad.shape[2:])
    full = aten.convolution.default(rows, filters, None, dilation, padding, stride, False, [0, 0], n * channels)
    return full.reshape(n, channels, *full.shape[2:]).sum(0)[:, :kernel[0], :kernel[1]]


def _refuse_dropout(dropout_p: float) -> None:
    if dropout_p:
        raise OnnxExportError("flash attention with dropout draws random numbers; an exported step cannot reproduce "
                              "the trainer's generator: set the attention dropout to 0 or the model to eval mode")


def _attention_scores(query: torch.Tensor, key: torch.Tensor, is_causal: bool, attn_mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    scores = query @ key.transpose(-2, -1) * scale
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, -math.inf)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    return scores


def _query_heads(query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """`kv` (key or value) with its heads repeated to the query's: the flash kernels take grouped-query attention's
    fewer key/value heads as they are."""
    return kv.repeat_interleave(query.shape[1] // kv.shape[1], 1) if kv.shape[1] != query.shape[1] else kv


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                    is_causal: bool = False, *, attn_mask: torch.Tensor | None = None,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash attention as the math form, with the log-sum-exp its backward reads. torchlib's translation
    (onnxscript 0.7.2) gives a log-sum-exp of zeros shaped (batch, L, ceil(heads / 32) * 32), there only for
    inference, and no grouped-query attention."""
    _refuse_dropout(dropout_p)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = _attention_scores(query, _query_heads(query, key), is_causal, attn_mask, scale)
    # onnxruntime's ReduceLogSumExp is several times slower than its LogSoftmax and a ReduceMax each (MiniLM's step
    # spent 14% of its time in it): the log-sum-exp is read off the log-probabilities, max(s) - max(s - lse)
    log_probs = torch.log_softmax(scores, -1)
    out = torch.exp(log_probs) @ _query_heads(query, value)
    logsumexp = scores.amax(-1) - log_probs.amax(-1)
    return out, logsumexp.to(torch.float32)


def flash_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             out: torch.Tensor, logsumexp: torch.Tensor, dropout_p: float, is_causal: bool, *,
                             attn_mask: torch.Tensor | None = None, scale: float | None = None) -> tuple:
    """The CPU flash attention's backward as the math form: the probabilities rebuilt from the saved log-sum-exp."""
    _refuse_dropout(dropout_p)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    repeated_key, repeated_value = _query_heads(query, key), _query_heads(query, value)
    scores = _attention_scores(query, repeated_key, is_causal, attn_mask, scale)
    probs = torch.exp(scores - logsumexp.unsqueeze(-1).to(scores.dtype))
    grad_value = probs.transpose(-2, -1) @ grad_out
    grad_probs = grad_out @ repeated_value.transpose(-2, -1)
    grad_scores = probs * (grad_probs - (grad_out * out).sum(-1, keepdim=True))
    grad_query = grad_scores @ repeated_key * scale
    grad_key = grad_scores.transpose(-2, -1) @ query * scale
    if key.shape[1] != query.shape[1]:  # each key/value head's gradient sums over the query heads that share it
        grouped = (key.shape[0], key.shape[1], query.shape[1] // key.shape[1], *key.shape[2:])
        grad_key, grad_value = grad_key.reshape(grouped).sum(2), grad_value.reshape(grouped).sum(2)
    return grad_query, grad_key, grad_value


def flash_attention_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                           unmasked: torch.Tensor, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pockengine's flash attention that drops its mask when the batch has no padding
    (pockengine/kernels/attention.py), as its masked form: the same result either way, and no run-time branch."""
    return flash_attention(query, key, value, attn_mask=attn_mask, scale=scale)


def flash_attention_masked_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                                    attn_mask: torch.Tensor, unmasked: torch.Tensor, is_causal: bool,
                                    scale: float) -> tuple:
    """Its backward, as the masked form's."""
    return flash_attention_backward(grad_out, query, key, value, out, logsumexp, 0.0, False, attn_mask=attn_mask,
                                    scale=scale)


# Ops written as PyTorch's own decompositions (torch._decomp) instead of torchlib's translations, which onnxruntime
# computes otherwise than ATen: train-mode batch norm becomes ONNX BatchNormalization(training_mode=1), which
# onnxruntime (an inference runtime) runs with the running statistics; and torchlib's backward ops differ at the
# edges ATen defines (hardtanh_backward lets the gradient through at the clamp bounds, where ATen's is 0;
# native_batch_norm_backward reads the saved statistics in eval mode, where ATen passes empty ones). Every
# backward op with a decomposition takes it: ATen's semantics, in ops whose ONNX forms are plain.
_BATCH_NORM_FORWARD = (aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default)


def _decomposition(target: Any) -> Any:
    """The function to trace in place of `target`, where the export does not leave it to torchlib."""
    target = ATEN_EQUIVALENTS.get(target, target)  # pockengine's precise batch norms: their ATen ops' arithmetic
    if target in DECOMPOSED:
        return DECOMPOSED[target]
    if isinstance(target, torch._ops.OpOverload) and (target in _BATCH_NORM_FORWARD or "backward" in target._opname):
        return torch._decomp.decomposition_table.get(target)
    return None


DECOMPOSED = {aten.convolution_backward.default: convolution_backward, aten.convolution.default: convolution,
              aten._scaled_dot_product_flash_attention_for_cpu.default: flash_attention,
              aten._scaled_dot_product_flash_attention_for_cpu_backward.default: flash_attention_backward,
              FLASH_UNMASKED_IF: flash_attention_masked, FLASH_UNMASKED_IF_BACKWARD: flash_attention_masked_backward}


@functools.cache
def _translatable(target: Any) -> bool:
    """Whether torch.onnx can translate the op: torchlib has a function for it, or a decomposition of it into ops
    that have one (the table torch.onnx decomposes with before translating)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if is_mutating(target):  # torch.export makes it functional: the functional variant is translated
        functional = getattr(getattr(aten, target._opname.rstrip("_"), None), target._overloadname, None)
        return functional is None or _translatable(functional)
    registry, decompositions = _onnx_tables()
    return registry.is_registered(target) or target in decompositions


@functools.cache
def _onnx_tables() -> tuple[Any, Any]:
    from torch.onnx._internal.exporter import _decomp, _registration  # noqa: PLC0415

    registry = _registration.ONNXRegistry.from_torchlib()
    return registry, _decomp.create_onnx_friendly_decomposition_table(set(registry.functions))


def batch_arrays(batch: Any) -> dict[str, Any]:
    """A batch as the numpy arrays an exported model takes, by input name (`pockengine.runtime.onnx` feeds); stack
    several with numpy and `numpy.savez` them for `python -m pockengine.runtime.onnx train --data`."""
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    from pockengine.capture import normalize_batch  # noqa: PLC0415

    batch = normalize_batch(batch)
    return {name: leaf.detach().cpu().numpy() for name, leaf in zip(batch_leaf_names(batch), pytree.tree_leaves(batch))
            if isinstance(leaf, torch.Tensor)}


def batch_leaf_names(batch: Any) -> list[str]:
    """ONNX input names of a batch's leaves: a dict input's key, `input<i>` for positional inputs, `target`."""
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    names = []
    for path, _ in pytree.tree_flatten_with_path(batch)[0]:
        if path[0].idx == 1:
            names.append("target" + "".join(str(k) for k in path[1:]))
        else:
            rest = path[1:]
            head = str(rest[0].key) if rest and hasattr(rest[0], "key") else f"input{rest[0].idx}" if rest else "input"
            names.append(head + "".join(str(k) for k in rest[1:]))
    return names
