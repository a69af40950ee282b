"""Rows picked by a boolean mask, changed row by row and written back: `out[mask] = f(x[mask])`, fixed-shape.

X-MOD's language adapters run each sample's rows through its language's adapter this way. How many rows a mask
picks depends on its values, and pockengine compiles programs of fixed shapes, so torch.export's data-dependent
size (an unbacked symbol) cannot stay. Where every op between the pick (`aten.index.Tensor(x, [mask])`) and the
write-back (`aten.index_put(z, [mask], y)`) provably treats the picked rows independently -- views that keep each
row's elements together, matrix products with the rows on the left, element-wise ops with operands that do not
vary along the rows, layer norms and softmaxes over the trailing dimensions -- computing `f` on every row and keeping
the picked ones with `where(mask, f(x), z)` gives the same values and the same gradients (rows not picked get a
zero cotangent). `rewrite_masked_rows` rewrites the exported graph so and re-propagates its shapes, which are then
static. Anything else keeps its data-dependent size, and capture refuses it by name as before.

A value written under a mask, `x[mask] = v` (`index_put(x, [mask], v)`, also with `accumulate`, and with the mask
over later dims: `x[:, mask] = v`), with a `v` of fixed shape that broadcasts over the picked rows (a number, a
learned vector: SpecAugment's `hidden_states[mask] = masked_spec_embed`), is `where(mask, v, x)` (`x + v` where it
accumulates): the same values and gradients, no count of the picked rows at all, so nothing in the program depends
on it (an `index_put` under a boolean mask finds its rows with `nonzero`, which waits for the device on a GPU, and
its gradient for `v` sums a data-dependent selection).

The same holds for rows grouped by counts read out of a tensor and concatenated back in order:
`cat([f_i(chunk_i) for chunk_i in x.split(counts.tolist())])` (JetMoE's experts: tokens sorted by expert, each
expert's rows through its own weights). Row r belongs to group i where the running sum of the counts passes r; with
each `f_i` row by row, `f_i` is computed on every row and each row keeps its group's result. The counts must add up
to the rows, as `split` checks: the program asserts it as it runs.

And for a sum or mean over such rows: `mean(f(x[mask], y[mask]))` (ELECTRA's and Funnel's pretraining heads pick the
logits and the labels of the tokens the attention mask keeps, each with the mask, into a binary cross-entropy). The
picks of one mask share one row count, so a row-by-row region may start at all of them and join them; with `f`
computed on every row, `sum(where(mask, f(x, y), 0))` is the same sum and gives the other rows no gradient, and the
mean divides it by the mask's count times the elements per row (0/0 where the mask keeps nothing, as the mean of no
rows is). A value computed on the rows the mask drops may be inf or NaN there (a log of padding); `where` drops it
from the value, and its gradient there is 0 times the op's derivative, as in the write-backs above.

And for one row per sample picked among the masked ones: `x[mask].view(B, -1, *rest)[:, j]` (BART's and T5's
sequence classification heads take each sample's last <eos> token so). With k = (picked rows) / B, group g of the
view holds the picked rows g*k ... g*k + k - 1 in order, so its j-th row is the (g*k + j mod k)-th picked row: its
position is how many positions precede it in the running count of the mask, and one `index_select` of those B rows
replaces the pick. The view's and the select's conditions (the rows divide into B groups of more than j, or at least
-j, rows) are asserted as the program runs, in place of torch.export's asserts on the row count. Such heads check
that every sample has as many <eos> tokens with `len(torch.unique_consecutive(counts))`: the number of runs of a
1-d tensor, one plus how many neighbours differ, a 0-d tensor read out only to be checked (capture/export.py).

And for a CTC loss's targets picked out of padded labels: `ctc_loss(log_probs, labels[mask], input_lengths,
mask.sum(-1))` (Hugging Face's CTC heads: `labels.masked_select(labels != -100)`) concatenates each sample's
targets. The same targets, padded, are each row of `labels` with its picked entries moved to the front in order (a
stable sort of the rows by `not mask`), with the same lengths: the loss and its gradient are the same, and nothing
has a data-dependent size. Where the lengths are not `mask.sum(-1)` itself, the program asserts that they are.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from pockengine.ir.ops import is_pointwise
from pockengine.kernels.ctc import CTC_LOSS

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_COPIES = (aten.clone.default, aten._to_copy.default, aten.alias.default)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else n


def _rows(val: Any, symbol: sympy.Symbol) -> bool:
    """`val` is a tensor whose leading size is the picked rows times a constant, every other size static."""
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    lead, rest = val.shape[0], val.shape[1:]
    if not isinstance(lead, torch.SymInt) or any(not isinstance(d, int) for d in rest):
        return False
    expr = sympy.expand(lead.node.expr)
    if expr.free_symbols != {symbol}:
        return False
    poly = sympy.Poly(expr, symbol)
    return poly.monoms() == [(1,)] and poly.coeffs()[0].is_Integer and poly.coeffs()[0] > 0


def _independent_operand(a: Any, out: torch.Tensor) -> bool:
    """An operand outside the rows that broadcasts along them (it does not span the leading dimension)."""
    v = _val(a)
    if not isinstance(v, torch.Tensor):
        return True
    # a size of other picked rows (ELECTRA's labels picked by the mask its logits are) is unknown: not outside them
    return v.dim() < out.dim() or (v.dim() == out.dim() and statically_known_true(v.shape[0] == 1))


def _rowwise_user(user: torch.fx.Node, source: torch.fx.Node, region: set, symbol: sympy.Symbol) -> bool:
    """Whether `user` of the region's value `source` computes each row of its result from the same row alone."""
    out, target = _val(user), user.target
    first = out[0] if isinstance(out, tuple) else out
    if not _rows(first, symbol) or any(isinstance(v, torch.fx.Node) for v in user.kwargs.values()):
        return False
    tensor_args = [a for a in user.args if isinstance(a, torch.fx.Node)]
    others = [a for a in tensor_args if a not in region]
    if target is operator.getitem:
        return True  # an output of a row-by-row op with several (layer norm's)
    if target in _VIEWS or target in _COPIES:
        return user.args[0] is source  # a row-major view keeping a row-multiple leading size keeps rows together
    if target is aten.addmm.default:
        return user.args[1] is source and user.args[0] not in region and user.args[2] not in region
    if target is aten.mm.default:
        return user.args[0] is source and user.args[1] not in region
    if target is aten.native_layer_norm.default:
        return user.args[0] is source and len(user.args[1]) < first.dim() and all(
            a not in region for a in user.args[2:4])
    if target in (aten._softmax.default, aten._log_softmax.default):
        return user.args[0] is source and user.args[1] % first.dim() != 0
    if is_pointwise(target):
        return all(_val(a).dim() == first.dim() and statically_known_true(_val(a).shape[0] == first.shape[0])
                   for a in tensor_args if a in region) and all(_independent_operand(a, first) for a in others)
    return False


