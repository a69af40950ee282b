"""Optimizers as update rules compiled into the training program.

An optimizer emits, for each trained parameter, the in-place ATen ops that update it from its gradient. Its
per-parameter state (momentum, moments) is owned by the trainer and bound as program inputs; the learning rate and
everything else that changes from step to step (bias corrections) are run-time scalar inputs, so a schedule needs
no recompilation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from pockengine.ir.graph import Node

Emit = Callable[..., Node]  # emit(target, *args, **kwargs) -> node in the update section


class Optimizer(ABC):
    lr: float

    #: names of the per-parameter state tensors, each zero-initialized with the parameter's shape
    state_names: tuple[str, ...] = ()
    #: names of the run-time scalars `scalars()` returns
    scalar_names: tuple[str, ...] = ()

    @abstractmethod
    def scalars(self, step: int, lr: float) -> dict[str, float]:
        """Values of the run-time scalars for update number `step` (1-based) at learning rate `lr`."""

    @abstractmethod
    def emit_update(self, emit: Emit, param: Node, grad: Node, state: dict[str, Node],
                    scalars: dict[str, Node]) -> Node:
        """Emit the ops updating `param` in place; returns the node of the updated parameter (the last op)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Hyper-parameters, JSON-serializable, enough to rebuild the optimizer with `from_config`."""


def from_config(config: dict[str, Any]) -> Optimizer:
    from pockengine.optim.adamw import AdamW
    from pockengine.optim.sgd import SGD

    kinds = {"SGD": SGD, "AdamW": AdamW}
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind not in kinds:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](**cfg)
