"""Hugging Face's SpecAugment, traced as a random op of the program instead of a mask frozen at capture time.

wav2vec2 and every model with a copy of its code (hubert, wavlm, data2vec-audio, unispeech, sew, sew-d, ...) mask
spans of time steps in train mode with their default config (`mask_time_prob=0.05`): a method of the model calls
its module's `_compute_mask_indices`, which draws the spans with numpy, and writes a learned vector into the masked
rows, `hidden_states[mask] = masked_spec_embed`. Traced as it is, numpy's mask is a constant of the program: every
step would reuse the one mask drawn while tracing, where eager PyTorch draws a new one per step.

While capturing, the `_compute_mask_indices` such a method calls (found in its globals) is `compute_mask_indices`
below: the same distribution drawn with torch's random ops at fixed shapes, so the compiled program draws a new
mask each step from the trainer's generator, as its dropout does. Inside those methods `torch.tensor(mask)` takes
the mask as it is. The assignment under the mask, `x[mask] = value`, is captured as `where(mask, value, x)` like
any such write (capture/masked_rows.py): how many rows the mask picks depends on its values, and nothing in the
program depends on that count.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

MASK_FUNCTION = "_compute_mask_indices"  # the name every copy of wav2vec2's code gives it


def compute_mask_indices(shape: tuple[int, int], mask_prob: float, mask_length: int,
                         attention_mask: torch.Tensor | None = None, min_masks: int = 0,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Hugging Face's `_compute_mask_indices` (a (batch, length) boolean mask of spans of `mask_length`) with torch
    ops of fixed shapes. As there, one uniform `epsilon` per call rounds `mask_prob * input_length / mask_length`
    to a number of spans (at least `min_masks`, at most what fits), per sample `input_length` is its attention
    mask's sum, and the span starts are drawn without replacement among those that fit in it; a sample without a
    span while another has some gets its last position masked, as there. The starts are a uniform random subset:
    the valid starts ranked by uniform noise, those ranked below the count kept; a position is masked when a kept
    start lies at most `mask_length - 1` before it (a running count of starts)."""
    batch, length = shape
    if mask_length < 1:
        raise ValueError("`mask_length` has to be bigger than 0.")
    if mask_length > length:
        raise ValueError(f"`mask_length` has to be smaller than `sequence_length`, but got `mask_length`: "
                         f"{mask_length} and `sequence_length`: {length}`")
    if attention_mask is not None:
        device = attention_mask.device
    epsilon = torch.rand((), dtype=torch.float64, device=device)

    def spans(input_length: torch.Tensor) -> torch.Tensor:
        count = torch.floor(mask_prob * input_length.double() / mask_length + epsilon).clamp_min(min_masks)
        count = torch.where(count * mask_length > length, length // mask_length, count)
        return torch.minimum(count, (input_length - (mask_length - 1)).clamp_min(0).double())

    lengths = (attention_mask.detach().sum(-1) if attention_mask is not None
               else torch.full((batch,), length, dtype=torch.int64, device=device))
    most = spans(torch.tensor(length, device=device))
    count = spans(lengths)
    starts = length - mask_length + 1
    fits = torch.arange(starts, device=device) < (lengths - (mask_length - 1)).unsqueeze(-1)
    noise = torch.where(fits, torch.rand(batch, starts, device=device), 2.0)  # starts that do not fit rank last
    rank = noise.argsort(dim=-1).argsort(dim=-1)
    kept = (rank < count.unsqueeze(-1)).to(torch.int64)
    started = torch.nn.functional.pad(kept, (0, mask_length - 1)).cumsum(-1)  # starts at or before each position
    masked = (started - torch.nn.functional.pad(started, (mask_length, 0))[:, :length]) > 0
    last = torch.arange(length, device=device) == length - 1
    return masked | (last & ((count == 0) & (most > 0)).unsqueeze(-1))


class _TensorMasks(TorchFunctionMode):
    """Inside a method that called `compute_mask_indices`: `torch.tensor(mask, ...)` converts the mask tensor
    without copying it out of the program."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.tensor and args and isinstance(args[0], torch.Tensor):
            return args[0].to(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        return func(*args, **kwargs)


@functools.cache
def _masking_methods(cls: type) -> tuple[tuple[str, dict], ...]:
    """(name, globals) of each method of `cls` that calls `_compute_mask_indices` (`_mask_hidden_states`), with
    the namespace its call looks the function up in."""
    methods = {}
    for klass in reversed(cls.__mro__):  # the most derived definition wins
        for name, f in vars(klass).items():
            code, namespace = getattr(f, "__code__", None), getattr(f, "__globals__", {})
            methods.pop(name, None)
            if code is not None and MASK_FUNCTION in code.co_names and callable(namespace.get(MASK_FUNCTION)):
                methods[name] = namespace
    return tuple(methods.items())


@contextmanager
def traceable_spec_augment(model: nn.Module) -> Iterator[None]:
    """While it is active, every module of `model` in train mode whose class has methods calling
    `_compute_mask_indices` draws the mask with `compute_mask_indices` and assigns it with `where` (see the module
    docstring); the model and the namespaces are as they were afterwards."""
    with ExitStack() as stack:
        namespaces: dict[int, dict] = {}
        for module in model.modules():
            for name, namespace in _masking_methods(type(module)) if module.training else ():
                stack.enter_context(_method_with_tensor_masks(module, name))
                namespaces[id(namespace)] = namespace
        # Hugging Face's function takes no device: the mask is drawn where the model lives (the trainer's generator)
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
        for namespace in namespaces.values():
            stack.enter_context(_replaced(namespace, MASK_FUNCTION, functools.partial(compute_mask_indices,
                                                                                      device=device)))
        yield


@contextmanager
def _replaced(namespace: dict, name: str, value: Any) -> Iterator[None]:
    original = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = original


@contextmanager
def _method_with_tensor_masks(module: nn.Module, name: str) -> Iterator[None]:
    """`module.name` runs under `_TensorMasks`, as an attribute of the instance (removed afterwards)."""
    bound = getattr(module, name)

    def with_tensor_masks(*args: Any, **kwargs: Any) -> Any:
        with _TensorMasks():
            return bound(*args, **kwargs)

    module.__dict__[name] = with_tensor_masks
    try:
        yield
    finally:
        module.__dict__.pop(name, None)
