"""The public entry point: `compile` a model + loss + optimizer + scheme into a `Trainer` that runs compiled steps.

Once per batch shape the trainer captures the model and loss (torch.export -> IR) and runs the compiler's pipeline on
a copy of it (`pockengine.pipeline.PASSES`: autodiff, the update or gradient outputs, the graph passes), then
generates the program's code (pockengine.backend). A batch of a new shape (the last, smaller batch; another sequence
length) compiles a new program, cached by shape. Each shape has two programs: the step (updates the parameters, returns
the loss) and the gradient program (returns the loss and the gradients, updates nothing).
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Hashable
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pockengine import pipeline
from pockengine.backend import Choice, CompiledProgram, CudaGraphProgram, InductorProgram, select
from pockengine.capture import Captured, capture, normalize_batch
from pockengine.capture import cache as capture_cache
from pockengine.capture.child import capture_in_child
from pockengine.capture.gradient_hooks import refuse_gradient_hooks
from pockengine.checkpoint import recorded_setup, restore_state, save_trainer
from pockengine.errors import BatchMismatchError, NonFiniteLossError, UserInputError
from pockengine.ir.graph import BATCH, SCALAR, Node
from pockengine.memory.plan import MemoryPlan, plan_memory
from pockengine.memory.report import MemoryReport, memory_report, rss_bytes
from pockengine.optim import SGD, Optimizer
from pockengine.optim.update import GRADIENT_OUTPUT, zero_state
from pockengine.options import Options
from pockengine.passes import uses_convolution
from pockengine.scheme import Scheme, Selection
from pockengine.scheme import summary as scheme_summary

ShapeKey = tuple[tuple[Any, ...], ...]  # per batch leaf: (shape, dtype) of a tensor, the value of anything else


@dataclass
class _Built:
    program: CompiledProgram | InductorProgram | CudaGraphProgram
    choice: Choice  # the backend it runs on, and why
    binders: list[Callable[[list[torch.Tensor], dict[str, float]], Any]]
    static: dict[Node, torch.Tensor]  # inputs bound to the same tensors at every step
    compile_seconds: float


class Trainer:
    """Runs compiled training steps on `model`, whose parameters it updates in place."""

    def __init__(self, model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
                 scheme: Scheme | None = None, options: Options | None = None):
        if not callable(loss_fn):
            raise UserInputError("loss_fn must be a callable loss_fn(model_output, target) -> scalar tensor")
        if not isinstance(model, nn.Module):
            raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise UserInputError(f"optimizer must be a pockengine optimizer (pockengine.optim.SGD or AdamW), got "
                                 f"{type(optimizer).__name__}")
        if scheme is not None and not isinstance(scheme, Scheme):
            raise UserInputError(f"scheme must be a pockengine.Scheme, got {type(scheme).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer or SGD(lr=0.01)
        self.scheme = scheme or Scheme.full()
        self.options = options or Options()
        # Everything the trainer creates (optimizer state, channel indices, the generator every random op draws from) lives here.
        self.device = _model_device(model)
        self.generator = torch.Generator(device=self.device).manual_seed(self.options.seed)
        self.steps_done = 0
        if self.options.freeze_batchnorm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        example = self._example = normalize_batch(example_batch)
        # The runtime libraries' resident set, for memory_report: the process now, less the model's own tensors,
        # with torch.export's tracer loaded (torch._dynamo and ~700 modules that the first capture would import)
        # unless the capture is read from the cache (then nothing imports it: a second of a warm compile).
        if not (self.options.capture_cache and capture_cache.is_cached(model, loss_fn, example)):
            importlib.import_module("torch.export._trace")
        self._baseline_rss = _resident_without(model)
        leaves, self._spec = pytree.tree_flatten(example)
        self._check_device(leaves)
        self._dtypes = [t.dtype if isinstance(t, torch.Tensor) else type(t) for t in leaves]
        self._programs: dict[tuple[bool, ShapeKey], _Built] = {}
        self._captures: dict[tuple[ShapeKey, tuple[bool, ...]], Captured] = {}
        with _garbage_collected():  # the compile's garbage, collected at its end
            cap = self._capture(example)
            # "auto" is channels-last on CUDA too: cuDNN has NHWC kernels for every convolution (PyTorch sends
            # channels-last depthwise ones to cuDNN), and 1x1 convolutions then run as cuBLAS matrix multiplies.
            # Without the layout pass (disable={"layout"}) the program keeps the model's layout, as with "preserve".
            layout = self.options.memory_format
            self.channels_last = "layout" not in self.options.disable and (
                layout == "channels_last" or layout == "auto" and uses_convolution(cap.graph))
            if self.channels_last:
                for p in model.parameters():
                    if p.dim() == 4:
                        p.data = p.data.contiguous(memory_format=torch.channels_last)
            self.trained: dict[str, Selection] = self.scheme.resolve(model, _layer_order(cap))
            if not self.trained:
                raise UserInputError(f"scheme {self.scheme.name!r} trains no parameter of this model: its rules "
                                     "select none (a bias-only scheme on a model without biases, rules reaching "
                                     "only frozen-mode modules); see pockengine.scheme.summary(model, "
                                     "scheme.resolve(model))")
            self.state: dict[str, dict[str, torch.Tensor]] = zero_state(self.optimizer, model, self.trained)
            self._programs[(True, self._shape_key(leaves))] = self._build(example, updates=True)

    # -- public API -----------------------------------------------------------------------------------------
    def step(self, batch: Any, lr: float | None = None) -> float:
        """One training step on `batch`; returns the loss. `lr` overrides the optimizer's learning rate."""
        built, leaves = self._prepared(batch, updates=True)
        scalars = self.optimizer.scalars(self.steps_done + 1, self.optimizer.lr if lr is None else lr)
        args = [bind(leaves, scalars) for bind in built.binders]
        try:
            with torch.no_grad():
                (loss,) = built.program(*args)
        except NonFiniteLossError:
            if self.options.on_nonfinite == "raise":
                raise
            return float("nan")
        self.steps_done += 1
        return loss.item()

    def gradients(self, batch: Any) -> dict[str, torch.Tensor]:
        """Gradients of the loss for every trained parameter (full shape), without updating anything."""
        built, leaves = self._prepared(batch, updates=False)
        with torch.no_grad():
            out = built.program(*[bind(leaves, {}) for bind in built.binders])
        return {name.removeprefix(GRADIENT_OUTPUT): g for name, g in zip(built.program.output_names, out)
                if name.startswith(GRADIENT_OUTPUT)}

    def loss(self, batch: Any) -> float:
        """The loss on `batch` with the current weights (no update)."""
        built, leaves = self._prepared(batch, updates=False)
        with torch.no_grad():
            out = built.program(*[bind(leaves, {}) for bind in built.binders])
        return out[0].item()

    def program(self, batch: Any = None, *, gradients: bool = False, after: str | None = None
                ) -> CompiledProgram | InductorProgram | CudaGraphProgram:
        """The compiled step program for `batch` (default: the example batch), or with `gradients=True` the
        gradient program; print `.graph` for a listing (its second line: the backend that runs it, and why).
        `after`: the program as it is after that pass of `pockengine.pipeline.PASSES` (compiled anew on the ATen
        backend, not cached)."""
        batch = self._example if batch is None else batch
        if after is not None:
            self._leaves(batch)  # a batch the trainer takes
            with _garbage_collected():
                return self._build(normalize_batch(batch), not gradients, until=after).program
        return self._prepared(batch, not gradients)[0].program

    def export_onnx(self, path: str | os.PathLike, batch: Any = None, *, gradients: bool = False,
                    external_data: bool | None = None) -> Path:
        """Write the compiled step for `batch`'s shape (default: the example batch's) as one ONNX model at `path`,
        or with `gradients=True` the gradient program, and its initial values beside it (`<stem>.init.safetensors`);
        pockengine.runtime.onnx trains with it on onnxruntime alone. See pockengine/backend/onnx_export.py."""
        from pockengine.backend import onnx_export  # noqa: PLC0415  (imports torch.onnx and onnxscript)

        batch = self._example if batch is None else batch
        leaves = self._leaves(batch)
        # onnxruntime's kernels take row-major (NCHW) tensors: a channels-last program would export a transpose at
        # every change of layout, so the export compiles the row-major program.
        with _garbage_collected():
            built = self._build(normalize_batch(batch), not gradients, channels_last=False)
        positions = list(range(len(leaves)))
        batch_index = {n: bind(positions, {}) for n, bind in zip(built.program.inputs, built.binders)
                       if n.role == BATCH}
        return onnx_export.export(self, built.program.graph, built.static, batch_index,
                                  onnx_export.batch_leaf_names(normalize_batch(batch)), path, gradients=gradients,
                                  external_data=external_data)

    def summary(self) -> str:
        """A table of every parameter: how it is trained, trained and total entries; then the backend of every
        program compiled so far."""
        programs = [f"{'step' if updates else 'gradient'} program, batch {[k[0] for k in key]}: "
                    f"{built.choice.reason.removeprefix('backend: ')}"
                    for (updates, key), built in self._programs.items()]
        return "\n".join([scheme_summary(self.model, self.trained), "programs:", *(f"  {p}" for p in programs)])

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer's state (momentum, moments) of the trained entries, kept between steps."""
        return sum(t.numel() * t.element_size() for state in self.state.values() for t in state.values())

    def memory_plan(self, batch: Any = None, *, gradients: bool = False) -> MemoryPlan:
        """The predicted memory of one step (see pockengine.memory.plan), or of the gradient program."""
        built = self._prepared(self._example if batch is None else batch, not gradients)[0]
        return plan_memory(built.program.graph, {n: t.stride() for n, t in built.static.items()})

    def memory_report(self, baseline_rss: int | None = None) -> MemoryReport:
        """What training holds in this process, by kind: trained and frozen weights, optimizer state, program
        constants, generated code, the planned step buffers, the compiler residue (the kept captures and graphs,
        one line each) and the runtime overhead (the measured resident set minus all of those); `print` it.
        `baseline_rss`: the resident set of the runtime libraries, in bytes (default: the process's when the trainer
        was created, less the model's tensors). See pockengine.memory.report."""
        return memory_report(self, self._baseline_rss if baseline_rss is None else baseline_rss)

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint folder at `path` (crash-safe; see pockengine.checkpoint); `pockengine.load` resumes."""
        save_trainer(self, path)

    # -- compilation ----------------------------------------------------------------------------------------
    def _check_device(self, leaves: list) -> None:
        """Every tensor of the batch must be where the model is: the program does not move data."""
        bad = next((i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.device != self.device),
                   None)
        if bad is not None:
            raise UserInputError(
                f"batch leaf {bad} is on {leaves[bad].device}, but the model is on {self.device}; move the batch "
                f"to the model's device (for example with .to('{self.device}')) before passing it to the trainer")

    def _shape_key(self, leaves: list) -> ShapeKey:
        """What a compiled program is specific to. A leaf that is not a tensor (a float argument, a None target) is
        a constant of the program: another value needs another program."""
        return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else
                     ("value", t if isinstance(t, Hashable) else id(t)) for t in leaves)

    def _prepared(self, batch: Any, updates: bool) -> tuple[_Built, list]:
        """The step program (`updates`) or the gradient program for `batch`'s shape, compiled on first sight."""
        leaves = self._leaves(batch)
        key = (updates, self._shape_key(leaves))
        if key not in self._programs:
            with _garbage_collected():
                self._programs[key] = self._build(normalize_batch(batch), updates)
        return self._programs[key], leaves

    def _leaves(self, batch: Any) -> list:
        """The batch's leaves, once checked against the example batch (structure, dtypes, device)."""
        leaves, spec = pytree.tree_flatten(normalize_batch(batch))
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
        return leaves

    def _capture(self, batch: Any) -> Captured:
        """The capture of `batch`'s shape, exported once (it is most of a compile): the step and the gradient
        program of a shape start from copies of it. Modules switched to another mode since are captured again."""
        key = (self._shape_key(pytree.tree_flatten(batch)[0]), tuple(m.training for m in self.model.modules()))
        if key not in self._captures:
            refuse_gradient_hooks(self.model)  # hooks registered since a cached capture: the cache key has none

            def run() -> Captured:
                in_child = capture_in_child(self.model, self.loss_fn, batch) if (
                    self.options.capture_process == "fork") else None
                return in_child or capture(self.model, self.loss_fn, batch)

            self._captures[key] = (capture_cache.cached_capture(self.model, self.loss_fn, batch, run)
                                   if self.options.capture_cache else run())
        return self._captures[key]

    def _build(self, batch: Any, updates: bool, until: str | None = None, channels_last: bool | None = None) -> _Built:
        """The program for `batch`'s shape, after the pass `until` (default: all), in channels-last layout if
        `channels_last` (default: the trainer's layout). One built for a listing or an export (either argument
        given) runs on "aten": nothing times or compiles another backend for a program that is only read."""
        start = time.perf_counter()
        cap = self._capture(batch).copy()  # the pipeline changes its graph in place
        layout = self.channels_last if channels_last is None else channels_last
        ctx = pipeline.context(cap, self.trained, self.model, self.options, self.device, layout,
                               self.optimizer if updates else None, self.state)
        graph = pipeline.run(cap.graph, ctx, until)
        static = {**ctx.static, **graph.constants}
        inputs = graph.inputs()
        binders = [self._binder(n, cap, static) for n in inputs]
        scalars = self.optimizer.scalars(self.steps_done + 1, self.optimizer.lr) if updates else {}
        examples = [bind(pytree.tree_flatten(batch)[0], scalars) for bind in binders]
        program, choice = select(graph, inputs, graph.outputs["loss"] if updates else None, self.generator, examples,
                                 self.options.backend if until is None and channels_last is None else "aten",
                                 self.device, self.options.cuda_graphs)
        graph.remarks.append(choice.reason)
        return _Built(program, choice, binders, static, time.perf_counter() - start)

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


