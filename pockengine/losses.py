"""Ready-made losses with the `loss_fn(model_output, target)` signature; any traceable function works too.

Model outputs may be a tensor or a Hugging Face output object with `.logits`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def cross_entropy(ignore_index: int = -100, label_smoothing: float = 0.0) -> Callable:
    """Classification loss over the last dimension of the logits; targets equal to ignore_index are skipped."""

    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = _logits(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, label_smoothing=label_smoothing)

    return loss


def mse() -> Callable:
    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(_logits(output), target)

    return loss


def causal_lm(ignore_index: int = -100) -> Callable:
    """Next-token loss: the logits at position t predict token t+1 of `target` (usually the input ids)."""

    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = _logits(output)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=ignore_index)

    return loss