def _region(picks: torch.fx.Node | list, symbol: sympy.Symbol,
            is_sink: Callable[[torch.fx.Node, torch.fx.Node], bool]) -> list | None:
    """The sinks (`is_sink(user, source)`: the write-backs) that end the nodes computed row by row from the picked
    rows (of one pick, or of several by the same mask); None if the rows reach anything else (a reduction over them,
    an output, another write-back)."""
    picks = picks if isinstance(picks, list) else [picks]
    region, sinks, sizes, todo = set(picks), [], set(), list(picks)
    waiting: list = []  # (user, source) that join rows of another branch not yet in the region: tried again later
    while todo or waiting:
        if not todo:
            waiting = [(u, src) for u, src in waiting if u not in region]
            ready = [u for u, src in waiting if _rowwise_user(u, src, region, symbol)]
            if waiting and not ready:
                return None
            region.update(ready)
            todo.extend(dict.fromkeys(ready))
            continue
        source = todo.pop()
        for user in source.users:
            if user in region or user in sinks or user in sizes:
                continue
            if user.op != "call_function":
                return None  # the picked rows leave the program
            if user.target is aten._assert_tensor_metadata.default and all(a is None for a in user.args[1:3]):
                continue  # torch.export's check of the rows' dtype: true of every row as of the picked ones
            if is_sink(user, source) and (user.target in _REDUCTIONS or not (
                    isinstance(user.args[0], torch.fx.Node) and user.args[0] in region)):
                sinks.append(user)
            elif not isinstance(_val(user), (torch.Tensor, tuple)):
                if source not in sizes and user.target is not aten.sym_size.int:
                    return None  # a number read out of the rows' values
                sizes.add(user)  # a size of the rows, its arithmetic, range asserts on it
                todo.append(user)
            elif source in sizes:
                continue  # a value shaped by the row count: checked below, once the region is complete
            elif _rowwise_user(user, source, region, symbol):
                region.add(user)
                todo.append(user)
            else:
                waiting.append((user, source))
    # The row count becomes the mask's size: it may only be the size of a view of the rows, never a value.
    if any(user not in sizes and not (user in region and user.target in _VIEWS) for n in sizes for user in n.users):
        return None
    return sinks or None


