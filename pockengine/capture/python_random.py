"""Random numbers drawn in Python while capturing: frozen into the program as constants.

torch.export traces torch's operations; a number drawn with numpy's or Python's global generator inside the
forward (`np.random.rand()`, `random.random()`) is a plain value while tracing, so the program would reuse the one
value drawn then at every step, where eager PyTorch draws a new one each time: silently another training. Their
global states are compared before and after the capture; a change is a `CaptureError` naming the module that drew
(found by running the model once more, eagerly, with a hook on every module) and the way out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

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
def no_python_random(model: nn.Module, run_eagerly: Callable[[], Any]) -> Iterator[None]:
    """Raises `CaptureError` after the block if it drew from Python's or numpy's global generator; their states
    are as they were before it either way. `run_eagerly()` runs the model once in plain PyTorch (to find the
    module that drew)."""
    before = _state()
    yield
    if _state() == before:
        return
    _restore(before)
    where = _drawing_module(model, run_eagerly)
    _restore(before)
    raise CaptureError(
        f"{where} draws random numbers with numpy or Python's `random` (numpy.random's or random's global state "
        "changed while torch.export traced the model and loss). torch.export records such a number as a "
        "constant, so every compiled step would reuse the one drawn while tracing, where eager PyTorch draws a new "
        "one per step. Draw them with torch (torch.rand, torch.randint, torch.randperm: the compiled program draws "
        "those anew each step from the trainer's generator), do the random part outside the model when the batch "
        "is prepared, or put the module in eval mode.")


def _drawing_module(model: nn.Module, run_eagerly: Callable[[], Any]) -> str:
    """The innermost module of `model` whose forward changes Python's or numpy's generator state, in words."""
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
        return "loss_fn"
    module = drew[0]
    return f"module '{names[module]}' ({type(module).__name__})" if names[module] else \
        f"the model ({type(module).__name__})"
