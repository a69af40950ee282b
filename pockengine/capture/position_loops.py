"""Loops over the positions `nonzero()` finds, as fixed-shape programs: every position, each one's rows masked.

Hugging Face's mixture-of-experts layers (Switch Transformers, NLLB-MoE, LongCat-Flash, openai-privacy-filter, and
many copied from Mixtral's old code) run each expert on the rows routed to it:

    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
        current = expert(hidden_states[top_x]) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current)

Both the number of iterations and the number of rows each one picks depend on the routing, and pockengine compiles
programs of fixed shapes: torch.export stops at the loop. While tracing (`traceable_position_loops`), a loop over
the result of `nonzero()` (or `argwhere`) runs over every position of its input instead, in the same order, with
the loop variable a constant of the program, so that Python code in the loop that reads it (`int(expert_idx)`,
`f"expert_{expert_idx[0]}"`, `if expert_idx == n: continue`) sees the position as eager PyTorch would; and inside
such an iteration, `nonzero()`/`torch.where(mask)`/`argwhere` returns every position of its input
(`pockengine::every_position`, which keeps the mask and whether the loop's own position was found). Positions
eager PyTorch would have skipped or not found then contribute exactly zero, which `rewrite_position_loops` proves
on the exported graph and enforces:
- every value computed from the positions treats them independently, row by row along the positions' axis (the
  gathers `x[top_x]`, views, matrix products with the rows on the left, element-wise ops, softmaxes and layer norms
  over other dimensions: the same op families as capture/masked_rows.py; dropout, each row on its own draws), and
  ends in an accumulating write indexed
  by the positions (`index_add`, `index_put(accumulate=True)`); what is written there is masked with `where(found,
  value, 0)`, `found` being the mask at the position and the loop's position found. Rows found compute what they
  computed in eager PyTorch, the others add zero and get a zero gradient (as in capture/masked_rows.py, a row not
  found whose computation overflows to inf or NaN would still poison a gradient through a zero cotangent);
- nothing computed in an iteration is used after it except those writes: an iteration eager PyTorch would not have
  run changes nothing else;
- the writes form chains through the loop that a masked write leaves as they are: each write accumulates into a
  tensor from before the loop (one chain per such tensor and loop) or into the previous write's result, with no op
  between (`out = out * 0.5`, `out.detach()` or fresh zeros in the iteration would apply at every position); a
  write's result feeds the next write or reads in the loop, and only the last write of a chain is used after the
  loop (`torch.stack` of each iteration's result would stack every position's).
Anything else, a loop that breaks out early, and a loop nested in another are `CaptureError`s naming the module.
A position whose body fails while tracing with an `IndexError` (Nemotron-H's and DBRX's experts one-hot their routes
over one class more than they have experts, and index their weights with it) was not found by eager PyTorch, which
ran the batch: capture/export.py traces again without it, and the program asserts as it runs that it is not found
(eager PyTorch would fail there too). Any other failure in the body (a branch on tensor values, which torch.export
cannot trace at any position) is reported as the model's, naming its line.
Python may also read the number of rows found (`top_x.numel()`, `rows.shape[0]`), which while tracing is every
position's count: a size read from a value computed from the positions (its `numel()`, and each dimension the
count divides, in `shape`, `size()`, `stride()` and `Size.numel()`) is a `_Count`, which answers only whether there
are rows (`== 0`, `> 0`, `bool`: LongCat-Flash's `if token_idx.numel() == 0: continue`; an iteration that eager
PyTorch skips for having none adds nothing here either) and is a `CaptureError` where it is computed with (int or
float arithmetic on either side, `math` functions, `int()`, `float()`, formatting), compared with anything but
zero or passed to a torch function; so are `len()` of such a value, iterating over it, and splitting it into as
many tensors as it has rows. A dimension computed from the count other than as a multiple of it (`top_x[:3]`) is
not seen in Python; the value itself is refused by the proof above where the program uses it.

The loop variable (and what is computed from it alone) read after its iteration, in a later one or after the loop,
is a `CaptureError`. Python state the loop carries between iterations otherwise is NOT checked and follows every
position, not the ones eager PyTorch finds: a counter of the experts hit (`n += 1`, also under `if
top_x.numel() > 0:`), a list of them, an `int(expert)` kept and used after the loop. The graph cannot show it (a
Python number is no node), so each static loop says so in a `UserWarning` naming its file:line when it is compiled;
keep such state in tensors the loop writes with `index_add_`.

The cost is compute: each expert runs on every row (top-k rows per token) instead of its own.
"""