def _mask_write_back(pick: torch.fx.Node, symbol: sympy.Symbol) -> Callable[[torch.fx.Node, torch.fx.Node], bool]:
    """`z[mask] = rows`: an index_put of the picked rows under the pick's mask."""
    mask = pick.args[1][0]
    return lambda user, source: (
        user.target is aten.index_put.default and user.args[2] is source and len(user.args[1]) == 1
        and user.args[1][0] is mask and not (len(user.args) > 3 and user.args[3])
        and _val(source).shape[0].node.expr == symbol)


_REDUCTIONS = (aten.sum.default, aten.mean.default)


def _picks_into_reductions(pick: torch.fx.Node, symbol: sympy.Symbol) -> tuple[list, list] | None:
    """For `mean(f(x[mask], y[mask], ...))` (or `sum`), every value picked by the same mask and `f` row by row
    (ELECTRA's and Funnel's pretraining heads: the logits and the labels of the tokens the attention mask keeps, into
    a binary cross-entropy): the picks and the reductions over all of their rows."""
    mask = pick.args[1][0]
    picks = [u for u in mask.users if u.target is aten.index.Tensor and u.args[1] == [mask] and _mask_pick(u) == symbol]

    def is_sink(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        return (user.target in _REDUCTIONS and user.args[0] is source and len(user.args) == 1
                and set(user.kwargs) <= {"dtype"} and _val(source).shape[0].node.expr == symbol)

    sinks = _region(picks, symbol, is_sink)
    return None if sinks is None else (picks, sinks)


def _rewrite_reductions(graph: torch.fx.Graph, picks: list, sinks: list) -> None:
    """Each pick becomes every row; each reduction sums the rows the mask keeps (`where(mask, v, 0)`), a mean
    dividing by the mask's count times the elements per row: the same value, and no gradient for the other rows."""
    mask = picks[0].args[1][0]
    mask_shape = list(_val(mask).shape)
    rows = math.prod(mask_shape)
    for pick in picks:
        x = pick.args[0]
        with graph.inserting_before(pick):
            every_row = x if len(mask_shape) == 1 else graph.call_function(
                aten.view.default, (x, [rows, *_val(x).shape[len(mask_shape):]]))
        pick.replace_all_uses_with(every_row)
        graph.erase_node(pick)
    call = graph.call_function
    for sink in sinks:
        y = sink.args[0]
        per_row = math.prod(_val(y).shape[1:])
        with graph.inserting_before(sink):
            keep = call(aten.view.default, (mask, [rows] + [1] * (_val(y).dim() - 1)))
            zero = call(aten.scalar_tensor.default, (0.0,), {"dtype": _val(y).dtype, "device": _val(y).device})
            total = call(aten.sum.default, (call(aten.where.self, (keep, y, zero)),), dict(sink.kwargs))
            if sink.target is aten.mean.default:
                count = call(aten.mul.Scalar, (call(aten.sum.default, (mask,)), per_row))
                total = call(aten.div.Tensor, (total, count))
        sink.replace_all_uses_with(total)
        graph.erase_node(sink)


def _mask_pick(n: torch.fx.Node) -> sympy.Symbol | None:
    """The unbacked symbol of `x[mask]`'s row count, for one boolean mask over x's leading dimensions."""
    if n.op != "call_function" or n.target is not aten.index.Tensor or len(n.args[1]) != 1:
        return None
    x, mask, out = _val(n.args[0]), _val(n.args[1][0]), _val(n)
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and isinstance(out, torch.Tensor)):
        return None
    if tuple(x.shape[:mask.dim()]) != tuple(mask.shape) or not isinstance(out.shape[0], torch.SymInt):
        return None
    symbol = out.shape[0].node.expr
    return symbol if isinstance(symbol, sympy.Symbol) else None


