"""The public entry point: `compile` a model + loss + optimizer + scheme into a `Trainer` that runs compiled steps.

The pipeline, once per batch shape: capture (torch.export -> IR) -> autodiff (backward nodes for the trained
parameters) -> optimizer update nodes -> dead-code elimination -> torch backend (generated Python). A batch of a new
shape (the last, smaller batch; another sequence length) compiles a new program, cached by shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pockengine.autodiff import differentiate
from pockengine.backend import CompiledProgram
from pockengine.capture import capture, normalize_batch
from pockengine.errors import BatchMismatchError, NonFiniteLossError, UserInputError
from pockengine.ir.graph import BATCH, SCALAR, STATE, Node, eliminate_dead_code
from pockengine.optim import SGD, Optimizer
from pockengine.scheme import Scheme

aten = torch.ops.aten
ShapeKey = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Built:
    program: CompiledProgram
    binders: list[Callable[[list[torch.Tensor], dict[str, float]], Any]]
    compile_seconds: float


class Trainer:
    """Runs compiled training steps on `model`, whose parameters it updates in place."""

    def __init__(self, model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
                 scheme: Scheme | None = None, *, freeze_batchnorm: bool = False, on_nonfinite: str = "raise",
                 seed: int = 0):
        if on_nonfinite not in ("raise", "skip"):
            raise UserInputError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if not callable(loss_fn):
            raise UserInputError("loss_fn must be a callable loss_fn(model_output, target) -> scalar tensor")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer or SGD(lr=0.01)
        self.scheme = scheme or Scheme.full()
        self.freeze_batchnorm = freeze_batchnorm
        self.on_nonfinite = on_nonfinite
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_done = 0
        if freeze_batchnorm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.trained = self.scheme.resolve(model)
        params = dict(model.named_parameters())
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {s: torch.zeros_like(params[name], memory_format=torch.preserve_format)
                   for s in self.optimizer.state_names} for name in self.trained}
        example = self._example = normalize_batch(example_batch)
        leaves, self._spec = pytree.tree_flatten(example)
        self._dtypes = [t.dtype if isinstance(t, torch.Tensor) else type(t) for t in leaves]
        self._programs: dict[tuple[str, ShapeKey], _Built] = {}
        self._build("step", example, self._shape_key(leaves))

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
        static.update(cap.constants)
        return static

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
        key = (kind, self._shape_key(leaves))
        built = self._programs.get(key) or self._build(kind, batch, key[1])
        return built, leaves

    def _build(self, kind: str, batch: Any, shape_key: ShapeKey) -> _Built:
        start = time.perf_counter()
        cap = capture(self.model, self.loss_fn, batch)
        graph = cap.graph
        missing = [n for n in self.trained if n not in cap.params]
        if missing:
            raise UserInputError(f"trained parameters {missing} do not appear in the captured graph (tied to "
                                 "another parameter, or unused by forward); leave them out of the scheme")
        trained = {name: cap.params[name] for name in self.trained}
        grads = differentiate(graph, cap.loss, list(trained.values()))

        def emit(target: Callable, *args: Any, module: str = "", **kwargs: Any) -> Node:
            return graph.call(target, args, kwargs, module=module, section="update")

        grads = {name: g if g is not None else emit(aten.zeros_like.default, trained[name])
                 for name, g in ((n, grads[p]) for n, p in trained.items())}
        graph.outputs = {"loss": cap.loss}
        state_inputs: dict[Node, torch.Tensor] = {}
        if kind == "grad":
            graph.outputs.update({f"grad:{name}": g for name, g in grads.items()})
        else:
            scalars = {s: graph.input(s, SCALAR, None) for s in self.optimizer.scalar_names}
            for name, p in trained.items():
                state = {s: graph.input(f"{name}.{s}", STATE, p.meta, module=p.module)
                         for s in self.optimizer.state_names}
                state_inputs.update({node: self.state[name][s] for s, node in state.items()})
                self.optimizer.emit_update(
                    lambda t, *a, **k: emit(t, *a, module=p.module, **k), p, grads[name], state, scalars)
            for name, new in cap.buffer_updates.items():
                emit(aten.copy_.default, cap.buffers[name], new, module=name.rpartition(".")[0])
        eliminate_dead_code(graph)
        inputs = graph.inputs()
        program = CompiledProgram(graph, inputs, check_finite=cap.loss if kind == "step" else None,
                                  generator=self.generator)
        static = self._static_inputs(cap, state_inputs)
        built = _Built(program, [self._binder(n, cap, static) for n in inputs], time.perf_counter() - start)
        self._programs[(kind, shape_key)] = built
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


def compile(model: nn.Module, loss_fn: Callable, example_batch: Any, optimizer: Optimizer | None = None,
            scheme: Scheme | None = None, *, freeze_batchnorm: bool = False, on_nonfinite: str = "raise",
            seed: int = 0) -> Trainer:
    """Compile the training step of `model` under `loss_fn` for batches like `example_batch`.

    example_batch is `(inputs, target)`; inputs is a tuple of positional model arguments or a dict of keyword
    arguments. `freeze_batchnorm` puts BatchNorm layers in eval mode (frozen statistics, the usual fine-tuning
    setting); otherwise every module keeps its mode. A NaN/inf loss raises NonFiniteLossError before any weight
    changes, or, with on_nonfinite='skip', skips the step and returns nan. `seed` seeds dropout.
    """
    return Trainer(model, loss_fn, example_batch, optimizer, scheme, freeze_batchnorm=freeze_batchnorm,
                   on_nonfinite=on_nonfinite, seed=seed)