from __future__ import annotations

import dis
import itertools
import math
import operator
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import is_fake
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from pockengine.capture.locations import described
from pockengine.errors import CaptureError
from pockengine.ir.ops import is_pointwise

aten = torch.ops.aten

_ITERATION = "pockengine_position_loop"  # key in a node's meta["custom"]: (loop, iteration) it was traced in


@torch.library.custom_op("pockengine::every_position", mutates_args=())
def every_position(mask: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Every position of `mask`, row-major, as `nonzero()` lists them: (mask.numel(), mask.dim()) int64. `mask` and
    `found` (whether the enclosing loop's position was found) are what `rewrite_position_loops` masks with."""
    return torch.ones(mask.shape, dtype=torch.bool, device=mask.device).nonzero()


@every_position.register_fake
def _(mask: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    return mask.new_empty((mask.numel(), mask.dim()), dtype=torch.int64)


EVERY_POSITION = torch.ops.pockengine.every_position.default

_NONZERO = frozenset({torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere})
# the (K, 1) positions of a 1-d mask as a vector (Nemotron-H's `nonzero().squeeze(-1)`), iterated as 0-d positions
_FLATTENS = frozenset({torch.Tensor.squeeze, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.flatten})
_WRITES = frozenset({"index_add", "index_put", "index_copy", "index_fill", "scatter", "scatter_add", "scatter_reduce",
                     "masked_scatter"})
_NUMEL_READS = frozenset({torch.Tensor.numel, torch.numel, torch.Tensor.nelement})
_SIZE_READS = _NUMEL_READS | {torch.Tensor.size, torch.Tensor.stride, torch.Tensor.__len__}


# the count refusals of the trace under way: torch's argument parser turns an error raised in `__index__` into its
# own TypeError, and a model may catch errors, so the trace raises the first refusal once it has failed or ended
_REFUSED: list[CaptureError] = []


def _count_error(what: str) -> CaptureError:
    error = CaptureError(
        f"the number of rows a nonzero()/torch.where(mask) finds inside a loop over nonzero()'s positions is {what} "
        "in Python; the static loop finds every position (capture/position_loops.py), so that number is not eager "
        "PyTorch's. Only whether there are rows may be asked (`if top_x.numel() == 0: continue`); compute with "
        "fixed shapes instead (torch.where(mask, f(x), 0)).")
    _REFUSED.append(error)
    return error


class _Count:
    """A size read in Python from a value of the positions (the number of rows found, or a size it is a factor of):
    every position's count while tracing, so only asking whether there are any is answered, which is all the same
    where iterations with no rows found add nothing; any other use of the number is a CaptureError. Not an int:
    int's and float's own operators would read an int subclass without asking it (`1.0 / n`, `0.9 ** n`)."""

    __slots__ = ("_n",)

    def __init__(self, n: int) -> None:
        self._n = n

    __hash__ = object.__hash__

    def __repr__(self) -> str:  # without the number, which is not eager PyTorch's
        return "<the number of rows found, every position's while tracing>"

    def _zero_test(self, other: Any, zero: int, op: Callable) -> bool:
        if type(other) is not int or other != zero:
            raise _count_error(f"compared with {other!r}")
        return op(self._n, other)

    def __eq__(self, other: Any) -> bool:  # type: ignore[override]
        return self._zero_test(other, 0, operator.eq)

    def __ne__(self, other: Any) -> bool:  # type: ignore[override]
        return self._zero_test(other, 0, operator.ne)

    def __gt__(self, other: Any) -> bool:
        return self._zero_test(other, 0, operator.gt)

    def __le__(self, other: Any) -> bool:
        return self._zero_test(other, 0, operator.le)

    def __ge__(self, other: Any) -> bool:
        return self._zero_test(other, 1, operator.ge)

    def __lt__(self, other: Any) -> bool:
        return self._zero_test(other, 1, operator.lt)

    def __bool__(self) -> bool:
        return self._n != 0

    def _refused(self, *args: Any) -> Any:
        raise _count_error("computed with")


for _name in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "divmod", "and", "or", "xor",
              "lshift", "rshift"):
    setattr(_Count, f"__{_name}__", _Count._refused)
    setattr(_Count, f"__r{_name}__", _Count._refused)
# __index__/__int__/__float__: range(n), math.log(n), int(n); __str__/__format__: int(f"{n}")
for _name in ("neg", "pos", "abs", "invert", "index", "int", "float", "complex", "round", "trunc", "floor", "ceil",
              "str", "format"):
    setattr(_Count, f"__{_name}__", _Count._refused)


class _CountedSize(tuple):
    """A tensor's size holding `_Count`s; its `numel()` is one too."""

    def numel(self) -> _Count:
        return _Count(math.prod(d._n if isinstance(d, _Count) else d for d in self))


def _has_count(tree: Any) -> bool:
    if isinstance(tree, (tuple, list)):  # torch.Size included
        return any(map(_has_count, tree))
    if isinstance(tree, dict):
        return any(map(_has_count, tree.values()))
    return isinstance(tree, _Count)


def _counted(size: Any, rows: int, numel: bool) -> Any:
    """A size read from a value of the positions: its number of elements, and each dimension that `rows` (every
    position's count) divides, a `_Count` (a dimension of the rows joined with others by a view as well)."""
    def count(d: Any) -> Any:
        return _Count(d) if isinstance(d, int) and d >= rows and d % rows == 0 else d

    if numel:
        return _Count(size)
    if isinstance(size, tuple):
        counted = tuple(map(count, size))
        return _CountedSize(counted) if _has_count(counted) else size
    return count(size)


class _Position(torch.Tensor):
    """A loop variable of a static loop: a real tensor, and what is computed from it alone stays real (`int(v)`,
    `f"{v[0]}"`, `v == n`), so that the loop's Python code reads the position as eager PyTorch would, not a traced
    number; with traced tensors it is a constant of the program. Read after its iteration (in a later one or after
    the loop) it is a CaptureError: the last position of the static loop is not the last one eager PyTorch found."""

    _ended: list  # [whether the iteration it belongs to has ended], shared by what is computed from it

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        positions = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, cls)]
        if any(p._ended[0] for p in positions):
            raise CaptureError(
                "the loop variable of a loop over the positions nonzero() finds (or a tensor computed from it) is "
                "read after its iteration, in a later one or after the loop; pockengine runs such a loop over every "
                "position (capture/position_loops.py), so its last position is not the last one eager PyTorch "
                "found. Read it only in its own iteration, and keep what the loop gathers in tensors it writes "
                "with index_add_.")
        plain = pytree.tree_map_only(cls, lambda t: t.as_subclass(torch.Tensor), (args, kwargs or {}))
        if all(isinstance(t, cls) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
            with _disable_current_modes(), torch._C.DisableTorchFunctionSubclass():
                out = func(*plain[0], **plain[1])
            return pytree.tree_map_only(torch.Tensor, lambda t: _position(t, positions[0]._ended), out)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*plain[0], **plain[1])


