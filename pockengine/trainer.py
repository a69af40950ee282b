"""The public entry point: `compile` a model + loss + optimizer + scheme into a `Trainer` that runs compiled steps.

The pipeline, once per batch shape: capture (torch.export -> IR) -> autodiff (backward nodes for the trained
parameters) -> optimizer update nodes -> dead-code elimination -> torch backend (generated Python). A batch of a new
shape (the last, smaller batch; another sequence length) compiles a new program, cached by shape.
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pockengine.autodiff import ChannelSlice, differentiate
from pockengine.backend import CompiledProgram
from pockengine.capture import Captured, capture, normalize_batch
from pockengine.errors import BatchMismatchError, NonFiniteLossError, UserInputError
from pockengine.ir.graph import BATCH, SCALAR, STATE, Node, eliminate_dead_code
from pockengine.optim import SGD, Optimizer
from pockengine.passes import (chunk_frozen_prefix, compact_activation_masks, drop_redundant_clones,
                               fold_constants, fold_frozen_batchnorm, frozen_region, plan_chunks,
                               pointwise_convolutions_as_matmul, rematerialize, run_in_place, to_channels_last,
                               update_early, uses_convolution)
from pockengine.passes.activation_masks import MODES as MASK_MODES
from pockengine.memory.plan import MemoryPlan, plan_memory
from pockengine.scheme import Scheme, Selection
from pockengine.scheme import summary as scheme_summary

aten = torch.ops.aten
ShapeKey = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Built:
    program: CompiledProgram
    binders: list[Callable[[list[torch.Tensor], dict[str, float]], Any]]
    static: dict[Node, torch.Tensor]  # inputs bound to the same tensors at every step
    compile_seconds: float


class Trainer:
    """Runs compiled training steps on `model`, whose parameters it updates in place."""

    def __init__(self, model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
                 scheme: Scheme | None = None, *, freeze_batchnorm: bool = False, on_nonfinite: str = "raise",
                 seed: int = 0, activation_masks: str = "bits", memory_format: str = "auto",
                 frozen_chunks: int | str = "auto"):
        if not (frozen_chunks == "auto" or isinstance(frozen_chunks, int) and frozen_chunks >= 1):
            raise UserInputError(f"frozen_chunks must be 'auto' or an integer >= 1, got {frozen_chunks!r}")
        if activation_masks not in MASK_MODES:
            raise UserInputError(f"activation_masks must be one of {MASK_MODES}, got {activation_masks!r}")
        if memory_format not in ("auto", "channels_last", "preserve"):
            raise UserInputError(f"memory_format must be 'auto', 'channels_last' or 'preserve', got {memory_format!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise UserInputError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if not callable(loss_fn):
            raise UserInputError("loss_fn must be a callable loss_fn(model_output, target) -> scalar tensor")
        if not isinstance(model, nn.Module):
            raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise UserInputError(f"optimizer must be a pockengine optimizer (pockengine.optim.SGD or AdamW), got "
                                 f"{type(optimizer).__name__}")
        if scheme is not None and not isinstance(scheme, Scheme):
            raise UserInputError(f"scheme must be a pockengine.Scheme, got {type(scheme).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64:
            raise UserInputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer or SGD(lr=0.01)
        self.scheme = scheme or Scheme.full()
        self.freeze_batchnorm = freeze_batchnorm
        self.on_nonfinite = on_nonfinite
        self.activation_masks = activation_masks
        self.frozen_chunks = frozen_chunks
        # Everything the trainer creates (optimizer state, channel indices, the dropout generator) lives here.
        self.device = _model_device(model)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps_done = 0
        if freeze_batchnorm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        example = self._example = normalize_batch(example_batch)
        leaves, self._spec = pytree.tree_flatten(example)
        self._check_device(leaves)
        self._dtypes = [t.dtype if isinstance(t, torch.Tensor) else type(t) for t in leaves]
        self._programs: dict[tuple[str, ShapeKey], _Built] = {}
        cap = capture(model, loss_fn, example)
        self.memory_format = memory_format
        # "auto" is channels-last on CUDA too: cuDNN has NHWC kernels for every convolution (PyTorch sends
        # channels-last depthwise ones to cuDNN), and 1x1 convolutions then run as cuBLAS matrix multiplies.
        self.channels_last = memory_format == "channels_last" or memory_format == "auto" and uses_convolution(cap.graph)
        if self.channels_last:
            for p in model.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        self.trained: dict[str, Selection] = self.scheme.resolve(model, _layer_order(cap))
        if not self.trained:
            raise UserInputError(f"scheme {self.scheme.name!r} trains no parameter of this model; see "
                                 "pockengine.scheme.summary(model, scheme.resolve(model))")
        params = dict(model.named_parameters())
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {s: torch.zeros_like(params[name]) if sel.kind == "full" else
                   torch.zeros(_trained_shape(params[name].shape, sel), dtype=params[name].dtype,
                               device=params[name].device) for s in self.optimizer.state_names}
            for name, sel in self.trained.items()}
        self._build("step", example, self._shape_key(leaves), cap)

    # -- public API -----------------------------------------------------------------------------------------
    def step(self, batch: Any, lr: float | None = None) -> float:
        """One training step on `batch`; returns the loss. `lr` overrides the optimizer's learning rate."""
        built, leaves = self._prepared("step", batch)
        scalars = self.optimizer.scalars(self.steps_done + 1, self.optimizer.lr if lr is None else lr)
        args = [bind(leaves, scalars) for bind in built.binders]
        try:
            with torch.no_grad():
                (loss,) = built.program(*args)
        except NonFiniteLossError:
            if self.on_nonfinite == "raise":
                raise
            return float("nan")
        self.steps_done += 1
        return loss.item()

    def gradients(self, batch: Any) -> dict[str, torch.Tensor]:
        """Gradients of the loss for every trained parameter (full shape), without updating anything."""
        built, leaves = self._prepared("grad", batch)
        with torch.no_grad():
            out = built.program(*[bind(leaves, {}) for bind in built.binders])
        return {name.removeprefix("grad:"): g for name, g in zip(built.program.output_names, out)
                if name.startswith("grad:")}

    def loss(self, batch: Any) -> float:
        """The loss on `batch` with the current weights (no update)."""
        built, leaves = self._prepared("grad", batch)
        with torch.no_grad():
            out = built.program(*[bind(leaves, {}) for bind in built.binders])
        return out[0].item()

    def program(self, kind: str = "step", batch: Any = None) -> CompiledProgram:
        """The compiled program for `batch` (default: the example batch); print `.graph` for a listing."""
        return self._prepared(kind, self._example if batch is None else batch)[0].program

    def summary(self) -> str:
        """A table of every parameter: how it is trained, trained and total entries."""
        return scheme_summary(self.model, self.trained)

    def memory_plan(self, kind: str = "step", batch: Any = None) -> MemoryPlan:
        """The predicted memory of one step (see pockengine.memory.plan)."""
        built = self._prepared(kind, self._example if batch is None else batch)[0]
        return plan_memory(built.program.graph, _strides(built.static))

    def save(self, path: str) -> None:
        from pockengine.checkpoint import save_trainer
        save_trainer(self, path)

    # -- compilation ----------------------------------------------------------------------------------------
    def _static_inputs(self, cap: Any, state_inputs: dict[Node, torch.Tensor]) -> dict[Node, torch.Tensor]:
        """Tensors the program reads and updates in place: the model's own parameters and buffers, the
        optimizer state, constants."""
        static: dict[Node, torch.Tensor] = dict(state_inputs)
        static.update({node: self.model.get_parameter(name) for name, node in cap.params.items()})
        static.update({node: self.model.get_buffer(name) for name, node in cap.buffers.items()})
        static.update(cap.graph.constants)
        return static

    def _check_device(self, leaves: list) -> None:
        """Every tensor of the batch must be where the model is: the program does not move data."""
        bad = next((i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.device != self.device),
                   None)
        if bad is not None:
            raise UserInputError(
                f"batch leaf {bad} is on {leaves[bad].device}, but the model is on {self.device}; move the batch "
                f"to the model's device (for example with .to('{self.device}')) before passing it to the trainer")

    def _shape_key(self, leaves: list) -> ShapeKey:
        return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ((), type(t)) for t in leaves)

    def _prepared(self, kind: str, batch: Any) -> tuple[_Built, list]:
        batch = normalize_batch(batch)
        leaves, spec = pytree.tree_flatten(batch)
        if spec != self._spec:
            raise BatchMismatchError(
                f"this batch is structured as {spec}, but the trainer was compiled for {self._spec}; pass "
                "batches with the same inputs (tuple positions or dict keys, in the same order) and target")
        dtypes = [t.dtype if isinstance(t, torch.Tensor) else type(t) for t in leaves]
        if dtypes != self._dtypes:
            bad = next(i for i, (a, b) in enumerate(zip(dtypes, self._dtypes)) if a != b)
            raise BatchMismatchError(
                f"batch leaf {bad} has dtype {dtypes[bad]}, but the example batch had {self._dtypes[bad]}; "
                f"convert it (for example with .to({self._dtypes[bad]}))")
        self._check_device(leaves)
        key = (kind, self._shape_key(leaves))
        built = self._programs.get(key) or self._build(kind, batch, key[1])
        return built, leaves

    def _build(self, kind: str, batch: Any, shape_key: ShapeKey, cap: Captured | None = None) -> _Built:
        start = time.perf_counter()
        cap = cap or capture(self.model, self.loss_fn, batch)
        graph = cap.graph
        missing = [n for n in self.trained if n not in cap.params]
        if missing:
            raise UserInputError(f"trained parameters {missing} do not appear in the captured graph (tied to "
                                 "another parameter, or unused by forward); leave them out of the scheme")
        trained = {name: cap.params[name] for name in self.trained}
        slices: dict[Node, ChannelSlice] = {}
        for name, sel in self.trained.items():
            if sel.kind == "partial":
                channels = torch.tensor(sel.channels, dtype=torch.int64, device=self.device)
                index = graph.constant(f"{name}.channels", channels)
                slices[trained[name]] = ChannelSlice(sel.dim, sel.channels, index)
        drop_redundant_clones(graph)
        fold_frozen_batchnorm(graph, set(trained.values()), set(slices))
        grads = differentiate(graph, cap.loss, list(trained.values()), slices)

        def emit(target: Callable, *args: Any, module: str = "", **kwargs: Any) -> Node:
            return graph.call(target, args, kwargs, module=module, section="update")

        graph.outputs = {"loss": cap.loss}
        state_inputs: dict[Node, torch.Tensor] = {}
        scalars = {s: graph.input(s, SCALAR, None) for s in self.optimizer.scalar_names} if kind == "step" else {}
        for name, p in trained.items():
            at = functools.partial(emit, module=p.module)
            sl = slices.get(p)
            g = grads[p]
            if g is None:  # the loss does not depend on this parameter
                g = at(aten.new_zeros.default, p, list(sl.shape(p.meta.shape) if sl else p.meta.shape))
            if kind == "grad":
                if sl is not None:
                    g = at(aten.index_copy.default, at(aten.zeros_like.default, p), sl.dim, sl.index, g)
                graph.outputs[f"grad:{name}"] = g
                continue
            state = {s: graph.input(f"{name}.{s}", STATE, g.meta, module=p.module)
                     for s in self.optimizer.state_names}
            state_inputs.update({node: self.state[name][s] for s, node in state.items()})
            # A prefix of channels is updated through a view; scattered channels are gathered, updated, put back.
            target = sl.take(at, p) if sl is not None else p
            updated = self.optimizer.emit_update(at, target, g, state, scalars)
            if sl is not None and not sl.is_prefix:
                at(aten.index_copy_.default, p, sl.dim, sl.index, updated)
        if kind == "step":
            for name, new in cap.buffer_updates.items():
                emit(aten.copy_.default, cap.buffers[name], new, module=name.rpartition(".")[0])
        frozen = {node: self.model.get_parameter(name) for name, node in cap.params.items() if name not in trained}
        frozen.update({node: self.model.get_buffer(name) for name, node in cap.buffers.items()
                       if name not in cap.buffer_updates})
        eliminate_dead_code(graph)
        fold_constants(graph, {**frozen, **graph.constants})
        eliminate_dead_code(graph)
        rematerialize(graph)
        if self.channels_last:
            to_channels_last(graph)
        compact_activation_masks(graph, self.activation_masks, self.channels_last)
        eliminate_dead_code(graph)
        update_early(graph, cap.loss)
        run_in_place(graph)
        static = self._static_inputs(cap, state_inputs)
        # "auto" micro-batches on the CPU only: on a GPU memory is rarely the limit at these sizes, and every
        # micro-batch launches the frozen prefix's kernels once more, which costs time and saves nothing needed.
        chunks, until = self.frozen_chunks, None
        if chunks == "auto" and self.device.type == "cpu":
            region, boundary, size = frozen_region(graph, set(trained.values()))
            if region:
                chunks, until = plan_chunks(region, boundary, size,
                                            plan_memory(graph, _strides(static)).live_during)
        chunk_frozen_prefix(graph, set(trained.values()), chunks if isinstance(chunks, int) else 1, until)
        if self.channels_last:
            pointwise_convolutions_as_matmul(graph)
        inputs = graph.inputs()
        program = CompiledProgram(graph, inputs, check_finite=cap.loss if kind == "step" else None,
                                  generator=self.generator)
        built = _Built(program, [self._binder(n, cap, static) for n in inputs], static,
                       time.perf_counter() - start)
        self._programs[(kind, shape_key)] = built
        # Capture and planning leave reference cycles holding many small C++ objects (fake and meta tensors). Freed
        # by a later, arbitrary collection, they leave holes all over the heap that every step's small allocations
        # then spread over (MobileNetV2 sparse: 5.6 MB of free holes, a step's resident peak 5.5-7.2 MB for 3.6 MB
        # of tensors); freed now, before the first step allocates anything, they leave 1 MB and a 3.8 MB peak.
        gc.collect()
        return built

    def _binder(self, node: Node, cap: Any, static: dict[Node, torch.Tensor]) -> Callable[[list, dict], Any]:
        """How to fetch the value of input `node` for a step, resolved once at compile time."""
        if node.role == BATCH:
            i = cap.batch.index(node)
            return lambda leaves, scalars: leaves[i]
        if node.role == SCALAR:
            name = node.name
            return lambda leaves, scalars: scalars[name]
        value = static[node]
        return lambda leaves, scalars: value


