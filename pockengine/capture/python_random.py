"""Random numbers drawn in Python while capturing: frozen into the program as constants.

torch.export traces torch's operations; a number drawn with numpy's or Python's global generator inside the
forward (`np.random.rand()`, `random.random()`) is a plain value while tracing, so the program would reuse the one
value drawn then at every step, where eager PyTorch draws a new one each time: silently another training. Their
global states are compared before and after the capture; a change is a `CaptureError` naming the module that drew
(found by running the model once more, eagerly, with a hook on every module) and the way out. A module in eval
mode may draw a number it does not use (transformers' Wav2Vec2Adapter draws its layer drop in either mode): where
the eager loss is the same whatever the generators draw, the capture stands.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from pockengine.errors import CaptureError

try:
    import numpy
except ImportError:  # nothing of numpy's to draw from
    numpy = None


def _state() -> tuple:
    """The global states of Python's and numpy's generators, comparable with ==."""
    if numpy is None:
        return (random.getstate(),)
    name, keys, position, has_gauss, gauss = numpy.random.get_state()
    return random.getstate(), (name, keys.tobytes(), position, has_gauss, gauss)


def _restore(state: tuple) -> None:
    random.setstate(state[0])
    if numpy is not None:
        name, keys, position, has_gauss, gauss = state[1]
        numpy.random.set_state((name, numpy.frombuffer(keys, dtype=numpy.uint32), position, has_gauss, gauss))


@contextmanager
def no_python_random(model: nn.Module, run_eagerly: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Raises `CaptureError` after the block if it drew from Python's or numpy's global generator, unless the
    module that drew is in eval mode and the loss does not depend on what it drew; their states are as they were
    before the block either way (also when it raises). `run_eagerly()` runs the model and loss once in plain
    PyTorch (torch's generators restored afterwards) and returns the loss."""
    before = _state()
    try:
        yield
    finally:
        drew = _state() != before
        _restore(before)
    if not drew:
        return
    try:
        drawer, where = _drawing_module(model, run_eagerly)
        if drawer is not None and not drawer.training and _loss_ignores_draws(run_eagerly):
            return  # transformers' Wav2Vec2Adapter draws its layer drop in eval mode too, and uses it in train mode
    finally:
        _restore(before)
    raise CaptureError(
        f"{where} draws random numbers with numpy or Python's `random` (numpy.random's or random's global state "
        "changed while torch.export traced the model and loss). torch.export records such a number as a "
        "constant, so every compiled step would reuse the one drawn while tracing, where eager PyTorch draws a new "
        "one per step. Draw them with torch (torch.rand, torch.randint, torch.randperm: the compiled program draws "
        "those anew each step from the trainer's generator), do the random part outside the model when the batch "
        "is prepared, or put the module in eval mode" + (" (it is: its loss depends on the draw all the same)"
                                                          if drawer is not None and not drawer.training else "")
        + ".")


def _loss_ignores_draws(run_eagerly: Callable[[], torch.Tensor]) -> bool:
    """Whether the eager loss is the same, bit for bit, whatever Python's and numpy's generators draw."""
    losses = []
    for seed in (0, 1):
        random.seed(seed)
        if numpy is not None:
            numpy.random.seed(seed)
        losses.append(run_eagerly())
    return torch.equal(*losses)


def _drawing_module(model: nn.Module, run_eagerly: Callable[[], Any]) -> tuple[nn.Module | None, str]:
    """The innermost module of `model` whose forward changes Python's or numpy's generator state (None: none did
    when run again eagerly), and where the draw happened, in words."""
    names = {m: n for n, m in model.named_modules()}
    starts: list[tuple] = []
    drew: list[nn.Module] = []

    def before(module: nn.Module, args: tuple) -> None:
        starts.append(_state())

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if starts.pop() != _state() and module in names:
            drew.append(module)  # children finish first: the innermost comes first

    hooks = [nn_module.register_module_forward_pre_hook(before), nn_module.register_module_forward_hook(after)]
    try:
        run_eagerly()
    finally:
        for hook in hooks:
            hook.remove()
    if not drew:
        if _state_changes(run_eagerly):
            return None, "loss_fn"
        return None, ("code that ran only while torch.export traced (run again eagerly, the model and loss drew "
                      "nothing; another thread drawing at the same time would show the same)")
    module = drew[0]
    return module, (f"module '{names[module]}' ({type(module).__name__})" if names[module] else
                    f"the model ({type(module).__name__})")


def _state_changes(run: Callable[[], Any]) -> bool:
    before = _state()
    run()
    return _state() != before