def _size_users(nodes: list) -> list | None:
    """Every node computed from the sizes of `nodes` (sym_size reads, their arithmetic, comparisons and asserts), in
    graph order; None if a tensor or anything but a number depends on them."""
    found, todo = {}, [u for n in nodes for u in n.users if u.target in (aten.sym_size.int, aten.sym_numel.default)]
    while todo:
        n = todo.pop()
        if n in found:
            continue
        if n.op != "call_function" or isinstance(_val(n), torch.Tensor) or (
                n.target is not aten._assert_scalar.default and not isinstance(
                    _val(n), (int, bool, torch.SymInt, torch.SymBool))):
            return None
        found[n] = None
        todo.extend(n.users)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _sample_pick(pick: torch.fx.Node, symbol: sympy.Symbol) -> tuple | None:
    """For `x[mask].view(B, -1, *rest)[:, j]`: (the view, the select, B, j, the nodes that compute only with the
    row count); None for any other use of the picked rows."""
    tensor_users = [u for u in pick.users if u.target not in (aten.sym_size.int, aten.sym_numel.default)]
    if len(tensor_users) != 1 or tensor_users[0].target not in _VIEWS:
        return None
    view = tensor_users[0]
    shape, rows = _val(view).shape, _val(pick).shape
    if view.args[0] is not pick or len(shape) != len(rows) + 1 or not isinstance(shape[0], int) \
            or not isinstance(shape[1], torch.SymInt) \
            or tuple(shape[2:]) != tuple(rows[1:]) or shape[1].node.expr.free_symbols != {symbol}:
        # the same elements as the rows (a view): its size is then the rows over B
        return None
    selects = [u for u in view.users if u.target not in (aten.sym_size.int, aten.sym_numel.default)]
    if len(selects) != 1 or selects[0].target is not aten.select.int or selects[0].args[1] != 1:
        return None
    sizes = _size_users([pick, view])
    return None if sizes is None else (view, selects[0], shape[0], selects[0].args[2], sizes)


def _rewrite_sample_pick(graph: torch.fx.Graph, pick: torch.fx.Node, view: torch.fx.Node, select: torch.fx.Node,
                         groups: int, j: int, sizes: list) -> None:
    x, mask = pick.args[0], pick.args[1][0]
    mask_shape = list(_val(mask).shape)
    positions = math.prod(mask_shape)
    call = graph.call_function
    with graph.inserting_before(select):
        rows = call(aten.view.default, (x, [positions, *_val(x).shape[len(mask_shape):]]))
        counts = call(aten.cumsum.default, (call(aten.view.default, (mask, [positions])), 0))  # int64
        total = call(aten.select.int, (counts, 0, -1))
        per_group = call(aten.div.Scalar_mode, (total, groups), {"rounding_mode": "floor"})
        divides = call(aten.eq.Scalar, (call(aten.remainder.Scalar, (total, groups)), 0))
        deep = call(aten.ge.Scalar, (per_group, j + 1 if j >= 0 else -j))
        call(aten._assert_async.msg, (call(aten.logical_and.default, (divides, deep)),
                                      "the rows picked by a mask do not divide into "
                                      f"{groups} groups with a row {j} each (.view({groups}, -1, ...)[:, {j}])"))
        within = j if j >= 0 else call(aten.add.Scalar, (per_group, j))
        first = call(aten.mul.Tensor, (call(aten.arange.default, (groups,), {
            "dtype": torch.int64, "device": _val(mask).device}), per_group))
        rank = call(aten.add.Tensor, (first, within))  # 0-based among the picked rows
        before = call(aten.lt.Tensor, (call(aten.view.default, (counts, [1, positions])),
                                       call(aten.view.default, (call(aten.add.Scalar, (rank, 1)), [groups, 1]))))
        index = call(aten.sum.dim_IntList, (before, [1]), {"dtype": torch.int64})
        picked = call(aten.index_select.default, (rows, 0, index))
    select.replace_all_uses_with(picked)
    for n in [*reversed(sizes), select, view, pick]:
        graph.erase_node(n)


