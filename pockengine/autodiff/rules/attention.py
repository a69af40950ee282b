"""Scaled dot-product attention: one op in the captured graph, two kernel pairs to run it.

Capture keeps `aten.scaled_dot_product_attention` whole and traces it with PyTorch's math backend
(pockengine/capture/export.py), so the ops after it read a dense (..., heads, L, E) output. Before the program runs,
each attention is replaced by one of two implementations:

- math: `softmax(q k^T * scale + mask) v` as batched matrix products. Its backward pass keeps the probabilities
  (batch x heads x L x S); on a CPU it is the fastest at short sequences.
- flash: ATen's fused CPU kernels, `_scaled_dot_product_flash_attention_for_cpu` and its backward. The forward keeps
  only the output and each query's log-sum-exp, which the backward reads: memory linear in the sequence length.

On the gradient path the VJP rule (`sdpa`) makes the replacement and emits the matching backward, so the two
always agree; `lower_attention` replaces the attentions off it (frozen layers) by a forward alone.

`choose` decides per shape at compile time: both are timed on random tensors of that shape on the trainer's device
(cached in-process); math runs where it is faster by more than `MARGIN`, flash otherwise, since math keeps more
memory. `attention="math" | "flash"` (`pockengine.compile`) forces one. Flash never runs with dropout (its kernel
draws the mask from the global generator, not from the trainer's seed), where the mask needs a gradient (T5's
position bias), off the CPU, or for shapes its kernel refuses; math runs there. The listing
(`print(trainer.program().graph)`) shows the choice and why on the attention's main op, after the note of the
`attention_masks` pass (pockengine/passes/attention_masks.py) where it turned a causal mask into `is_causal=True`.

Where the mask reads the batch's padding mask and is the causal one (or keeps every key) whenever that is all ones
(`graph.unpadded_masks`, from the `attention_masks` pass), flash runs as pockengine's pair that tests it at run time
(pockengine/kernels/attention.py): all ones (no padding), the kernels run as eager PyTorch runs them then, with
`is_causal=True` and no mask (the blocks above the diagonal skipped); otherwise with the mask. Math reads the mask
either way (its cost is the same). The test is one `all` over the (batch, sequence) padding mask per step.

A boolean mask becomes an additive one holding the dtype's lowest value, not -inf, for both kernels: a query whose
keys are all masked (left padding) then attends to them uniformly, as in Hugging Face's eager attention, instead of
making NaN; a loss that ignores padded positions does not depend on it.
"""

from __future__ import annotations

import math
import operator
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import register
from pockengine.errors import MissingVJPError, UserInputError
from pockengine.ir.graph import BATCH, Graph, Node, TensorMeta, eliminate_dead_code
from pockengine.kernels.attention import FLASH_UNMASKED_IF, FLASH_UNMASKED_IF_BACKWARD

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

KERNELS = ("auto", "math", "flash")
MARGIN = 0.1  # math must be this much faster than flash to run: it keeps the probabilities
# Where math's probabilities would take more than this (a long sequence), it is not even timed: flash runs.
MATH_MAX_BYTES = 2 ** 30
# Each kernel pair is timed after one warm-up run, at least _MIN_RUNS times and until _MIN_SECONDS have passed (at
# most _MAX_RUNS); the fastest run counts: on a shared machine the others measure the neighbours too.
_MIN_RUNS, _MIN_SECONDS, _MAX_RUNS = 3, 0.02, 50

Emit = Callable[..., Node]


@dataclass(frozen=True)
class AttentionSetting:
    kernel: str = "auto"
    device: torch.device = torch.device("cpu")


_setting: ContextVar[AttentionSetting] = ContextVar("pockengine_attention", default=AttentionSetting())


@contextmanager
def attention_setting(kernel: str = "auto", device: torch.device | str = "cpu") -> Iterator[None]:
    """Attentions compiled inside run `kernel` ("auto": the faster per shape), timed on `device`."""
    if kernel not in KERNELS:
        raise UserInputError(f"attention must be one of {KERNELS}, got {kernel!r}")
    token = _setting.set(AttentionSetting(kernel, torch.device(device)))
    try:
        yield
    finally:
        _setting.reset(token)


