"""A fine-tuning task as the analysis and the search see it: the model, the loss, the data and the metric.

`pockengine finetune` builds one from its `--model` and `--data`; tests and scripts build their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

Batch = Any  # (inputs, target): inputs a tuple of positional arguments or a dict of keyword arguments


@dataclass(frozen=True)
class Task:
    name: str
    build_model: Callable[[], torch.nn.Module]  # a fresh copy of the pretrained model each call, in its training mode
    loss_fn: Callable[[Any, Any], torch.Tensor]
    example_batch: Batch  # fixes the compiled shapes: every training batch has this structure and these shapes
    train_batches: Callable[[int], Iterator[Batch]]  # seed -> an endless iterator of shuffled training batches
    evaluate: Callable[[torch.nn.Module], float]  # the metric on the held-out split; higher is better
    metric: str  # what `evaluate` returns, for reports: "accuracy", or "-loss" (negated held-out loss)
    # Which training and validation examples these are (e.g. a digest of their indices): the analysis reuses a
    # cached result only for the same ones, so another split (a test split taken out) is analysed again.
    data_key: str = ""