def _position(t: torch.Tensor, ended: list) -> _Position:
    value = t.as_subclass(_Position)
    value._ended = ended
    return value


class _PositionLoops(TorchFunctionMode):
    """Records the results of `nonzero()` on traced tensors; inside an iteration over one, `nonzero()` returns
    every position (`every_position`)."""

    def __init__(self, skipped: frozenset) -> None:
        super().__init__()
        self.skipped = skipped  # (loop, position) of the bodies that failed in an earlier trace
        # nonzero() result -> (its input as a bool mask, whether it lists the positions of a 1-d mask as a vector)
        self.found: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.rows: WeakIdKeyDictionary = WeakIdKeyDictionary()  # value computed from positions -> their count
        self.guard: torch.Tensor | None = None  # inside an iteration: whether its position was found
        self.loops = 0
        self.stopped_at: tuple | None = None  # (loop, position) a static loop was left at before its end

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.rows and _has_count((args, kwargs)):
            raise _count_error("passed to a torch function")  # which reads the number whatever it is
        if self.rows and (rows := self._rows_of(args, kwargs)) is not None:
            out = func(*args, **kwargs)
            if func in _SIZE_READS or getattr(func, "__self__", None) is torch._C.TensorBase.shape:
                if func is torch.Tensor.__len__:
                    raise _count_error("read with len()")
                return _counted(out, rows, func in _NUMEL_READS)
            first = args[0] if args else None
            if (out is first or getattr(func, "__name__", "").rstrip("_") in _WRITES) and not (
                    isinstance(first, torch.Tensor) and first in self.rows):
                return out  # written into a tensor of other rows (the accumulator), in place or not: its shape
            if isinstance(out, (tuple, list)) and len(out) >= rows and len(out) % rows == 0:
                raise _count_error("the number of tensors it is split into")  # unbind(0), split(1)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.rows[t] = rows
            return out
        if func in _FLATTENS and self.found and args[0] in self.found and self.found[args[0]][0].dim() == 1:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.dim() == 1:
                self.found[out] = (self.found[args[0]][0], True)
            return out
        where = func is torch.where and len(args) == 1 and not kwargs
        if not (func in _NONZERO or where) or not isinstance(args[0], torch.Tensor) or not is_fake(args[0]) \
                or args[0].dim() == 0:
            return func(*args, **kwargs)
        x = args[0]
        as_tuple = where or bool(kwargs.get("as_tuple", False))
        if self.guard is None:
            out = func(*args, **kwargs)
            if not as_tuple:
                self.found[out] = (x if x.dtype == torch.bool else x != 0, False)
            return out
        positions = EVERY_POSITION(x if x.dtype == torch.bool else x != 0, self.guard)
        out = tuple(positions.unbind(1)) if as_tuple else positions
        for t in (out if as_tuple else (out,)):
            self.rows[t] = x.numel()
        return out

    def _rows_of(self, args: tuple, kwargs: dict) -> int | None:
        """The count of positions a tensor among the arguments was computed from, if any."""
        return next((self.rows[t] for t in pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor) and t in self.rows), None)

    def iterate(self, mask: torch.Tensor, vector: bool, where: tuple) -> Iterator[torch.Tensor]:
        if self.guard is not None:
            raise CaptureError("a loop over the positions nonzero() finds runs inside another such loop; pockengine "
                               "makes one level of such loops static (capture/position_loops.py). Loop over the "
                               "inner positions with fixed shapes instead (torch.where(mask, f(x), 0)).")
        loop, self.loops = self.loops, self.loops + 1
        # Python state carried between iterations is invisible to the graph (a Python int is no node): said once
        # per loop, as warnings show a message once
        warnings.warn(
            f"pockengine: the loop over the positions nonzero() finds at {where[0]}:{where[1]} is compiled to run "
            "over every position, each one's rows masked (capture/position_loops.py). Python state it carries "
            "between iterations (a counter, a list of the experts hit, an int read from the loop variable and used "
            "after the loop) follows every position, not the ones the batch finds, and is not checked: keep such "
            "state in tensors the loop writes with index_add_.", UserWarning, stacklevel=2)
        for i, position in enumerate(itertools.product(*map(range, mask.shape))):
            found = mask[position]
            if (where, position) in self.skipped:
                torch._assert_async(torch.logical_not(found), (
                    f"a loop over the positions nonzero() finds ({where[0]}:{where[1]}) found {list(position)}, a "
                    "position its body cannot run at (it failed there while pockengine traced it)"))
                continue
            ended = [False]
            with _disable_current_modes():  # a constant the loop's Python code can read, as eager PyTorch would
                value = _position(torch.tensor(position[0] if vector else position, dtype=torch.int64,
                                               device=mask.device), ended)
            self.guard = found
            try:
                with fx_traceback.preserve_node_meta(), fx_traceback.annotate({_ITERATION: (loop, i)}):
                    yield value
            except GeneratorExit:
                self.stopped_at = (where, position)
                raise
            finally:
                self.guard = None
                ended[0] = True