@contextmanager
def _garbage_collected() -> Iterator[None]:
    """Collect the garbage a compile leaves, at its end.

    Capture and planning leave reference cycles holding many small C++ objects (fake and meta tensors). Freed by a
    later, arbitrary collection, they leave holes all over the heap that every step's small allocations then spread
    over (MobileNetV2 sparse: 5.6 MB of free holes, a step's resident peak 5.5-7.2 MB for 3.6 MB of tensors); freed
    now, before the first step allocates anything, they leave 1 MB and a 3.8 MB peak. They are all younger than the
    compile, so the objects older than it are frozen meanwhile (`gc.freeze`) and the collection walks only the
    compile's: a full one walks the whole process (0.2-0.4 s with transformers imported, per compile). A program
    that froze objects itself keeps its freeze, and gets a full collection."""
    if gc.get_freeze_count():
        yield
        gc.collect()
        return
    gc.freeze()
    try:
        yield
        gc.collect()
    finally:
        gc.unfreeze()


def _resident_without(model: nn.Module) -> int | None:
    """The resident set of the process less the storage of the model's parameters and buffers."""
    rss = rss_bytes()
    if rss is None:
        return None
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers()) if t.device.type == "cpu"}
    return rss - sum(storages.values())


def _model_device(model: nn.Module) -> torch.device:
    """The one device holding the model's parameters and buffers (the CPU for a model without any)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise UserInputError(f"the model's parameters and buffers are on several devices {sorted(map(str, devices))}; "
                             "pockengine runs a model on one device: move it with model.to(device)")
    return devices.pop() if devices else torch.device("cpu")


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


def compile(model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
            scheme: Scheme | None = None, **options: Any) -> Trainer:
    """Compile the training step of `model` under `loss_fn` for batches like `example_batch`.

    example_batch is `(inputs, target)`; inputs is a tuple of positional model arguments or a dict of keyword
    arguments. `options` are those of `pockengine.options.Options`: freeze_batchnorm, on_nonfinite, seed,
    activation_masks, memory_format, frozen_chunks, disable (passes to leave out), check (lint between passes).
    The trainer runs where the model is (`model.to(device)` before compiling); batches must be on that device.
    """
    return Trainer(model, loss_fn, example_batch, optimizer, scheme, Options.from_dict(options))


def load(path: str | os.PathLike, model: nn.Module, loss_fn: Callable, example_batch: Any) -> Trainer:
    """Resume training from the latest checkpoint written by `Trainer.save` into `path`: loads the weights into
    `model` (of the architecture that was trained) and returns a Trainer that continues where the saved one stopped
    (same optimizer, state, scheme, options, step count and random generator). `read_checkpoint(path)` reads a
    checkpoint without a model. Raises `CheckpointError` if `path` holds no complete checkpoint or any of its files
    is damaged."""
    ckpt, optimizer, scheme, options = recorded_setup(path, model)
    trainer = Trainer(model, loss_fn, example_batch, optimizer, scheme, options)
    restore_state(trainer, ckpt, path)
    return trainer
