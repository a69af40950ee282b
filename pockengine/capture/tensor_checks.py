"""`torch._check_tensor_all(cond, msg)`: a model's check that every element of a boolean tensor is true, kept as a
check that runs with the program.

torch.export records it as `_is_all_true(cond)`, the 0-d result read into Python (`_local_scalar_dense`, a symbolic
bool), `sym_ite(b, 1, 0)` on it, and `_assert_scalar`s of comparisons of that number: the trace assumed the check
passes and asserts so. A number read out of a tensor has no fixed value, and pockengine compiles programs that never
read one into Python, so that form cannot stay. Where every use of the number is such an assertion, the cluster
becomes one `_assert_async(_is_all_true(cond), message)`: the same check on the tensor, as the program runs, with a
message naming the module that checks (the condition's text is not in the exported graph; transformers'
`torch_compilable_check` drops its message while tracing anyway). SigLIP2's position embeddings check their sizes so,
as do the other models using transformers' `torch_compilable_check` on tensors.
"""

from __future__ import annotations

import operator

import torch

from pockengine.capture.locations import described

aten = torch.ops.aten

# The comparisons torch.export writes for the assumption that a bool read as 1 or 0 is 1 (and its range, 0 to 1).
_COMPARISONS = (operator.eq, operator.ne, operator.le, operator.lt, operator.ge, operator.gt)


def _check_cluster(read: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes that compute only assertions from `read`, the number read out of `_is_all_true`'s result, in graph
    order; None if anything else uses the number."""
    found: dict[torch.fx.Node, None] = {}
    todo = list(read.users)
    while todo:
        n = todo.pop()
        if n in found:
            continue
        if n.op != "call_function":
            return None
        if n.target is aten._assert_scalar.default:
            if n.users:
                return None
        elif n.target is torch.sym_ite:
            if n.args[0] is not read or any(isinstance(a, torch.fx.Node) for a in n.args[1:]):
                return None
        elif n.target in _COMPARISONS:
            if any(isinstance(a, torch.fx.Node) and a is not read and a not in found and not (
                    a.target is torch.sym_ite and a.args[0] is read) for a in n.args):
                return None
        else:
            return None
        found[n] = None
        todo.extend(n.users)
    return sorted(found, key=_order(read.graph).__getitem__)


def _order(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def rewrite_tensor_checks(gm: torch.fx.GraphModule) -> bool:
    """Every `torch._check_tensor_all` of `gm` (see the module docstring) as `_assert_async` on the tensor; whether
    anything changed."""
    graph, changed = gm.graph, False
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten._local_scalar_dense.default:
            continue
        checked = n.args[0]
        if not (isinstance(checked, torch.fx.Node) and checked.target is aten._is_all_true.default):
            continue
        cluster = _check_cluster(n)
        if cluster is None or not any(u.target is aten._assert_scalar.default for u in cluster):
            continue
        with graph.inserting_before(n):
            check = graph.call_function(aten._assert_async.msg, (checked, (
                f"torch._check_tensor_all failed {described(checked)}: an element of the checked condition is False "
                "(a check the model makes on each batch: this batch does not pass it)")))
        check.meta.update((k, checked.meta[k]) for k in ("nn_module_stack", "stack_trace") if k in checked.meta)
        for dead in [*reversed(cluster), n]:
            graph.erase_node(dead)
        changed = True
    if changed:
        gm.recompile()
    return changed
