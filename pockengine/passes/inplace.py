"""Run element-wise ops in place when their input dies there.

`y = relu(x)` allocates a second tensor the size of x while x is still alive; when nothing reads x afterwards and
x shares its storage with no other value, `relu_(x)` gives the same result in x's memory. This halves the
transient peak of activation layers in the forward pass and of gradient masking in the backward pass. Ops run in
place one after another on the same storage (`exp_(a)`, then `mul_` on its result) while no value of that storage
is read later: the log-softmax backward of a language model's loss needs no buffer beyond the log-probabilities and
the incoming gradient.
"""

from __future__ import annotations

import operator

from pockengine.ir.graph import Graph, Node, TensorMeta
from pockengine.ir.ops import COMMUTATIVE, RUN_IN_PLACE, in_place_variant, is_view


def _owns_storage(x: Node) -> bool:
    """`x` is a value of its own: no input, no view of another value (views share their input's storage)."""
    if x.target is operator.getitem:  # an output of a multi-output op: fresh unless the op splits a tensor
        return not is_view(x.args[0].target) and not x.args[0].mutates
    if x.is_input or is_view(x.target) or x.mutates:
        return False
    return x.meta is not None and not isinstance(x.meta, tuple)


def _may_lay_out(operand: object, out: Node) -> bool:
    """Whether the first operand of a commutative op can decide the layout of its out-of-place result: PyTorch
    orders the result's dimensions by the first operand whose strides tell two dimensions apart, and a broadcast
    dimension (stride 0) tells none. When it can, running the op in place in the second operand's storage would
    give the result the second operand's layout instead, and a `view` after it may no longer apply (a permuted
    operand first: `add(permuted, contiguous)` is permuted, `add_(contiguous, permuted)` contiguous)."""
    if not isinstance(operand, Node) or not isinstance(operand.meta, TensorMeta):
        return False
    shape, out_shape = operand.meta.shape, out.meta.shape
    own = [s for s, o in zip(shape[::-1], out_shape[::-1]) if s == o and o > 1]  # the dims it does not broadcast
    return len(own) > 1


def run_in_place(graph: Graph) -> Graph:
    users = graph.users()
    position = {n: i for i, n in enumerate(graph.nodes)}
    outputs = set(graph.outputs.values())
    written: dict[Node, Node] = {}  # an op this pass made in place -> the value whose storage it wrote
    for n in list(graph.nodes):
        if n.target not in RUN_IN_PLACE or n.kwargs.get("alpha", 1) != 1:
            continue
        candidates = [0, 1] if n.target in COMMUTATIVE and not _may_lay_out(n.args[0], n) else [0]
        for i in candidates:
            x = n.args[i] if i < len(n.args) else None
            if not isinstance(x, Node) or x.meta != n.meta:
                continue
            # x may itself be an op run in place (exp_(a) * s): then its storage is a's, and a chain of such ops
            # (a, exp_(a), ...) names one storage, which n may overwrite when no value of the chain is read later.
            chain = [x]
            while chain[-1] in written:
                chain.append(written[chain[-1]])
            if not _owns_storage(chain[-1]) or any(c in outputs for c in chain):
                continue
            others = [u for c in chain for u in users[c] if u is not n and u not in chain]
            if any(is_view(u.target) or position[u] > position[n] for u in others):
                continue  # the storage is read later, or viewed: overwriting it would change those values
            args = list(n.args)
            if i == 1:
                args[0], args[1] = args[1], args[0]
            n.target, n.args = in_place_variant(n.target), tuple(args)
            written[n] = x
            break
    return graph
