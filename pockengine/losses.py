"""Ready-made losses with the `loss_fn(model_output, target)` signature; any traceable function works too.

Model outputs may be a tensor, a Hugging Face output object with `.logits`, or a dict holding "logits".
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def logits(output: Any) -> torch.Tensor:
    """A classifier's logits from what its forward returns: a tensor, an object with `.logits` (Hugging Face's
    outputs) or a dict holding "logits" (a module written to look like one)."""
    if hasattr(output, "logits"):
        return output.logits
    return output["logits"] if isinstance(output, dict) and "logits" in output else output


def cross_entropy(ignore_index: int = -100, label_smoothing: float = 0.0) -> Callable:
    """Classification loss over the last dimension of the logits; targets equal to ignore_index are skipped."""

    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        scores = logits(output)
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, label_smoothing=label_smoothing)

    return loss


def mse() -> Callable:
    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits(output), target)

    return loss


def causal_lm(ignore_index: int = -100) -> Callable:
    """Next-token loss: the logits at position t predict token t+1 of `target` (usually the input ids)."""

    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        scores = logits(output)[:, :-1]
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=ignore_index)

    return loss