def _unique_runs(n: torch.fx.Node) -> torch.fx.Node | None:
    """For `len(torch.unique_consecutive(v))` (v 1-d, nothing else of the op used): the node reading the length."""
    if n.op != "call_function" or n.target is not aten.unique_consecutive.default or len(n.args) != 1 or n.kwargs:
        return None
    if _val(n.args[0]).dim() != 1 or _val(n.args[0]).shape[0] == 0:
        return None
    values = [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
    if len(values) != len(n.users) or len(values) != 1:
        return None
    lengths = list(values[0].users)
    if len(lengths) != 1 or not (lengths[0].target is aten.sym_numel.default or (
            lengths[0].target is aten.sym_size.int and lengths[0].args[1] == 0)):
        return None
    return lengths[0]


def _rewrite_unique_runs(graph: torch.fx.Graph, unique: torch.fx.Node, length: torch.fx.Node) -> None:
    v = unique.args[0]
    n = _val(v).shape[0]
    call = graph.call_function
    with graph.inserting_before(length):
        changes = call(aten.ne.Tensor, (call(aten.slice.Tensor, (v, 0, 1, n)),
                                         call(aten.slice.Tensor, (v, 0, 0, n - 1))))
        runs = call(aten.add.Scalar, (call(aten.sum.default, (changes,), {"dtype": torch.int64}), 1))
        read = call(aten._local_scalar_dense.default, (runs,))
    length.replace_all_uses_with(read)
    values = next(iter(unique.users))
    for node in (length, values, unique):
        graph.erase_node(node)


def _rewrite(graph: torch.fx.Graph, pick: torch.fx.Node, sinks: list) -> None:
    x, mask = pick.args[0], pick.args[1][0]
    x_shape, mask_shape = list(_val(x).shape), list(_val(mask).shape)
    rows = math.prod(mask_shape)
    with graph.inserting_before(pick):
        every_row = x if len(mask_shape) == 1 else graph.call_function(
            aten.view.default, (x, [rows, *x_shape[len(mask_shape):]]))
    pick.replace_all_uses_with(every_row)
    graph.erase_node(pick)
    for sink in sinks:
        z, _, y = sink.args[:3]
        z_shape = list(_val(sink).shape)  # z may be an earlier write-back, rewritten already
        with graph.inserting_before(sink):
            keep = graph.call_function(aten.view.default, (mask, mask_shape + [1] * (len(z_shape) - len(mask_shape))))
            y = graph.call_function(aten.view.default, (y, z_shape))
            kept = graph.call_function(aten.where.self, (keep, y, z))
        sink.replace_all_uses_with(kept)
        graph.erase_node(sink)


def _ctc_targets_pick(n: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, list] | None:
    """For `ctc_loss(lp, labels[mask], ...)` (or `labels.masked_select(mask)`) with 2-d labels of one row per
    sample and the mask over all of them: the labels, the mask, the loss's node and the nodes that compute only
    with the pick's size."""
    if n.op != "call_function":
        return None
    if n.target is aten.masked_select.default:
        labels, mask = n.args
    elif n.target is aten.index.Tensor and len(n.args[1]) == 1:
        labels, mask = n.args[0], n.args[1][0]
    else:
        return None
    x, m = _val(labels), _val(mask)
    if not (isinstance(m, torch.Tensor) and m.dtype == torch.bool and x.dim() == 2
            and tuple(m.shape) == tuple(x.shape)):
        return None
    users = [u for u in n.users if u.target not in (aten.sym_size.int, aten.sym_numel.default)]
    if len(users) != 1 or users[0].target is not CTC_LOSS or users[0].args[1] is not n or n in users[0].args[2:]:
        return None
    loss = users[0]
    if _val(loss.args[0]).shape[1] != x.shape[0]:  # (T, N, C) log-probabilities: one row of labels per sample
        return None
    sizes = _size_users([n])
    return None if sizes is None else (labels, mask, loss, sizes)


def _rewrite_ctc_targets(graph: torch.fx.Graph, pick: torch.fx.Node, labels: torch.fx.Node, mask: torch.fx.Node,
                         loss: torch.fx.Node, sizes: list) -> None:
    lengths = loss.args[3]
    call = graph.call_function
    with graph.inserting_before(loss):
        order = call(aten.sort.stable, (call(aten.logical_not.default, (mask,)),), {"stable": True, "dim": 1})
        padded = call(aten.gather.default, (labels, 1, call(operator.getitem, (order, 1))))
        if not (lengths.target is aten.sum.dim_IntList and lengths.args[0] is mask
                and list(lengths.args[1]) in ([1], [-1]) and not lengths.kwargs):
            counts = call(aten.sum.dim_IntList, (mask, [1]))
            same = call(aten.all.default, (call(aten.eq.Tensor, (lengths, counts)),))
            call(aten._assert_async.msg, (same, "the CTC loss's target lengths are not the number of labels its "
                                                "mask picks in each row (ctc_loss(log_probs, labels[mask], ..., "
                                                "target_lengths))"))
    loss.replace_input_with(pick, padded)
    for n in [*reversed(sizes), pick]:
        graph.erase_node(n)


def _split_groups(n: torch.fx.Node) -> tuple[list, list] | None:
    """For `x.split(counts.tolist())` along the rows: the 0-d count tensors and the unbacked symbols of the group
    sizes read out of them."""
    if n.op != "call_function" or n.target is not aten.split_with_sizes.default or (n.args[2:] or [0])[0] != 0:
        return None
    if not isinstance(_val(n.args[0]).shape[0], int):
        return None
    counts, symbols = [], []
    for size in n.args[1]:
        if not (isinstance(size, torch.fx.Node) and size.target is aten._local_scalar_dense.default
                and isinstance(_val(size), torch.SymInt) and isinstance(_val(size).node.expr, sympy.Symbol)):
            return None
        counts.append(size.args[0])
        symbols.append(_val(size).node.expr)
    return counts, symbols


def _concatenated_groups(split: torch.fx.Node, symbols: list) -> tuple[list, torch.fx.Node] | None:
    """The group chunks of `split` and the `cat` along the rows that ends every chunk's row-by-row region, taking
    group i's result at place i; None where the groups go anywhere else."""
    chunks = sorted((u for u in split.users), key=lambda u: u.args[1] if u.target is operator.getitem else -1)
    if [u.args[1] if u.target is operator.getitem else None for u in chunks] != list(range(len(symbols))):
        return None
    cats = set()
    for i, (chunk, symbol) in enumerate(zip(chunks, symbols)):
        def is_sink(user: torch.fx.Node, source: torch.fx.Node, i: int = i) -> bool:
            return (user.target is aten.cat.default and (user.args[1:] or [0])[0] == 0
                    and len(user.args[0]) == len(symbols) and user.args[0][i] is source
                    and user.args[0].count(source) == 1)

        sinks = _region(chunk, symbol, is_sink)
        if sinks is None or len(sinks) != 1:
            return None
        cats.add(sinks[0])
    return (chunks, cats.pop()) if len(cats) == 1 else None


def _rewrite_split(graph: torch.fx.Graph, split: torch.fx.Node, counts: list, chunks: list, cat: torch.fx.Node
                   ) -> None:
    x, sizes_read = split.args[0], list(split.args[1])
    rows = _val(x).shape[0]
    with graph.inserting_before(split):
        sizes = graph.call_function(aten.stack.default, (counts,))
        graph.call_function(aten._assert_async.msg, (
            graph.call_function(aten.eq.Scalar, (graph.call_function(aten.sum.default, (sizes,)), rows)),
            f"the group sizes of a split of {rows} rows do not add up to {rows}"))
        ends = graph.call_function(aten.view.default, (graph.call_function(aten.cumsum.default, (sizes, 0)),
                                                       [1, len(counts)]))
        row = graph.call_function(aten.view.default, (
            graph.call_function(aten.arange.default, (rows,), {"dtype": torch.int64}), [rows, 1]))
        group = graph.call_function(aten.sum.dim_IntList, (graph.call_function(aten.le.Tensor, (ends, row)), [1]))
    for chunk in chunks:
        chunk.replace_all_uses_with(x)
        graph.erase_node(chunk)
    graph.erase_node(split)
    results = cat.args[0]
    out_dims = len(_val(cat).shape)
    with graph.inserting_before(cat):
        kept = results[-1]
        for i in reversed(range(len(results) - 1)):
            keep = graph.call_function(aten.view.default, (graph.call_function(aten.eq.Scalar, (group, i)),
                                                           [rows] + [1] * (out_dims - 1)))
            kept = graph.call_function(aten.where.self, (keep, results[i], kept))
    cat.replace_all_uses_with(kept)
    graph.erase_node(cat)
    _drop_sum_check(graph, sizes_read)


def _drop_sum_check(graph: torch.fx.Graph, sizes: list) -> None:
    """torch.export's check that the group sizes (numbers read out of tensors) add up to the rows, which
    `_rewrite_split` checks on the counts tensor instead: the arithmetic over `sizes`, its comparison and assert go."""
    arithmetic = {operator.add, operator.sub, operator.mul}

    def over_sizes(n: Any) -> bool:
        return not isinstance(n, torch.fx.Node) or n in sizes or (
            n.op == "call_function" and n.target in arithmetic | set(_COMPARISONS) and all(map(over_sizes, n.args)))

    for n in reversed(list(graph.nodes)):
        condition = n.args[0] if n.target is aten._assert_scalar.default else None
        if getattr(condition, "target", None) is operator.eq and over_sizes(condition) and any(
                getattr(a, "target", None) in arithmetic for a in condition.args):
            graph.erase_node(n)
        elif n not in sizes and n.op == "call_function" and n.target in arithmetic | set(_COMPARISONS) \
                and over_sizes(n) and not n.users:
            graph.erase_node(n)


_COMPARISONS = (operator.eq, operator.ne, operator.le, operator.lt, operator.ge, operator.gt)


def _fold_sizes(graph: torch.fx.Graph) -> None:
    """Sizes are static again: each node computing a Python number becomes that number, and each range assert on
    them (now a constant True) goes."""
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        val = _val(n)
        if n.target is aten._assert_scalar.default and _val(n.args[0]) is True:
            graph.erase_node(n)
        elif isinstance(val, (int, bool)):
            for user in list(n.users):
                user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: val if a is n else a)
            graph.erase_node(n)


