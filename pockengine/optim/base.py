"""Optimizers as update rules compiled into the training program.

An optimizer emits, for each trained parameter, the in-place ATen ops that update it from its gradient. Its
per-parameter state (momentum, moments) is owned by the trainer and bound as program inputs; the learning rate and
everything else that changes from step to step (bias corrections) are run-time scalar inputs, so a schedule needs
no recompilation.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Callable

from pockengine.errors import UserInputError
from pockengine.ir.graph import Node

Emit = Callable[..., Node]  # emit(target, *args, **kwargs) -> node in the update section


class Optimizer(ABC):
    lr: float

    #: names of the per-parameter state tensors, each zero-initialized with the parameter's shape
    state_names: tuple[str, ...] = ()
    #: names of the run-time scalars `scalars()` returns
    scalar_names: tuple[str, ...] = ()

    def scalars(self, step: int, lr: float) -> dict[str, float]:
        """Values of the run-time scalars for update number `step` (1-based) at learning rate `lr` (checked)."""
        return self.schedule(step, learning_rate(type(self).__name__, lr))

    @abstractmethod
    def schedule(self, step: Any, lr: Any) -> dict[str, Any]:
        """The run-time scalars as arithmetic on `step` and `lr`: on Python numbers for a step of the torch backend,
        on 0-d tensors inside an exported ONNX step (pockengine.backend.onnx_export), which takes `lr` and `step`
        as its inputs."""

    @abstractmethod
    def emit_update(self, emit: Emit, param: Node, grad: Node, state: dict[str, Node],
                    scalars: dict[str, Node]) -> Node:
        """Emit the ops updating `param` in place; returns the node of the updated parameter (the last op)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Hyper-parameters, JSON-serializable, enough to rebuild the optimizer with `from_config`."""


def hyperparameter(owner: str, name: str, value: Any, low: float, high: float = math.inf, *,
                   low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float after checking that it is a finite real number in the range (refused: NaN, inf, bools,
    strings, tensors)."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise UserInputError(f"{owner}: {name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def learning_rate(owner: str, lr: Any) -> float:
    """A learning rate given at construction or to one step: finite and >= 0 (NaN would turn every weight NaN)."""
    return hyperparameter(owner, "lr", lr, 0.0)