@dataclass(frozen=True)
class _Call:
    """The arguments of one attention node, with the schema's defaults filled in."""

    q: Node
    k: Node
    v: Node
    mask: Node | None
    dropout_p: float
    causal: bool
    scale: float
    # (padding mask input, is_causal): the mask is the causal one (is_causal) or keeps every key when it is all ones
    unpadded: tuple[Node, bool] | None = None

    @staticmethod
    def of(node: Node, graph: Graph | None = None) -> _Call:
        arguments = node.target._schema.arguments
        values = {a.name: a.default_value for a in arguments}
        values.update({a.name: x for a, x in zip(arguments, node.args)})
        values.update(node.kwargs)
        q, k, v = values["query"], values["key"], values["value"]
        qs, ks, vs = q.meta.shape, k.meta.shape, v.meta.shape
        # One key/value head broadcasts over the query heads (multi-query attention, Falcon); fewer heads than the
        # query's need enable_gqa=True.
        heads_ok = len(qs) < 3 or qs[-3] % ks[-3] == 0 and (ks[-3] in (1, qs[-3]) or values["enable_gqa"])
        if not (len(qs) == len(ks) == len(vs) >= 2 and qs[:-3] == ks[:-3] == vs[:-3] and ks[:-1] == vs[:-1]
                and qs[-1] == ks[-1] and heads_ok):
            raise MissingVJPError(
                f"attention node %{node.name} (module '{node.module}') has query {list(qs)}, key {list(ks)}, value "
                f"{list(vs)}: pockengine runs attention whose key and value share the query's batch dimensions "
                "(and its heads, one head, or a divisor of them with enable_gqa=True); expand them to that shape in "
                "the model")
        scale = values["scale"] if values["scale"] is not None else 1.0 / math.sqrt(qs[-1])
        unpadded = None if graph is None else graph.unpadded_masks.get(node)
        return _Call(q, k, v, values["attn_mask"], float(values["dropout_p"]), bool(values["is_causal"]),
                     float(scale), unpadded if values["attn_mask"] is not None else None)

    @property
    def L(self) -> int:
        return self.q.meta.shape[-2]

    @property
    def S(self) -> int:
        return self.k.meta.shape[-2]

    @property
    def E(self) -> int:
        return self.q.meta.shape[-1]

    @property
    def Ev(self) -> int:
        return self.v.meta.shape[-1]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (grouped-query attention), 1 otherwise."""
        qs, ks = self.q.meta.shape, self.k.meta.shape
        return qs[-3] // ks[-3] if len(qs) >= 3 else 1

    @property
    def scores_shape(self) -> list[int]:
        return [*self.q.meta.shape[:-1], self.S]

    @property
    def out_shape(self) -> list[int]:
        return [*self.q.meta.shape[:-1], self.Ev]

    def probs_bytes(self) -> int:
        return TensorMeta(tuple(self.scores_shape), self.q.meta.dtype).nbytes

    def signature(self) -> tuple:
        """What the cost of the kernels depends on: the timing cache's key."""
        mask = None if self.mask is None else self.mask.meta
        return (self.q.meta, self.k.meta, self.v.meta, mask, self.dropout_p > 0, self.causal)


# ------------------------------------------------------------------------------------------------ emitting
@dataclass
class _Math:
    main: Node  # the scores' matrix product: where the listing notes the choice
    out: Node
    q3: Node  # the scaled query, keys and values as (batch * key heads, rows, E) matrices
    k3: Node
    v3: Node
    probs: Node
    dropped: Node  # the probabilities after dropout (the same node without)
    keep: Node | None  # dropout's mask


@dataclass
class _Flash:
    main: Node
    out: Node
    lse: Node
    mask: Node | None
    unmasked: Node | None  # the run-time test that drops the mask (pockengine's kernel pair), or None (ATen's)


def _additive_mask(graph: Graph, c: _Call) -> Node | None:
    """The mask as a term added to the scores (a boolean mask: True takes part). A boolean mask is converted once,
    right after it is made, for all the attentions that read it (every layer of a model shares one)."""
    mask = c.mask
    if mask is None or mask.meta.dtype != torch.bool:
        return mask
    dtype = c.q.meta.dtype
    for n in graph.nodes:
        if (n.target is aten.masked_fill.Scalar and n.args[1].target is aten.logical_not.default
                and n.args[1].args[0] is mask and n.meta.dtype == dtype):
            return n
    anchor = graph.inputs()[-1] if mask.is_input else mask  # ops start after the last input
    emit = graph.emitter(anchor, anchor.module, anchor.section)
    zeros = emit(aten.new_zeros.default, mask, list(mask.meta.shape), dtype=dtype)
    return emit(aten.masked_fill.Scalar, zeros, emit(aten.logical_not.default, mask), torch.finfo(dtype).min)