def _broadcast_write(n: torch.fx.Node) -> tuple[torch.fx.Node, int, list | None] | None:
    """For `index_put(x, [None] * p + [mask], v, accumulate)` with one boolean mask over dims p... of x and a `v`
    of fixed shape that broadcasts over the rows the mask picks: (the mask, p, the shape `v` takes to broadcast
    against x in place of the rows, or None where it does as it is); None for any other node."""
    if n.op != "call_function" or n.target is not aten.index_put.default:
        return None
    x, indices, v = n.args[:3]
    masks = [i for i in indices if i is not None]
    if len(masks) != 1 or not isinstance(masks[0], torch.fx.Node):
        return None
    mask, p = masks[0], next(i for i, index in enumerate(indices) if index is not None)
    xv, mv, vv = _val(x), _val(mask), _val(v)
    if not (isinstance(mv, torch.Tensor) and mv.dtype == torch.bool and isinstance(vv, torch.Tensor)
            and vv.dtype == xv.dtype):
        return None
    if any(not isinstance(d, int) for d in (*xv.shape, *vv.shape)) or tuple(xv.shape[p:p + mv.dim()]) != tuple(
            mv.shape):
        return None  # one value per picked row (their count is data-dependent): `_rewrite` writes those back
    rest = len(xv.shape) - p - mv.dim()
    shape = None
    if vv.dim() > rest:  # v spans the picked rows' dimension: one value for all of them, or it is not this write
        d = vv.dim() - rest - 1
        if d > p or vv.shape[d] != 1:
            return None
        shape = [*vv.shape[:d], *[1] * mv.dim(), *vv.shape[d + 1:]]
    try:
        if tuple(torch.broadcast_shapes(tuple(shape or vv.shape), tuple(xv.shape))) != tuple(xv.shape):
            return None
    except RuntimeError:
        return None
    return mask, p, shape


