"""The torch backend's generated code: the fast Python bindings it calls dispatch exactly the ATen ops of the
program, with the same results."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pockengine as pe
from pockengine.backend import CompiledProgram
from pockengine.ir.ops import FAST_CALLS
from test_model_parity import MODELS
from test_passes import SPARSE, batch, mobile_net


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _run(program: CompiledProgram, args: list) -> tuple[list, tuple]:
    with torch.no_grad(), _Recorder() as recorder:
        out = program(*args)
    return recorder.ops, out


def test_fast_calls_dispatch_the_same_ops_with_the_same_results():
    cases = {name: (MODELS[name][0](0.0), MODELS[name][2], MODELS[name][1](), pe.Scheme.full())
             for name in ("cnn", "bert", "llama", "resnet")}
    cases["mobilenet, sparse"] = (mobile_net(), pe.losses.cross_entropy(), batch(), SPARSE)
    called, permuted = set(), 0
    for name, (model, loss_fn, data, scheme) in cases.items():
        trainer = pe.compile(model, loss_fn, data, scheme=scheme, freeze_batchnorm=True)
        built, leaves = trainer._prepared(data, updates=False)
        args = [bind(leaves, {}) for bind in built.binders]
        fast = built.program
        slow = CompiledProgram(fast.graph, fast.inputs, check_finite=None, fast_calls=False)
        # (the cnn's head is fused with its loss by the cross_entropy pass, so it has no transposed weight left)
        assert "aten.permute.default(" not in fast.source, name
        permuted += "aten.permute.default(" in slow.source
        fast_ops, fast_out = _run(fast, args)
        slow_ops, slow_out = _run(slow, args)
        assert fast_ops == slow_ops, name
        assert len(fast_out) == len(slow_out) and all(torch.equal(a, b) for a, b in zip(fast_out, slow_out)), name
        called |= {n.target for n in fast.graph.nodes if n.target in FAST_CALLS and not n.kwargs}
    assert called == set(FAST_CALLS)  # every binding in the table was checked
    assert permuted >= 3