def _unpadded_test(graph: Graph, padding: Node) -> Node:
    """A 0-d bool node, true when the batch input `padding` is all ones; one for all the attentions reading it."""
    for n in graph.nodes:
        if (n.target is aten.all.default and n.args[0].target is aten.eq.Scalar and n.args[0].args[0] is padding
                and n.args[0].args[1] == 1):
            return n
    anchor = graph.inputs()[-1]
    emit = graph.emitter(anchor, anchor.module, anchor.section)
    return emit(aten.all.default, emit(aten.eq.Scalar, padding, 1))


def _math_forward(emit: Emit, c: _Call, mask: Node | None) -> _Math:
    # Grouped-query attention without copying keys and values: the G query heads sharing a key head become G * L
    # rows of one matrix product against that head.
    rows = c.groups * c.L
    q3 = emit(aten.reshape.default, emit(aten.mul.Tensor, c.q, c.scale), [-1, rows, c.E])
    k3 = emit(aten.reshape.default, c.k, [-1, c.S, c.E])
    v3 = emit(aten.reshape.default, c.v, [-1, c.S, c.Ev])
    main = emit(aten.bmm.default, q3, emit(aten.permute.default, k3, [0, 2, 1]))
    scores = emit(aten.view.default, main, c.scores_shape)
    if c.causal:  # as PyTorch's: query i sees keys 0..i (aligned top-left)
        above = emit(aten.new_full.default, c.q, [c.L, c.S], float("-inf"))
        scores = emit(aten.add.Tensor, scores, emit(aten.triu.default, above, 1))
    if mask is not None:
        scores = emit(aten.add.Tensor, scores, mask)
    probs = dropped = emit(aten._softmax.default, scores, -1, False)
    keep = None
    if c.dropout_p > 0:  # native_dropout draws from the trainer's generator (pockengine.backend)
        both = emit(aten.native_dropout.default, probs, c.dropout_p, True)
        dropped, keep = emit(operator.getitem, both, 0), emit(operator.getitem, both, 1)
    out = emit(aten.bmm.default, emit(aten.view.default, dropped, [-1, rows, c.S]), v3)
    return _Math(main, emit(aten.view.default, out, c.out_shape), q3, k3, v3, probs, dropped, keep)


def _math_backward(ctx: VJPContext, c: _Call, m: _Math, g: Node) -> tuple[Node | None, ...]:
    rows = c.groups * c.L
    g3 = ctx(aten.reshape.default, g, [-1, rows, c.Ev])
    gq = gk = gv = gmask = None
    if ctx.needs(c.v):
        dropped = ctx(aten.view.default, m.dropped, [-1, rows, c.S])
        gv3 = ctx(aten.bmm.default, ctx(aten.permute.default, dropped, [0, 2, 1]), g3)
        gv = ctx(aten.view.default, gv3, list(c.v.meta.shape))
    if ctx.needs(c.q) or ctx.needs(c.k) or ctx.needs(c.mask):
        gp = ctx(aten.bmm.default, g3, ctx(aten.permute.default, m.v3, [0, 2, 1]))
        gp = ctx(aten.view.default, gp, c.scores_shape)
        if m.keep is not None:
            scale = 0.0 if c.dropout_p == 1 else 1.0 / (1.0 - c.dropout_p)
            gp = ctx(aten.native_dropout_backward.default, gp, m.keep, scale)
        gs = ctx(aten._softmax_backward_data.default, gp, m.probs, -1, c.q.meta.dtype)
        if ctx.needs(c.mask):
            gmask = ctx.sum_to(gs, c.mask.meta.shape)
        gs3 = ctx(aten.view.default, gs, [-1, rows, c.S])
        if ctx.needs(c.q):
            gq3 = ctx(aten.mul.Tensor, ctx(aten.bmm.default, gs3, m.k3), c.scale)
            gq = ctx(aten.view.default, gq3, list(c.q.meta.shape))
        if ctx.needs(c.k):
            gk3 = ctx(aten.bmm.default, ctx(aten.permute.default, gs3, [0, 2, 1]), m.q3)
            gk = ctx(aten.view.default, gk3, list(c.k.meta.shape))
    return gq, gk, gv, gmask


