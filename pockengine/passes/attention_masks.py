"""Attention masks known at compile time become `is_causal=True`, or go; keys and values repeated per query head are
read as they are.

Hugging Face's decoders (Llama, SmolLM2, GPT-2, Mistral, Qwen2, Gemma) build their causal mask from the sequence
length: torch.export records `arange`s, a comparison and an `expand` to (batch, 1, L, S), and every layer's
`scaled_dot_product_attention` reads that tensor as `attn_mask`. Eager PyTorch, seeing no padding at run time,
calls the kernel with `is_causal=True` instead: the flash kernel then skips the blocks above the diagonal and
reads no mask (on a CPU, one attention of SmolLM2's at 1024 tokens: 242 ms forward and backward instead of 330).
BERT-like encoders without padding pass a mask that keeps every key.

This pass evaluates each attention mask computed from constants alone (the ops and constants of the graph, and
frozen tensors, as the `constants` pass reads them) and compares its value with the two masks that need no tensor:
- every key kept (True, or an additive 0): the mask is dropped;
- query i keeps keys 0..i, top-left aligned as `is_causal=True` is (True/False, or additive 0 and -inf or the
  dtype's lowest value): the attention gets `is_causal=True` and no mask.
The value is compared for every batch and head slice, so a mask with anything else anywhere (a sliding window
shorter than the sequence, Mistral's; a bias) stays. The replacement is exact: both kernels' causal forms mask
the same keys with -inf, and an additive mask's lowest value already gives those keys a probability of exactly 0.

A mask computed from the batch stays, but where it reads one batch input (the padding mask, `attention_mask`) and
is the causal mask (or keeps every key) when that input is all ones, the pass records it
(`graph.unpadded_masks`): eager PyTorch makes that test at run time and then runs the kernel without the mask, and
so does the flash kernel pair the `attention` stage chooses (pockengine/kernels/attention.py: one `all` over the
(batch, sequence) padding mask per step, not over the 4-d mask). The value is computed with the input all ones,
and the run-time test is exactly "all ones", so the choice is exact too.

Hugging Face's grouped-query attention repeats each key and value head for the query heads that share it
(`repeat_kv`: `unsqueeze`, `expand`, a contiguous copy, `view`) unless it can pass no mask; eager PyTorch without
padding passes none and calls the kernel with `enable_gqa=True` on the unrepeated heads. The pass does the same
wherever both are repeated that way: the attention reads the key and value heads with `enable_gqa=True` (query head
h reads head h // repeats, which is what the repeat laid out), so the copies go and the backward pass gets the
heads' gradients directly instead of summing them over the copies.
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import BATCH, Graph, Node, TensorMeta
from pockengine.ir.ops import draws_random
from pockengine.passes.constant_fold import evaluate

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_POSITIONAL = [a for a in SDPA._schema.arguments if not a.kwarg_only]  # query, key, value, attn_mask, ..., is_causal


def simplify_attention_masks(graph: Graph, known: dict[Node, torch.Tensor]) -> Graph:
    """`known`: the program inputs whose values are fixed at compile time (frozen tensors, constants)."""
    values: dict[Node, tuple[torch.Tensor, Node | None] | None] = {}  # every layer reads one mask: evaluated once
    for node in [n for n in graph.nodes if n.target is SDPA]:
        _read_heads_unrepeated(node)
        args = {a.name: a.default_value for a in _POSITIONAL}
        args.update(zip(args, node.args))
        args.update({name: v for name, v in node.kwargs.items() if name in args})
        mask = args["attn_mask"]
        if not isinstance(mask, Node):
            continue
        if mask not in values:
            values[mask] = _value(graph, mask, known)
        if values[mask] is None:
            continue
        value, padding = values[mask]
        form = _form(value, args["query"].meta.shape[-2], args["key"].meta.shape[-2])
        if form is None:
            continue
        if padding is not None:
            graph.unpadded_masks[node] = (padding, form == "causal")
            graph.notes[node] = (f"attn_mask %{mask.name} is the causal mask" if form == "causal" else
                                 f"attn_mask %{mask.name} keeps every key") + (
                f" when %{padding.name} is all ones (no padding)")
            continue
        args["attn_mask"], args["is_causal"] = None, form == "causal"
        node.args = tuple(args.values())
        node.kwargs = {name: v for name, v in node.kwargs.items() if name not in args}
        graph.notes[node] = (f"attn_mask %{mask.name} is the causal mask, known at compile time: is_causal=True, "
                             "no mask read" if form == "causal" else
                             f"attn_mask %{mask.name} keeps every key, known at compile time: no mask read")
    return graph


def _unrepeated(x: Node, heads: int) -> Node | None:
    """The (batch, kv heads, S, E) tensor that `x` (batch, `heads`, S, E) repeats per head as `repeat_kv` does (each
    head `heads / kv heads` times in a row), or None."""
    if x.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) or len(x.meta.shape) != 4:
        return None
    copy = x.args[0]
    if copy.target is aten.clone.default:
        copy = copy.args[0]
    if copy.target is not aten.expand.default or copy.args[0].target is not aten.unsqueeze.default:
        return None
    source, dim = copy.args[0].args
    if not isinstance(source.meta, TensorMeta) or len(source.meta.shape) != 4:
        return None
    b, kv, s, e = source.meta.shape
    repeats = heads // kv if kv else 0
    if (dim != 2 or kv * repeats != heads or copy.meta.shape != (b, kv, repeats, s, e)
            or x.meta.shape != (b, heads, s, e)):
        return None
    return source


def _read_heads_unrepeated(node: Node) -> None:
    """Give attention `node` its key and value heads unrepeated, with enable_gqa=True, where both are repeated per
    query head (Hugging Face's repeat_kv)."""
    names = [a.name for a in SDPA._schema.arguments]
    args = dict(zip(names, node.args)) | node.kwargs
    query, key, value = args["query"], args["key"], args["value"]
    if len(query.meta.shape) != 4 or args.get("enable_gqa", False):
        return
    heads = query.meta.shape[1]
    key_heads, value_heads = _unrepeated(key, heads), _unrepeated(value, heads)
    if key_heads is None or value_heads is None or key_heads.meta.shape[1] != value_heads.meta.shape[1]:
        return
    node.args = (query, key_heads, value_heads, *node.args[3:])
    node.kwargs = {**node.kwargs, "enable_gqa": True}


def _value(graph: Graph, mask: Node, known: dict[Node, torch.Tensor]) -> tuple[torch.Tensor, Node | None] | None:
    """(the value of `mask`, None) if it is computed from `known` inputs alone; (its value when that input is all
    ones, the input) if it also reads one batch input; None otherwise (it reads a trained parameter, several batch
    inputs, draws at random or writes in place)."""
    needed: set[Node] = set()
    read: set[Node] = set()  # the batch inputs it reads
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.is_input and n not in known:
            if n.role != BATCH or not isinstance(n.meta, TensorMeta):
                return None
            read.add(n)
        if n.mutates or draws_random(n.target):
            return None
        needed.add(n)
        stack.extend(n.inputs)
    if len(read) > 1 or any(n.mutates and set(n.inputs) & needed for n in graph.nodes):  # written to later
        return None
    values = {n: known[n] for n in needed if n.is_input and n in known}
    device = next((v.device for v in values.values()), torch.device("cpu"))  # where the model's tensors are
    values.update({n: torch.ones(n.meta.shape, dtype=n.meta.dtype, device=device) for n in read})
    for n in graph.nodes:
        if n in needed and not n.is_input:
            values[n] = evaluate(n, values)
    return values[mask], next(iter(read), None)


def _form(value: torch.Tensor, L: int, S: int) -> str | None:
    """"none" (every key kept), "causal" (query i keeps keys 0..i) or None, for a mask of any batch and head
    dimensions broadcast to the scores (..., L, S)."""
    # Leading dimensions the mask is broadcast over (stride 0: an `expand`) hold one slice: compare it once.
    value = value[tuple(0 if stride == 0 else slice(None) for stride in value.stride()[:-2])]
    while value.dim() < 2:
        value = value.unsqueeze(0)
    value = value.expand(*value.shape[:-2], L, S)
    if value.dtype == torch.bool:
        keep = value
    elif value.is_floating_point():
        keep = value == 0
        if not torch.equal(keep | (value <= torch.finfo(value.dtype).min), torch.ones_like(keep)):
            return None  # some score is shifted, not just kept or removed
    else:
        return None
    if bool(keep.all()):
        return "none"
    causal = torch.ones(L, S, dtype=torch.bool, device=keep.device).tril()
    return "causal" if torch.equal(keep, causal.expand_as(keep)) else None