def _rewrite_broadcast_write(graph: torch.fx.Graph, n: torch.fx.Node, mask: torch.fx.Node, p: int,
                             shape: list | None) -> None:
    x, _, v = n.args[:3]
    accumulate = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
    rest = _val(x).dim() - p - _val(mask).dim()
    fake_mode = torch._guards.detect_fake_mode([_val(x)])

    def call(target: Any, *args: Any) -> torch.fx.Node:
        node = graph.call_function(target, args)
        with fake_mode:
            node.meta["val"] = target(*torch.fx.node.map_arg(args, _val))
        node.meta.update((k, n.meta[k]) for k in ("nn_module_stack", "stack_trace") if k in n.meta)
        return node

    with graph.inserting_before(n):
        keep = call(aten.view.default, mask, [*[1] * p, *_val(mask).shape, *[1] * rest])
        value = v if shape is None else call(aten.view.default, v, shape)
        written = call(aten.where.self, keep, call(aten.add.Tensor, x, value) if accumulate else value, x)
    n.replace_all_uses_with(written)
    graph.erase_node(n)


def rewrite_masked_rows(gm: torch.fx.GraphModule) -> bool:
    """Rewrite every `x[mask] = v` with a `v` that broadcasts over the picked rows, every `out[mask] = f(x[mask])`
    and every `cat([f_i(g) for g in x.split(counts.tolist())])` of `gm` whose `f` is row by row, every
    `x[mask].view(B, -1, ...)[:, j]`, every `len(unique_consecutive(v))` and every CTC loss of `labels[mask]`
    (see the module docstring); whether
    anything changed. A split of rows that an earlier rewrite made static (JetMoE's second expert layer splits the
    first one's concatenation) is found once the shapes are propagated again, so the passes repeat until one finds
    nothing."""
    changed = False
    for n in list(gm.graph.nodes):
        if (write := _broadcast_write(n)) is not None:
            _rewrite_broadcast_write(gm.graph, n, *write)
            changed = True
    if changed:
        gm.recompile()
    while _rewrite_once(gm):
        changed = True
    return changed


