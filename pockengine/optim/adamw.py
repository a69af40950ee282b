"""AdamW (decoupled weight decay), the same arithmetic as torch.optim.AdamW's single-tensor path."""

from __future__ import annotations

import math
from typing import Any

import torch

from pockengine.ir.graph import Node
from pockengine.errors import UserInputError
from pockengine.optim.base import Emit, Optimizer, hyperparameter, learning_rate

aten = torch.ops.aten


class AdamW(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    scalar_names = ("decay", "neg_step_size", "bias_correction2_sqrt")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise UserInputError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        lr = learning_rate("AdamW", lr)
        betas = tuple(hyperparameter("AdamW", f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(betas))
        # eps > 0: with eps = 0 an entry whose gradient has always been 0 is updated by 0 / 0 = NaN.
        eps = hyperparameter("AdamW", "eps", eps, 0.0, low_open=True)
        weight_decay = hyperparameter("AdamW", "weight_decay", weight_decay, 0.0)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def schedule(self, step: Any, lr: Any) -> dict[str, Any]:
        beta1, beta2 = self.betas
        sqrt = math.sqrt
        if isinstance(step, torch.Tensor):  # in an exported model: constants as exact as the step's float64
            beta1, beta2, sqrt = step.new_tensor(beta1), step.new_tensor(beta2), torch.sqrt
        return {"decay": 1 - lr * self.weight_decay,
                "neg_step_size": -lr / (1 - beta1 ** step),
                "bias_correction2_sqrt": sqrt(1 - beta2 ** step)}

    def emit_update(self, emit: Emit, param: Node, grad: Node, state: dict[str, Node],
                    scalars: dict[str, Node]) -> Node:
        beta1, beta2 = self.betas
        param = emit(aten.mul_.Tensor, param, scalars["decay"])
        exp_avg = emit(aten.lerp_.Scalar, state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = emit(aten.mul_.Tensor, state["exp_avg_sq"], beta2)
        exp_avg_sq = emit(aten.addcmul_.default, exp_avg_sq, grad, grad, value=1 - beta2)
        denom = emit(aten.add.Tensor, emit(aten.div.Tensor, emit(aten.sqrt.default, exp_avg_sq),
                                           scalars["bias_correction2_sqrt"]), self.eps)
        return emit(aten.addcdiv_.default, param, exp_avg, denom, value=scalars["neg_step_size"])

    def config(self) -> dict[str, Any]:
        return {"kind": "AdamW", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}
