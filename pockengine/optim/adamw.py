"""AdamW (decoupled weight decay), the same arithmetic as torch.optim.AdamW's single-tensor path."""

from __future__ import annotations

import math
from typing import Any

import torch

from pockengine.ir.graph import Node
from pockengine.optim.base import Emit, Optimizer

aten = torch.ops.aten


class AdamW(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    scalar_names = ("decay", "neg_step_size", "bias_correction2_sqrt")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def scalars(self, step: int, lr: float) -> dict[str, float]:
        beta1, beta2 = self.betas
        return {"decay": 1 - lr * self.weight_decay,
                "neg_step_size": -lr / (1 - beta1 ** step),
                "bias_correction2_sqrt": math.sqrt(1 - beta2 ** step)}

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