@contextmanager
def traceable_position_loops(skipped: frozenset = frozenset()) -> Iterator[None]:
    """While tracing, a loop over `nonzero()`'s result runs over every position (see the module docstring). Where
    its body fails at a position, the error carries `(loop, position)` as `pockengine_static_loop`; `skipped` are
    those of earlier traces, positions eager PyTorch did not find (it ran the batch): they are not run, and the
    program asserts as it runs that they are not found (Nemotron-H's and DBRX's experts one-hot their routes over
    one class more than they have experts, which no route takes)."""
    mode = _PositionLoops(skipped)
    tensor_iter = torch.Tensor.__iter__

    def iterate(self: torch.Tensor) -> Iterator[torch.Tensor]:
        if mode.rows and self in mode.rows:
            raise _count_error("iterated over")  # sum(1 for _ in top_x)
        found = mode.found.get(self)
        frame = sys._getframe(1)
        if found is None or not _for_loop(frame):
            return tensor_iter(self)
        return mode.iterate(*found, (frame.f_code.co_filename, frame.f_lineno, frame.f_lasti))

    torch.Tensor.__iter__ = iterate
    _REFUSED.clear()
    try:
        with mode:
            yield
    except Exception as e:
        if _REFUSED:
            raise _REFUSED[0] from e
        if isinstance(e, TypeError) and _Count.__name__ in str(e):  # torch's argument parser refused a count
            raise _count_error("passed to a torch function") from e
        # only an index out of range is taken for a position eager PyTorch did not find (Nemotron-H's extra
        # class): a data-dependent branch or any other failure in the body is the model's, reported as it is
        if mode.stopped_at is not None and isinstance(e, IndexError):
            e.pockengine_static_loop = mode.stopped_at  # type: ignore[attr-defined]  (export.py traces again)
        raise
    finally:
        torch.Tensor.__iter__ = tensor_iter
    if _REFUSED:
        raise _REFUSED[0]
    if mode.stopped_at is not None:
        raise CaptureError(
            f"a loop over the positions nonzero() finds left early (break or return) at position {mode.stopped_at[1]} "
            f"({mode.stopped_at[0][0]}:{mode.stopped_at[0][1]}); "
            "pockengine runs such a loop over every position (capture/position_loops.py), so it would stop "
            "elsewhere than eager PyTorch does. Loop over all of them, or compute with fixed shapes "
            "(torch.where(mask, f(x), 0)).")


