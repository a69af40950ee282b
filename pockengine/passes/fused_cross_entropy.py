"""A language model's head and its cross-entropy loss become one op that never holds the whole logits.

At 1024 tokens and SmolLM2's 49152-token vocabulary the logits are 200 MB in fp32, and the unfused program holds
them, their log-probabilities and the log-probabilities' gradient: the largest tensors of the step. This pass
finds the head and the loss as torch.export captures `F.cross_entropy` (`pe.losses.cross_entropy`,
`pe.losses.causal_lm`, Hugging Face's `ForCausalLMLoss`; mean or sum over the rows not ignored):

    logits = mm(hidden, permute(weight)) | addmm(bias, hidden, permute(weight))
    -> views and slices of the rows (`[:, :-1]`, `reshape(-1, vocabulary)`) -> _log_softmax(dim=-1)
    -> gather(target with ignore_index rows sent to 0) -> squeeze -> neg -> where(target != ignore_index, ., 0)
    -> sum [-> div by the number of rows not ignored]

and replaces it by `pockengine::linear_cross_entropy` (pockengine/kernels/cross_entropy.py) on the same rows of
the hidden state (the views and slices replayed on it): the logits are computed CHUNK_TOKENS rows at a time (more
where the vocabulary is small: up to CHUNK_BYTES of logits), and the loss's gradients with respect to the hidden
state and, when they are trained, the weight and bias are computed there too, from each chunk's logits: the
backward pass only scales them (the op's VJP rule). The op allocates one float32 chunk of logits (256 x 49152
floats: 48 MB) besides a (tokens x hidden) gradient. Anything else reading the logits, the log-probabilities or
the per-token losses (label smoothing reads the whole log-probabilities, `reduction="none"` returns the per-token
losses, class weights multiply them) leaves the program as it is.
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph, Node
from pockengine.kernels import LINEAR_CROSS_ENTROPY

aten = torch.ops.aten
# Matrix multiplies of at least 256 rows run as fast as the whole one on a CPU (fewer rows lose speed); a small
# vocabulary takes more rows per chunk, up to this many bytes of logits.
CHUNK_TOKENS = 256
CHUNK_BYTES = 16 * 2 ** 20
# Ops between the head's matrix multiply and the log-softmax that only select or rearrange rows: replayed on the
# hidden state, with its width in place of the vocabulary.
_ROW_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_ROW_OPS = _ROW_VIEWS | {aten.slice.Tensor, aten.clone.default, aten.alias.default}


def fuse_linear_cross_entropy(graph: Graph, trained: set[Node]) -> Graph:
    """`trained`: the trained parameters' nodes (the op computes the gradients that flow back to them)."""
    needs_grad = set(trained)
    for n in graph.nodes:
        if not n.is_input and any(i in needs_grad for i in n.inputs):
            needs_grad.add(n)
    users = graph.users()
    for log_softmax in [n for n in graph.nodes if n.target is aten._log_softmax.default]:
        found = _match(log_softmax, users)
        if found is None:
            continue
        head, rows, target, ignore_index, mean, loss = found
        bias, hidden, weight = (None, *head.args) if head.target is aten.mm.default else head.args
        weight = weight.args[0]
        grad_hidden, grad_weight = hidden in needs_grad, weight in needs_grad or bias in needs_grad
        vocabulary, width = weight.meta.shape
        emit = graph.emitter(graph.nodes[graph.nodes.index(loss) - 1], head.module, loss.section)
        for op in rows:  # the same rows of the hidden state
            args = list(op.args)
            if op.target in _ROW_VIEWS:
                args[1] = [*args[1][:-1], width]
            hidden = emit(op.target, hidden, *args[1:], **op.kwargs)
        chunk = min(hidden.meta.shape[0], max(CHUNK_TOKENS, CHUNK_BYTES // (vocabulary * 4)))
        fused = emit(LINEAR_CROSS_ENTROPY, hidden, weight, bias, target, ignore_index, mean, chunk,
                     grad_hidden, grad_weight)
        graph.replace_all_uses(loss, graph.getitem(fused, 0))
        graph.notes[fused] = (f"lm head and cross-entropy fused, {chunk} tokens at a time: no "
                              f"{hidden.meta.shape[0]} x {vocabulary} logits")
    return graph


def _match(log_softmax: Node, users: dict[Node, list[Node]]
           ) -> tuple[Node, list[Node], Node, int, bool, Node] | None:
    """(head matmul, row ops after it in order, target, ignore_index, mean, the loss node) of the cross-entropy
    whose log-softmax this is, or None when it is not that pattern or anything else reads its intermediates."""
    x, dim, half_to_float = log_softmax.args
    if len(x.meta.shape) != 2 or dim not in (1, -1) or half_to_float:
        return None
    rows: list[Node] = []
    while x.target in _ROW_OPS and len(users[x]) == 1:
        if x.meta.shape[-1] != x.args[0].meta.shape[-1] or x.kwargs.get("memory_format") not in (
                None, torch.contiguous_format) or (x.target is aten.slice.Tensor and x.args[1] % len(x.meta.shape)
                                                   == len(x.meta.shape) - 1):
            return None  # the vocabulary dimension is not kept whole and last
        rows.insert(0, x)
        x = x.args[0]
    if not _is_head(x) or len(users[x]) != 1:
        return None
    gather = _only_user(log_softmax, users, aten.gather.default)
    if gather is None or gather.args[1] not in (1, -1) or gather.kwargs.get("sparse_grad") or len(gather.args) > 3:
        return None
    index = gather.args[2]
    picked = index.args[0] if index.target is aten.unsqueeze.default and index.args[1] in (1, -1) else None
    if picked is None or picked.target is not aten.where.self or not _is_kept(picked.args[0]):
        return None
    target, ignore_index = picked.args[0].args
    if picked.args[1] is not target or target.meta.shape != log_softmax.meta.shape[:1]:
        return None
    squeeze = _only_user(gather, users, aten.squeeze.dims, aten.squeeze.dim)
    if squeeze is not None and squeeze.args[1] not in (1, -1, [1], [-1]):
        return None
    neg = squeeze and _only_user(squeeze, users, aten.neg.default)
    masked = neg and _only_user(neg, users, aten.where.self)
    if not masked or masked.args[1] is not neg or not _is_kept(masked.args[0], target, ignore_index) or not _is_zero(
            masked.args[2]):
        return None
    total = _only_user(masked, users, aten.sum.dim_IntList, aten.sum.default)
    if total is None or total.target is aten.sum.dim_IntList and (list(total.args[1]) not in ([], [0])
                                                                  or total.args[2:] not in ((), (False,))):
        return None
    mean = _only_user(total, users, aten.div.Tensor)
    if mean is not None and mean.args[0] is total and _is_count(mean.args[1], target, ignore_index):
        return x, rows, target, ignore_index, True, mean
    return x, rows, target, ignore_index, False, total


def _is_head(n: Node) -> bool:
    """mm(hidden, weight.T) or addmm(bias, hidden, weight.T) with alpha = beta = 1; weight a [V, D] value."""
    if n.target is aten.mm.default:
        weight_t = n.args[1]
    elif n.target is aten.addmm.default and not n.kwargs and len(n.args) == 3 and len(n.args[0].meta.shape) == 1:
        weight_t = n.args[2]
    else:
        return False
    return weight_t.target is aten.permute.default and list(weight_t.args[1]) == [1, 0]


def _only_user(n: Node, users: dict[Node, list[Node]], *targets) -> Node | None:
    found = users[n]
    return found[0] if len(found) == 1 and found[0].target in targets else None


def _is_kept(n: Node, target: Node | None = None, ignore_index: int | None = None) -> bool:
    """`target != ignore_index` (of the given target and index, when given)."""
    return (isinstance(n, Node) and n.target is aten.ne.Scalar and isinstance(n.args[1], int)
            and (target is None or n.args[0] is target and n.args[1] == ignore_index))


def _is_zero(n: object) -> bool:
    return n == 0 if isinstance(n, (int, float)) else (
        isinstance(n, Node) and n.target is aten.scalar_tensor.default and n.args[0] == 0)


def _is_count(n: Node, target: Node, ignore_index: int) -> bool:
    """The number of rows not ignored, as a float: _to_copy(sum(target != ignore_index))."""
    if not isinstance(n, Node) or n.target is not aten._to_copy.default:
        return False
    total = n.args[0]
    return (total.target in (aten.sum.dim_IntList, aten.sum.default) and _is_kept(total.args[0], target, ignore_index)
            and (total.target is aten.sum.default or list(total.args[1]) in ([], [0])))