def _flash_forward(emit: Emit, c: _Call, mask: Node | None, unmasked: Node | None) -> _Flash:
    if unmasked is not None:
        main = emit(FLASH_UNMASKED_IF, c.q, c.k, c.v, mask, unmasked, c.unpadded[1], c.scale)
    else:
        main = emit(FLASH, c.q, c.k, c.v, 0.0, c.causal, attn_mask=mask, scale=c.scale)
    out = emit(operator.getitem, main, 0)
    # The kernel lays its output out as (batch, L, heads, E); the graph after it was traced on a dense one.
    dense = emit(aten.clone.default, out, memory_format=torch.contiguous_format)
    return _Flash(main, dense, emit(operator.getitem, main, 1), mask, unmasked)


def _flash_backward(ctx: VJPContext, c: _Call, f: _Flash, g: Node) -> tuple[Node | None, ...]:
    if f.unmasked is not None:
        grads = ctx(FLASH_UNMASKED_IF_BACKWARD, g, c.q, c.k, c.v, f.out, f.lse, f.mask, f.unmasked, c.unpadded[1],
                    c.scale)
    else:
        grads = ctx(FLASH_BACKWARD, g, c.q, c.k, c.v, f.out, f.lse, 0.0, c.causal, attn_mask=f.mask, scale=c.scale)
    return tuple(ctx(operator.getitem, grads, i) if ctx.needs(x) else None
                 for i, x in enumerate((c.q, c.k, c.v))) + (None,)


def _forward(graph: Graph, node: Node, c: _Call, kernel: str, note: str | None) -> _Math | _Flash:
    """Emit `kernel`'s forward right after the attention `node` and make its users read it instead."""
    mask = _additive_mask(graph, c)
    unmasked = _unpadded_test(graph, c.unpadded[0]) if c.unpadded is not None and kernel == "flash" else None
    emit = graph.emitter(node, node.module, node.section)
    fwd = _math_forward(emit, c, mask) if kernel == "math" else _flash_forward(emit, c, mask, unmasked)
    graph.replace_all_uses(node, fwd.out)
    notes = [n for n in (graph.notes.get(node), note) if n is not None]  # the attention's own (its mask's) first
    if notes:
        graph.notes[fwd.main] = "; ".join(notes)
    return fwd


def _differentiate(ctx: VJPContext, g: Node, kernel: str, note: str | None = None) -> tuple[Node | None, ...]:
    c = _Call.of(ctx.node, ctx.graph)
    fwd = _forward(ctx.graph, ctx.node, c, kernel, note)
    return _math_backward(ctx, c, fwd, g) if kernel == "math" else _flash_backward(ctx, c, fwd, g)


# ------------------------------------------------------------------------------------------------ choosing
@dataclass(frozen=True)
class Choice:
    kernel: str  # "math" or "flash"
    note: str  # why, for the listing


def _flash_unsupported(c: _Call, device: torch.device, mask_needs_grad: bool) -> str | None:
    """Why the fused kernels cannot run this attention, or None."""
    if device.type != "cpu":
        return f"its kernels are CPU ones, this runs on {device.type}"
    if c.dropout_p > 0:
        return "it would draw the dropout mask from the global generator, not the trainer's seed"
    if mask_needs_grad:
        return "the mask needs a gradient"
    if len(c.q.meta.shape) != 4:
        return f"it takes 4-d queries, not {len(c.q.meta.shape)}-d"
    if c.E != c.Ev:
        return f"it needs values of the keys' head size ({c.Ev} vs {c.E})"
    if c.mask is not None and len(c.mask.meta.shape) not in (2, 4):
        return f"it takes 2-d or 4-d masks, not {len(c.mask.meta.shape)}-d"
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.1f} MB" if nbytes >= 2 ** 20 else f"{nbytes / 2 ** 10:.1f} KB"


