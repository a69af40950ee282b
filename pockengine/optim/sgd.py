"""SGD with momentum, Nesterov momentum and (coupled) weight decay, matching torch.optim.SGD (dampening 0)."""

from __future__ import annotations

from typing import Any

import torch

from pockengine.ir.graph import Node
from pockengine.errors import UserInputError
from pockengine.optim.base import Emit, Optimizer, hyperparameter, learning_rate

aten = torch.ops.aten


class SGD(Optimizer):
    scalar_names = ("neg_lr",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        lr = learning_rate("SGD", lr)
        momentum = hyperparameter("SGD", "momentum", momentum, 0.0, 1.0)
        weight_decay = hyperparameter("SGD", "weight_decay", weight_decay, 0.0)
        if not isinstance(nesterov, bool):
            raise UserInputError(f"SGD: nesterov must be True or False, got {nesterov!r}")
        if nesterov and momentum == 0:
            raise UserInputError("SGD: Nesterov momentum needs momentum > 0; pass momentum=0.9, for example")
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.state_names = ("momentum_buffer",) if momentum else ()

    def schedule(self, step: Any, lr: Any) -> dict[str, Any]:
        return {"neg_lr": -lr}

    def emit_update(self, emit: Emit, param: Node, grad: Node, state: dict[str, Node],
                    scalars: dict[str, Node]) -> Node:
        d = emit(aten.add.Tensor, grad, param, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum:
            # A zero-initialized buffer makes the first step buf = g, as torch.optim.SGD's clone does.
            buf = emit(aten.mul_.Tensor, state["momentum_buffer"], self.momentum)
            buf = emit(aten.add_.Tensor, buf, d)
            d = emit(aten.add.Tensor, d, buf, alpha=self.momentum) if self.nesterov else buf
        return emit(aten.add_.Tensor, param, d, alpha=scalars["neg_lr"])

    def config(self) -> dict[str, Any]:
        return {"kind": "SGD", "lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}