def _model_device(model: nn.Module) -> torch.device:
    """The one device holding the model's parameters and buffers (the CPU for a model without any)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise UserInputError(f"the model's parameters and buffers are on several devices {sorted(map(str, devices))}; "
                             "pockengine runs a model on one device: move it with model.to(device)")
    return devices.pop() if devices else torch.device("cpu")


def _strides(static: dict[Node, torch.Tensor]) -> dict[Node, tuple[int, ...]]:
    return {n: t.stride() for n, t in static.items()}


def _layer_order(cap: Captured) -> list[str]:
    """Modules owning parameters, in the order the forward pass first uses them."""
    position = {n: i for i, n in enumerate(cap.graph.nodes)}
    users = cap.graph.users()
    first_use = {name: min((position[u] for u in users[node]), default=len(position))
                 for name, node in cap.params.items()}
    order: list[str] = []
    for name in sorted(first_use, key=first_use.__getitem__):
        module = name.rpartition(".")[0]
        if module not in order:
            order.append(module)
    return order


def _trained_shape(shape: torch.Size, sel: Selection) -> tuple[int, ...]:
    if sel.kind == "full":
        return tuple(shape)
    return tuple(len(sel.channels) if d == sel.dim else s for d, s in enumerate(shape))


def compile(model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
            scheme: Scheme | None = None, *, freeze_batchnorm: bool = False, on_nonfinite: str = "raise",
            seed: int = 0, activation_masks: str = "bits", memory_format: str = "auto",
            frozen_chunks: int | str = "auto") -> Trainer:
    """Compile the training step of `model` under `loss_fn` for batches like `example_batch`.

    example_batch is `(inputs, target)`; inputs is a tuple of positional model arguments or a dict of keyword
    arguments. `freeze_batchnorm` puts BatchNorm layers in eval mode (frozen statistics, the usual fine-tuning
    setting); otherwise every module keeps its mode. A NaN/inf loss raises NonFiniteLossError before any weight
    changes, or, with on_nonfinite='skip', skips the step and returns nan. `seed` seeds dropout.
    `activation_masks` says how ReLU-like layers remember where they passed the gradient when their output is
    not saved for anything else: "bits" (1 bit per element) or "off" (the fp32 activation).
    `memory_format`: "auto" runs models with 2-d convolutions in channels-last layout (their 4-d weights are
    converted in place, values unchanged), "channels_last" forces it, "preserve" keeps the model's layout.
    `frozen_chunks`: the frozen layers before the earliest trained one run in this many micro-batches, one after
    the other ("auto": on the CPU as many as it takes for them not to set the step's peak memory, on a GPU 1;
    1: the whole batch at once).
    The trainer runs where the model is (`model.to(device)` before compiling); batches must be on that device.
    """
    return Trainer(model, loss_fn, example_batch, optimizer, scheme, freeze_batchnorm=freeze_batchnorm,
                   on_nonfinite=on_nonfinite, seed=seed, activation_masks=activation_masks,
                   memory_format=memory_format, frozen_chunks=frozen_chunks)