def choose(c: _Call, backward: bool, mask_needs_grad: bool = False) -> Choice:
    """The kernel pair for attention `c` (`backward`: its gradient is needed) under the current setting."""
    setting = _setting.get()
    what = "attention" if backward else "attention (forward only)"
    unsupported = _flash_unsupported(c, setting.device, mask_needs_grad)
    if setting.kernel == "math":
        return Choice("math", f"{what}: math (attention='math')")
    if unsupported is not None:
        return Choice("math", f"{what}: math (flash cannot run: {unsupported})")
    if setting.kernel == "flash":
        return Choice("flash", f"{what}: flash{_unmasking(c)} (attention='flash')")
    # What each keeps for the backward pass beyond the inputs: math the probabilities, flash the output and a
    # log-sum-exp per query.
    keeps = {"math": c.probs_bytes(),
             "flash": TensorMeta(tuple(c.out_shape), c.q.meta.dtype).nbytes + c.probs_bytes() // c.S}
    if keeps["math"] > MATH_MAX_BYTES:
        return Choice("flash", f"{what}: flash (math would hold {_size(keeps['math'])} of probabilities)")
    # Flash is timed as it runs without padding: with no mask where the run-time test drops it.
    unmasked = c if c.unpadded is None else replace(c, mask=None, causal=c.unpadded[1], unpadded=None)
    seconds = {"math": _seconds(c, "math", backward, setting.device),
               "flash": _seconds(unmasked, "flash", backward, setting.device)}
    kernel = "math" if seconds["math"] < (1 - MARGIN) * seconds["flash"] else "flash"
    other = "flash" if kernel == "math" else "math"
    costs = [f"{k} {seconds[k] * 1e3:.2f} ms" + (f", keeps {_size(keeps[k])}" if backward else "")
             for k in (kernel, other)]
    return Choice(kernel, f"{what}: {kernel}{_unmasking(c) if kernel == 'flash' else ''} ({'; '.join(costs)})")


def _unmasking(c: _Call) -> str:
    """What flash does with a mask the batch's padding decides, for the listing."""
    if c.unpadded is None:
        return ""
    padding, causal = c.unpadded
    return (f", {'is_causal=True and ' if causal else ''}no mask when %{padding.name} is all ones (tested each "
            "step), the mask otherwise")


_timings: dict[tuple, float] = {}


def _seconds(c: _Call, kernel: str, backward: bool, device: torch.device) -> float:
    """Fastest of a few runs of `kernel` (forward, and backward if asked) on random tensors of `c`'s shapes."""
    key = (kernel, backward, device, c.signature())
    if key not in _timings:
        from pockengine.backend import CompiledProgram  # the backend is built on top of autodiff

        graph = Graph()
        inputs = {x: graph.input(f"x{i}", BATCH, x.meta) for i, x in enumerate((c.q, c.k, c.v, c.mask))
                  if x is not None}
        node = graph.call(SDPA, (inputs[c.q], inputs[c.k], inputs[c.v], inputs.get(c.mask), c.dropout_p, c.causal),
                          {"scale": c.scale, "enable_gqa": c.groups > 1})
        if backward:
            g = graph.input("g", BATCH, node.meta)
            ctx = VJPContext(graph, node, {x: True for x in (inputs[c.q], inputs[c.k], inputs[c.v])}, {})
            grads = _differentiate(ctx, g, kernel)
            graph.outputs = {f"g{i}": x for i, x in enumerate(grads) if x is not None}
        else:
            graph.outputs = {"out": _forward(graph, node, _Call.of(node), kernel, None).out}
        eliminate_dead_code(graph)
        program = CompiledProgram(graph, graph.inputs(), None, generator=torch.Generator(device))
        values = [_random(n.meta, device) for n in graph.inputs()]
        with torch.no_grad():
            program(*values)
            runs: list[float] = []
            while len(runs) < _MIN_RUNS or sum(runs) < _MIN_SECONDS and len(runs) < _MAX_RUNS:
                start = time.perf_counter()
                program(*values)
                runs.append(time.perf_counter() - start)
        _timings[key] = min(runs)
    return _timings[key]


def _random(meta: TensorMeta, device: torch.device) -> torch.Tensor:
    if meta.dtype == torch.bool:  # a mask: every query keeps some keys
        return torch.rand(meta.shape, device=device) > 0.2
    x = torch.randn(meta.shape, device=device).to(meta.dtype)
    # Attention inputs usually are heads split off a (batch, L, heads * E) projection: (batch, heads, L, E) views.
    return x.transpose(-2, -3).contiguous().transpose(-2, -3) if x.dim() == 4 else x


# ------------------------------------------------------------------------------------------------ the rule
@register(SDPA)
def sdpa(ctx: VJPContext, g: Node) -> tuple[Node | None, ...]:
    c = _Call.of(ctx.node, ctx.graph)
    choice = choose(c, backward=True, mask_needs_grad=ctx.needs(c.mask))
    return _differentiate(ctx, g, choice.kernel, choice.note)


def lower_attention(graph: Graph) -> Graph:
    """Replace each attention left after differentiation (none of its inputs needs a gradient) by the faster
    forward pass, or by math where it has dropout (drawn from the trainer's generator)."""
    for node in [n for n in graph.nodes if n.target is SDPA]:
        c = _Call.of(node, graph)
        choice = choose(c, backward=False)
        _forward(graph, node, c, choice.kernel, choice.note)
    return graph