def _rewrite_once(gm: torch.fx.GraphModule) -> bool:
    changed = False
    for n in list(gm.graph.nodes):
        symbol = _mask_pick(n)
        sinks = _region(n, symbol, _mask_write_back(n, symbol)) if symbol is not None else None
        if sinks is not None:
            _rewrite(gm.graph, n, sinks)
            changed = True
        elif symbol is not None and (reduced := _picks_into_reductions(n, symbol)):
            _rewrite_reductions(gm.graph, *reduced)
            changed = True
        elif symbol is not None and (sample := _sample_pick(n, symbol)):
            _rewrite_sample_pick(gm.graph, n, *sample)
            changed = True
        elif ctc := _ctc_targets_pick(n):
            _rewrite_ctc_targets(gm.graph, n, *ctc)
            changed = True
        elif length := _unique_runs(n):
            _rewrite_unique_runs(gm.graph, n, length)
            changed = True
        elif (groups := _split_groups(n)) and (found := _concatenated_groups(n, groups[1])):
            _rewrite_split(gm.graph, n, groups[0], *found)
            changed = True
    if not changed:
        return False
    placeholders = [p.meta["val"] for p in gm.graph.nodes if p.op == "placeholder"]
    fake_mode = torch._guards.detect_fake_mode(placeholders)
    gm.recompile()
    FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*placeholders)
    _fold_sizes(gm.graph)
    gm.recompile()
    return True
