"""Layer drop (LayerDrop, https://arxiv.org/abs/1909.11556) as a fixed-shape program: `where(drop, x, layer(x))`.

Hugging Face's encoders skip each layer of their stack at random in train mode (wav2vec2, hubert, wavlm, ... with
their default `layerdrop=0.1`):

    skip_the_layer = torch.rand([]) < self.config.layerdrop
    if not skip_the_layer:
        hidden_states = layer(hidden_states, ...)

The `if` reads a random number into Python, which torch.export cannot trace (it needs the branch while tracing,
and the number is drawn only when the program runs). While capturing, the truth value of such a comparison of one
uniform draw (`torch.rand([])` against a number) is False -- the branch that keeps the layer -- and the next module
called, which must be a layer of a `ModuleList` (the stack the draw decides over), has its output replaced by
`where(drop, its input, its output)`: the program draws as eager PyTorch does, from the trainer's generator, and
a dropped layer passes its input on, with no gradient to its weights. The same condition asked again once its
layer has run (NLLB-MoE's and SpeechT5's decoders: `if not skip_the_layer: x = layer(x)`, then `if skip_the_layer:
continue`) is False again, the branch traced: its layer already stands for both sides, and what follows is watched
as below. Anything else branching on such a draw
(no layer called next, a layer that does not return a tensor of its input's shape, code computing on a layer's
output before the next layer's draw, which a skipped branch would also skip) is a `CaptureError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from pockengine.errors import CaptureError

# torch functions comparing a tensor with a number (`p > u` is `u.__lt__(p)`). Whichever the comparison, the layer
# runs where it is False and is dropped where it is True: that is how the branch was traced.
_COMPARISONS = frozenset({torch.Tensor.__lt__, torch.Tensor.lt, torch.lt, torch.Tensor.__gt__, torch.Tensor.gt,
                          torch.gt, torch.Tensor.__le__, torch.Tensor.le, torch.le, torch.Tensor.__ge__,
                          torch.Tensor.ge, torch.ge})


class _LayerDrop(TorchFunctionMode):
    """Tracks the uniform scalars drawn (`torch.rand([])`) and their comparisons with numbers; the truth value of
    such a comparison is False and makes it the pending drop condition of the next layer called."""

    def __init__(self, names: dict[nn.Module, str], stacked: dict[int, bool]):
        super().__init__()
        self.names, self.stacked = names, stacked  # id(layer) -> whether another layer follows it in its list
        self.watched: tuple[torch.Tensor, str] | None = None  # a droppable layer's output, until the next draw
        self.draws: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the uniform scalars drawn
        self.conditions: WeakIdKeyDictionary = WeakIdKeyDictionary()  # comparisons of them with numbers
        self.pending: torch.Tensor | None = None
        self.decided: WeakIdKeyDictionary = WeakIdKeyDictionary()  # conditions whose layer has been called
        self.dropping: dict[int, torch.Tensor] = {}  # id(layer) -> its drop condition, while it runs

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0] in self.decided:
            return False
        if func is torch.Tensor.__bool__ and args[0] in self.conditions:
            if self.pending is not None:
                raise _not_layer_drop("a second branch on a random number came before any layer was called")
            self.pending = args[0]
            return False
        if self.watched is not None and any(a is self.watched[0] for a in pytree.tree_leaves((args, kwargs))):
            raise _not_layer_drop(f"the output of layer '{self.watched[1]}' is computed on before the next layer's "
                                  "draw, which a skipped branch of more than the layer call would also skip")
        out = func(*args, **kwargs)
        if func is torch.rand and _is_scalar_uniform(args, kwargs):
            self.draws[out] = True
            self.watched = None
        elif func in _COMPARISONS and len(args) == 2 and isinstance(args[1], (int, float)) and \
                isinstance(args[0], torch.Tensor) and args[0] in self.draws:
            self.conditions[out] = True
        return out

    def before_call(self, module: nn.Module, args: tuple) -> None:
        if self.pending is None:
            return
        if id(module) not in self.stacked:
            raise _not_layer_drop(f"the module called next, '{self.names.get(module, type(module).__name__)}', "
                                  "is not a layer of a ModuleList")
        self.dropping[id(module)] = self.pending
        self.decided[self.pending] = True
        self.pending = None

    def after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        drop = self.dropping.pop(id(module), None)
        if drop is None:
            return None
        name = self.names.get(module, type(module).__name__)
        x = args[0] if args else next(iter(kwargs.values()), None)
        hidden = output[0] if isinstance(output, tuple) and output else output
        if not (isinstance(x, torch.Tensor) and isinstance(hidden, torch.Tensor) and x.shape == hidden.shape):
            raise _not_layer_drop(f"layer '{name}' does not return a tensor of its first input's shape, which it "
                                  "would pass on when dropped")
        if isinstance(output, tuple):
            inputs = [*args, *kwargs.values()]
            if any(o is not None and not any(o is i for i in inputs) for o in output[1:]):
                raise _not_layer_drop(f"layer '{name}' returns more than its hidden state (values it does not pass "
                                      "through from its inputs), which a dropped layer would not have computed")
        kept = torch.where(drop, x, hidden)
        if self.stacked[id(module)]:
            # Where the skipped branch holds more than the layer call (`if drop: continue` before
            # `x = layer(x); aux += head(x)`), the code after the layer would run on a dropped layer's input in the
            # program and not at all in eager PyTorch. Between the layer and the next layer's draw nothing may
            # compute on its output. (After the last layer of a list, that is the code after the loop.)
            self.watched = (kept, name)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept

    def finish(self) -> None:
        if self.pending is not None:
            raise _not_layer_drop("no layer was called after it")


def _is_scalar_uniform(args: tuple, kwargs: dict) -> bool:
    size = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)) else args
    return len(size) == 0 and kwargs.get("generator") is None


def _not_layer_drop(why: str) -> CaptureError:
    return CaptureError(
        f"the model branches in Python on a random number (`if torch.rand([]) < p:`), which torch.export cannot "
        f"trace; pockengine compiles it as layer drop (`if not torch.rand([]) < p: x = layer(x)`, a layer of a "
        f"ModuleList skipped at random), but here {why}. Draw the randomness with tensor operations instead "
        "(torch.where(torch.rand([]) < p, x, f(x))), or put the module in eval mode.")


@contextmanager
def traceable_layer_drop(model: nn.Module) -> Iterator[None]:
    """While it is active, Python branches of `model` on a uniform draw skipping a layer are traced as
    `where(drop, x, layer(x))` (see the module docstring). Only where some module of it is in train mode."""
    if not any(m.training for m in model.modules()):
        yield
        return
    names = {m: n for n, m in model.named_modules()}
    stacked = {id(layer): i + 1 < len(m) for m in model.modules() if isinstance(m, nn.ModuleList)
               for i, layer in enumerate(m)}
    mode = _LayerDrop(names, stacked)
    before = nn_module.register_module_forward_pre_hook(mode.before_call)
    after = nn_module.register_module_forward_hook(mode.after_call, with_kwargs=True)
    try:
        with mode:
            yield
        mode.finish()
    finally:
        before.remove()
        after.remove()