def _for_loop(frame: Any) -> bool:
    """The frame iterates in a `for` statement (GET_ITER, then FOR_ITER): the body of each iteration runs between
    two steps of the iterator. Anything else consuming it (`list(hit)`, `enumerate(hit)`, a comprehension) would see
    every position, not the ones found, and is left to torch.export, which refuses it."""
    code, i = frame.f_code.co_code, frame.f_lasti
    if code[i] != dis.opmap["GET_ITER"]:
        return False
    i += 2
    while code[i] == dis.EXTENDED_ARG:  # FOR_ITER's jump past a long loop body
        i += 2
    return code[i] == dis.opmap["FOR_ITER"]


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim


def _view_axis(before: tuple, after: tuple, axis: int) -> int | None:
    """Where the positions' axis lands in a row-major view, if it stays one dimension with its elements apart."""
    lead, rest = math.prod(before[:axis]), math.prod(before[axis + 1:])
    for b in range(len(after)):
        if math.prod(after[:b]) == lead and after[b] == before[axis] and math.prod(after[b + 1:]) == rest:
            return b
    return None


def _outside(v: Any, out: torch.Tensor, out_axis: int) -> bool:
    """An operand from outside the positions broadcasts along their axis of `out` (size 1 or no dimension there)."""
    if not isinstance(v, torch.Tensor):
        return True
    d = out_axis - (out.dim() - v.dim())
    return d < 0 or v.shape[d] == 1


