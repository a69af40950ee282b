"""`if tensor:` in a model, a branch on a value (`if labels.max() >= vocab_size: raise ...`), traced as the branch
the example batch takes and checked as the program runs.

torch.export cannot trace such a branch: it traces with shapes, not values, so it has nothing to decide it by, and
the whole capture fails. pockengine runs the model and loss once more in plain PyTorch on the example batch,
recording the value of every `Tensor.__bool__` by the file and line that asked for it (in the order asked), and
traces again with each branch that failed decided as eager PyTorch decided it. That run is made as the trace runs,
so that both ask the same lines in the same order: with gradients enabled (`if y.requires_grad and ...`), with
`torch.compiler.is_compiling()` and `is_exporting()` True (Hugging Face's `is_torchdynamo_compiling()` guards), and
a line inside torch or the capture's own code (`torch._assert`, a torch function mode) is the model's line that
called in. The program asserts at every step that the batch decides it the same way (`_assert_async`, in the forward
pass, before any update); a batch that would take the other branch stops the step with an error naming the file and
line and the branch compiled, and changes nothing. Known gap: a branch inside a layer that layer drop may skip is
asked as often as the eager run kept the layer, which the trace (every layer) does not match: such a capture fails
(tests/test_value_branches.py).

So a validation branch (`if bad: raise ...`, Hugging Face's label checks) becomes a run-time check of the batch: the
usual case. A branch that batches may take either way (`if mask.any(): x = f(x)`) trains on batches that take the
example's side and refuses the others by name: write it with `torch.where` (both sides computed) to train on both.
A branch on a value computed from a random op (ATen's `nondeterministic_seeded` tag) is a `CaptureError`: no decision
made once follows it (Hugging Face's layer drop is traced as what it is instead, capture/layer_drop.py). A random op
called so that it draws nothing does not count: dropout with `train=False` or a rate of 0 (YOLOS's loss in eval mode
checks boxes computed through its eval-mode dropout).

A boolean read into Python with `.item()` (Longformer and LED: `is_global_attn = mask.any().item()`, then
`if is_global_attn:`) is the same branch one step removed: torch.export traces the read as a symbol and fails at the
`if` on it, a line with no tensor left to decide. So a `.item()` of a bool tensor is recorded like `__bool__` (by the
line that read it), and where torch.export fails on a condition over the symbol such a read returned, that read is
decided and asserted as above. Only bool tensors: a bool read into Python has no use but a decision, while a
number read (`.item()`, `int(t)`, `.tolist()`) may size or index what follows and is not decided here.

Such a capture is not kept in the capture cache (capture/cache.py): its branches are the example batch's, which the
cache's key does not hold.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from pockengine.capture.patched import patched
from pockengine.errors import CaptureError
from pockengine.ir.ops import draws_nothing, draws_random

Site = tuple[str, int]  # the file and line whose code asked for a tensor's truth value
MESSAGE_START = "the model branched on a tensor's value at "  # each check's message (the capture cache looks for it)


# torch's files, and the capture's own (its torch function modes call torch functions again while tracing, not while
# recording): a branch asked from inside them is the model's line that called in
_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _caller() -> Site:
    """The model's line that asked: the first frame outside torch and the capture above the patched `__bool__` or
    `item` (a `torch._assert(cond, message)` asks at one line of torch's for every caller)."""
    frame = sys._getframe(2)  # 0: _caller, 1: the patched __bool__ or item, 2: the code that branched
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


def describe(site: Site) -> str:
    source = linecache.getline(*site).strip()
    return f"{site[0]}:{site[1]}" + (f" (`{source}`)" if source else "")


def branches_taken(run_eagerly: Callable[[], object]) -> dict[Site, list[bool]]:
    """Every truth value of a tensor that `run_eagerly()` asked for, and every bool tensor it read with `.item()`, by
    the site that asked, in order."""
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item
    taken: dict[Site, list[bool]] = defaultdict(list)

    def recording_bool(self: torch.Tensor) -> bool:
        value = original_bool(self)
        taken[_caller()].append(value)
        return value

    def recording_item(self: torch.Tensor) -> object:
        value = original_item(self)
        if self.dtype == torch.bool:
            taken[_caller()].append(value)
        return value

    # as torch.export traces: code behind `torch.compiler.is_compiling()` or `is_exporting()` (Hugging Face's
    # `is_torchdynamo_compiling()`) must ask its branches here as it will there, or the recorded order shifts
    with patched(torch.Tensor, "__bool__", recording_bool), patched(torch.Tensor, "item", recording_item), \
            patched(torch.compiler, "_is_compiling_flag", True), patched(torch.compiler, "_is_exporting_flag", True):
        run_eagerly()
    return dict(taken)


def _random_op_behind(t: torch.Tensor) -> str | None:
    """A random op (ATen's `nondeterministic_seeded` tag) that the traced value `t` is computed from, if any."""
    mode = get_proxy_mode()
    if mode is None:
        return None
    proxy = get_proxy_slot(t, mode.tracer, None)
    if proxy is None:  # a constant of the program
        return None
    seen: set[torch.fx.Node] = set()
    todo = [proxy.proxy.node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if draws_random(n.target) and not draws_nothing(n.target, n.args, n.kwargs):
            return str(n.target)
        todo.extend(n.all_input_nodes)
    return None


def _random_branch(site: Site, random_op: str) -> CaptureError:
    return CaptureError(
        f"the model branches on a tensor's value at {describe(site)}, computed from random numbers ({random_op}): a "
        "compiled step cannot decide the branch once for all steps. Write it with torch.where, so that both sides "
        "are computed and the random value selects between them, or stop the draw before it (a dropout rate of 0, "
        "or its module in eval mode).")


def traceable_value_branches(decided: dict[Site, list[bool]]) -> AbstractContextManager:
    """While torch.export traces: a branch on a traced tensor's value (or a bool tensor's `.item()`) at a site of
    `decided` takes the recorded value (its n-th time at that site, the n-th value) and asserts it in the program;
    one that cannot be decided otherwise raises torch's error with the site in its `pockengine_value_branch`
    attribute (capture/export.py then records the branches eagerly and traces again)."""
    original = torch.Tensor.__bool__
    original_item = torch.Tensor.item
    asked: dict[Site, int] = defaultdict(int)
    # the symbols of bool `.item()` reads left to torch.export, with the site and the random op behind each, if any:
    # a failure on a condition over one of them is that read's branch
    reads: dict[object, tuple[Site, str | None]] = {}
    deciding: list[bool] = []  # non-empty while a branch is decided: torch function modes (layer drop's) call
    # `Tensor.__bool__` again from inside the original, and that call is the same branch, not one of their own

    def deciding_bool(self: torch.Tensor) -> bool:
        if deciding or not is_fake(self):
            return original(self)
        deciding.append(True)
        try:
            return _decide(self, _caller())
        finally:
            deciding.pop()

    def deciding_item(self: torch.Tensor) -> object:
        if deciding or self.dtype != torch.bool or not is_fake(self):
            return original_item(self)
        site = _caller()
        if asked[site] < len(decided.get(site, ())):
            return _decided(self, site)
        value = original_item(self)
        if isinstance(value, torch.SymBool):
            for symbol in value.node.expr.free_symbols:
                reads[symbol] = site, _random_op_behind(self)
        return value

    def _decide(self: torch.Tensor, site: Site) -> bool:
        if asked[site] >= len(decided.get(site, ())):
            try:
                return original(self)  # a constant, or layer drop's draw (capture/layer_drop.py) decides it
            except GuardOnDataDependentSymNode as e:
                if (random_op := _random_op_behind(self)) is not None:
                    raise _random_branch(site, random_op) from None
                e.pockengine_value_branch = site
                raise
        return _decided(self, site)

    def _decided(self: torch.Tensor, site: Site) -> bool:
        # at every decision, not only the first that failed: a later time at the same line may be on a value
        # computed from random numbers (a check repeated after each dropout), which no decision follows
        if (random_op := _random_op_behind(self)) is not None:
            raise _random_branch(site, random_op)
        value = decided[site][asked[site]]
        asked[site] += 1
        truth = self if self.dtype == torch.bool else self != 0
        torch.ops.aten._assert_async.msg(
            truth if value else torch.logical_not(truth),
            f"{MESSAGE_START}{describe(site)}: pockengine compiled the branch that the "
            f"example batch took (the condition {value}), and this batch takes the other one (no update was made). "
            "If the branch checks the batch (`if bad: raise`), the batch is bad: see that line; if batches may take "
            "either branch, write it with torch.where so that both are computed.")
        return value

    @contextmanager
    def tracing() -> Iterator[None]:
        with patched(torch.Tensor, "__bool__", deciding_bool), patched(torch.Tensor, "item", deciding_item):
            try:
                yield
            except GuardOnDataDependentSymNode as e:
                read = next((reads[s] for s in getattr(e.cond, "free_symbols", ()) if s in reads), None)
                if read is not None and not hasattr(e, "pockengine_value_branch"):
                    site, random_op = read
                    if random_op is not None:
                        raise _random_branch(site, random_op) from None
                    e.pockengine_value_branch = site
                raise

    return tracing()