def _row_axis(user: torch.fx.Node, axes: dict) -> int | None:
    """The positions' axis of `user`'s result where each of its slices along it is computed from the same slice of
    the region's values `axes` (node -> axis) alone; None where `user` is not computed so."""
    val, target, args = _val(user), user.target, user.args
    if any(isinstance(a, torch.fx.Node) for a in user.kwargs.values()):
        return None
    inside = [a for a in args if isinstance(a, torch.fx.Node) and a in axes]
    first = args[0] if args and isinstance(args[0], torch.fx.Node) else None  # not a list of tensors (cat)
    if target is operator.getitem:
        return axes[first]
    if target is aten.index.Tensor and first not in axes and isinstance(val, torch.Tensor):
        return _gather_axis(args[1], axes)
    if not isinstance(val, (torch.Tensor, tuple, list)) or len(inside) != 1 and not is_pointwise(target):
        return None
    out = val[0] if isinstance(val, (tuple, list)) else val
    axis = axes.get(first)
    if target in (aten.clone.default, aten._to_copy.default, aten.alias.default, aten.expand.default) \
            and first in axes:
        moved = axis + out.dim() - _val(first).dim()  # expand may add leading dimensions
        return moved if out.shape[moved] == _val(first).shape[axis] else None
    if target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default) and first in axes:
        return _view_axis(tuple(_val(first).shape), tuple(out.shape), axis)
    if target is aten.unsqueeze.default and first in axes:
        return axis + (_norm(args[1], out.dim()) <= axis)
    if target in (aten.squeeze.dims, aten.squeeze.dim) and first in axes:
        dims = {_norm(d, _val(first).dim()) for d in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]])}
        dims = {d for d in dims if _val(first).shape[d] == 1}
        return None if axis in dims else axis - sum(d < axis for d in dims)
    if target is aten.permute.default and first in axes:
        return [_norm(d, out.dim()) for d in args[1]].index(axis)
    if target in (aten.select.int, aten.slice.Tensor) and first in axes:
        dim = _norm(args[1] if len(args) > 1 else 0, _val(first).dim())
        return None if dim == axis else axis - (target is aten.select.int and dim < axis)
    if target in (aten.split.Tensor, aten.split_with_sizes.default) and first in axes:
        return None if _norm(args[2] if len(args) > 2 else 0, _val(first).dim()) == axis else axis
    if target is aten.native_dropout.default and first in axes:
        # each element kept or not on its own draw: a row found is dropped out as in eager PyTorch, from the same
        # distribution (not the same numbers: the compiled program draws from the trainer's generator anyway)
        return axis
    if target in (aten._softmax.default, aten._log_softmax.default) and first in axes:
        return axis if _norm(args[1], out.dim()) != axis else None
    if target is aten.native_layer_norm.default and first in axes:
        return axis if axis < out.dim() - len(args[1]) and all(a not in axes for a in args[2:4]) else None
    if target is aten.mm.default and first in axes:  # the rows on the left, each row times the same matrix
        return 0 if axis == 0 and args[1] not in axes else None
    if target is aten.addmm.default and args[1] in axes:
        return 0 if axes[args[1]] == 0 and args[2] not in axes and args[0] not in axes and _outside(
            _val(args[0]), out, 0) else None
    if is_pointwise(target):
        out_axes = {out.dim() - _val(a).dim() + axes[a] for a in inside}
        if len(out_axes) != 1:
            return None
        out_axis = out_axes.pop()
        rows = out.shape[out_axis]
        if any(_val(a).shape[axes[a]] != rows for a in inside):
            return None
        others = [_val(a) for a in args if isinstance(a, torch.fx.Node) and a not in axes]
        return out_axis if all(_outside(v, out, out_axis) for v in others) else None
    return None


def _gather_axis(indices: list, axes: dict) -> int | None:
    """`x[..., top_x, ...]` with the positions' index vectors (and indices broadcasting along them): where the
    positions' axis lands (advanced indexing puts it at the first index when the indices are adjacent)."""
    used = [i for i, index in enumerate(indices) if index is not None]
    if not used or not any(indices[i] in axes for i in used):
        return None
    for i in used:
        v = _val(indices[i])
        if indices[i] in axes:
            if v.dim() != 1 or axes[indices[i]] != 0:
                return None
        elif not (isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() == 1):
            return None  # one index for every row (the expert's constant index)
    return used[0] if used == list(range(used[0], used[-1] + 1)) else 0


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else n


def _write(n: torch.fx.Node, axes: dict) -> tuple[int, torch.fx.Node] | None:
    """(the dim it writes along, the value written) for an accumulating write into a tensor from outside the region
    indexed by one of the positions' index vectors: `index_add(z, dim, top_x, v)`, `index_put(z, [None, ...,
    top_x], v, accumulate=True)`; None for anything else."""
    if n.target is aten.index_add.default and n.args[0] not in axes and n.args[2] in axes:
        dim, index, value = _norm(n.args[1], _val(n.args[0]).dim()), n.args[2], n.args[3]
    elif n.target is aten.index_put.default and n.args[0] not in axes and (
            n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)):
        used = [i for i, index in enumerate(n.args[1]) if index is not None]
        if len(used) != 1:
            return None
        dim, index, value = used[0], n.args[1][used[0]], n.args[2]
    else:
        return None
    if index not in axes or _val(index).dim() != 1 or axes[index] != 0:
        return None
    z, v = _val(n.args[0]), _val(value)
    shape = [*z.shape[:dim], _val(index).shape[0], *z.shape[dim + 1:]]
    if value in axes and (v.dim() != len(shape) or axes[value] != dim):
        return None
    try:
        if list(torch.broadcast_shapes(tuple(v.shape), tuple(shape))) != shape:
            return None
    except RuntimeError:
        return None
    return dim, value


def _region(marker: torch.fx.Node) -> tuple[dict, list] | None:
    """(node -> its positions' axis, for every value computed from the marker's positions; the accumulating writes
    they end in, each with the dim it writes along and the value written), or None where they reach anything
    else."""
    reached, writes, todo = {marker}, [], [marker]
    while todo:
        for user in todo.pop().users:
            if user in reached or user in writes:
                continue
            if user.op != "call_function":
                return None  # the positions leave the program
            if user.target is aten._assert_tensor_metadata.default:
                continue  # export's dtype check, which the capture drops
            if user.target in (aten.index_add.default, aten.index_put.default):
                writes.append(user)  # checked below; the accumulator it makes is no value of the positions
            else:
                reached.add(user)
                todo.append(user)
    axes = {marker: 0}
    for n in marker.graph.nodes:  # in order: every operand from the region has its axis
        if n in reached and n is not marker:
            axis = _row_axis(n, axes)
            if axis is None:
                return None
            axes[n] = axis
    checked = [(w, _write(w, axes)) for w in writes]
    if any(found is None for _, found in checked):
        return None
    return axes, [(w, *found) for w, found in checked]


def _iteration(n: torch.fx.Node) -> Any:
    return (n.meta.get("custom") or {}).get(_ITERATION)


def _escapes(graph: torch.fx.Graph, writes: set) -> torch.fx.Node | None:
    """A value computed in an iteration of a static loop and used after it, other than an accumulating write."""
    for n in graph.nodes:
        iteration = _iteration(n)
        if iteration is None or n in writes:
            continue
        if any(_iteration(u) != iteration for u in n.users):
            return n
    return None


def _unchained(graph: torch.fx.Graph, writes: set) -> tuple[torch.fx.Node, str] | None:
    """(a write, what is wrong) where the accumulating writes of the static loops are not chains that a skipped
    iteration leaves as they are. A masked write adds zero, so an iteration eager PyTorch skips changes nothing
    only where each chain of writes runs through the loop unbroken: each write accumulates into a tensor from
    before the loop or the result of the previous write of its chain (`out = out * 0.5` or `out.detach()` in the
    iteration, or fresh zeros per iteration, would apply to every position, not only to those found); one chain
    per such tensor and loop; a write's result feeds the next write of its chain or reads in this loop, and only
    the last write of a chain in the loop is used after it (not one result per iteration)."""
    starts: set = set()
    for w in (n for n in graph.nodes if n in writes):
        loop = (_iteration(w) or (None,))[0]
        acc = w.args[0]
        if acc not in writes:
            if _iteration(acc) is not None:
                return w, (f"accumulates into {acc.name} ({acc.target}), computed in the loop's iteration rather than "
                           "before the loop or by the previous accumulating write")
            if (loop, acc) in starts:
                return w, (f"starts another chain of writes into {acc.name} in the same loop (one result per "
                           "iteration)")
            starts.add((loop, acc))
        following = [u for u in w.users if u in writes and u.args[0] is w]
        if len(following) > 1:
            return w, "is accumulated into by more than one write"
        if following and (_iteration(following[0]) or (None,))[0] == loop:
            after = next((u for u in w.users if u not in following and (_iteration(u) or (None,))[0] != loop), None)
            if after is not None:
                return w, (f"is used after the loop ({after.name}, {after.target}) although a later write of the "
                           "loop accumulates into it: only the last write of the chain may be")
    return None


def rewrite_position_loops(gm: torch.fx.GraphModule) -> bool:
    """Replace every `every_position` of `gm` by the positions it stands for and mask what each accumulating write
    indexed by them adds with whether the position was found; drop the `nonzero()`s only a static loop read.
    Whether anything changed. A `CaptureError` names the module where the rewrite cannot prove it equals eager
    PyTorch (see the module docstring)."""
    graph = gm.graph
    markers = [n for n in graph.nodes if n.target is EVERY_POSITION]
    if not markers and not any(_iteration(n) is not None for n in graph.nodes):
        return False
    all_writes: set = set()
    for marker in markers:
        found = _region(marker)
        if found is None:
            raise CaptureError(
                f"the rows a nonzero()/torch.where(mask) finds inside a loop over nonzero()'s positions "
                f"({described(marker)}) are not all computed row by row and accumulated into a tensor with "
                "index_add_ / index_put_(accumulate=True); pockengine compiles programs of fixed shapes and makes "
                "such a loop static only then (capture/position_loops.py). Compute the rows with fixed shapes "
                "instead, for example every row through the function and torch.where(mask, f(x), 0).")
        _, writes = found
        _rewrite(graph, marker, writes)
        all_writes.update(w for w, _, _ in writes)
    escaped = _escapes(graph, all_writes)
    if escaped is not None:
        raise CaptureError(
            f"a value computed in a loop over nonzero()'s positions ({described(escaped)}, node {escaped.name}) is "
            "used after its iteration, other than rows it accumulates with index_add_ / index_put_(accumulate="
            "True); the static loop runs every position, also those eager PyTorch skips, and only such writes can "
            "be masked (capture/position_loops.py). Compute it with fixed shapes instead.")
    unchained = _unchained(graph, all_writes)
    if unchained is not None:
        write, problem = unchained
        raise CaptureError(
            f"an accumulating write in a loop over nonzero()'s positions ({write.target}, node {write.name}, "
            f"{described(write)}) {problem}; the static loop runs every position, also those eager PyTorch skips, "
            "and masks what each write adds, which equals eager PyTorch only where every write accumulates into "
            "the tensor from before the loop or the previous write's result, and only the last result is used "
            "after the loop (capture/position_loops.py). Accumulate with index_add_ into one tensor made before "
            "the loop, and change it only after the loop.")
    _drop_unread_nonzeros(graph)
    placeholders = [p.meta["val"] for p in graph.nodes if p.op == "placeholder"]
    gm.recompile()
    FakeTensorProp(gm, mode=torch._guards.detect_fake_mode(placeholders)).propagate_dont_convert_inputs(*placeholders)
    return True


def _rewrite(graph: torch.fx.Graph, marker: torch.fx.Node, writes: list) -> None:
    mask, found = marker.args
    shape = list(_val(mask).shape)
    rows = math.prod(shape)

    def call(source: torch.fx.Node, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = graph.call_function(target, args, kwargs)
        node.meta.update((k, source.meta[k]) for k in ("nn_module_stack", "custom") if k in source.meta)
        return node

    with graph.inserting_before(marker):
        index = call(marker, aten.arange.default, rows, dtype=torch.int64, device=_val(mask).device)
        columns = [call(marker, aten.view.default, call(marker, aten.remainder.Scalar, call(
            marker, aten.div.Scalar_mode, index, math.prod(shape[d + 1:]), rounding_mode="floor"), shape[d]),
            [rows, 1]) for d in range(len(shape))]
        positions = columns[0] if len(columns) == 1 else call(marker, aten.cat.default, columns, 1)
        mask = call(marker, aten.clone.default, mask, memory_format=torch.contiguous_format)  # a permuted one-hot
        keep = call(marker, aten.logical_and.default, call(marker, aten.view.default, mask, [rows]), found)
    marker.replace_all_uses_with(positions)
    graph.erase_node(marker)
    for write, dim, value in writes:
        ndim = _val(write.args[0]).dim()
        with graph.inserting_before(write):
            kept = call(write, aten.view.default, keep, [*[1] * dim, rows, *[1] * (ndim - dim - 1)])
            zero = call(write, aten.full.default, [], 0, dtype=_val(value).dtype, device=_val(value).device)
            masked = call(write, aten.where.self, kept, value, zero)
        if write.target is aten.index_add.default:
            write.args = (*write.args[:3], masked, *write.args[4:])
        else:
            write.args = (*write.args[:2], masked, *write.args[3:])


def _drop_unread_nonzeros(graph: torch.fx.Graph) -> None:
    """A `nonzero()` a static loop iterated over is read by nothing but torch.export's range asserts on its size."""
    for n in reversed(list(graph.nodes)):
        if n.target is not aten.nonzero.default:
            continue
        sizes, todo = [], [n]
        while todo:
            for u in todo.pop().users:
                if u not in sizes:
                    sizes.append(u)
                    todo.append(u)
        if any(isinstance(_val(u), torch.Tensor) for u in sizes):
            continue
        order = {node: i for i, node in enumerate(graph.nodes)}
        for u in sorted(sizes, key=order.__getitem__, reverse=True):
            graph.erase_node(u)
        graph.erase_node(n)
