"""The compiler's pipeline: one list of named passes, switched off by name, checked between passes, with errors
that name the pass; the options object; the op facts read from ATen's metadata; and the in-place pass, which must
never write into memory another live value still reads."""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

import pockengine as pe
from pockengine import pipeline
from pockengine.ir import ops
from pockengine.ir.graph import BATCH, Graph, TensorMeta
from pockengine.memory.liveness import Liveness
from pockengine.memory.plan import _META_OVERRIDES
from pockengine.passes import run_in_place
from test_model_parity import MODELS
from test_passes import SPARSE, batch, compiled, mobile_net

aten = torch.ops.aten
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


# ------------------------------------------------------------------------------------------------ the list
def test_the_architecture_table_lists_the_passes_in_pipeline_order():
    text = ARCHITECTURE.read_text()
    table = text[text.index("| pass |"):].split("\n\n")[0].splitlines()[2:]
    rows = [re.match(r"\| `(\w+)`", row) for row in table]
    assert all(rows), table
    assert [m.group(1) for m in rows] == [p.name for p in pipeline.PASSES]


def test_every_optimization_can_be_switched_off_by_name_and_the_others_cannot():
    names = [p.name for p in pipeline.PASSES]
    assert len(set(names)) == len(names)
    assert set(names) - set(pipeline.optional_pass_names()) == {"autodiff", "attention", "gradients", "update"}
    with pytest.raises(pe.UserInputError, match="'matmul'") as err:
        pe.Options(disable={"matmull"})
    assert "matmull" in str(err.value)
    with pytest.raises(pe.UserInputError, match="autodiff"):
        compiled(SPARSE, disable={"autodiff"})
    with pytest.raises(pe.UserInputError, match="set of pass names"):
        pe.Options(disable="matmul")


@pytest.mark.parametrize("name, scheme, gone", [
    ("fold", pe.Scheme.bias_only(), lambda g: any("batch_norm" in n.op_name for n in g.nodes)),
    ("masks", SPARSE, lambda g: not any(n.op_name.startswith("pockengine.pack_keep") for n in g.nodes)),
    ("inplace", SPARSE, lambda g: not any(n.target is aten.hardtanh_.default for n in g.nodes)),
    ("matmul", SPARSE, lambda g: any(n.target is aten.convolution.default and n.args[1].meta.shape[2:] == (1, 1)
                                     for n in g.nodes)),
    ("chunks", pe.Scheme.head(), lambda g: not any(n.target is aten.cat.default for n in g.nodes)),
])
def test_a_switched_off_pass_leaves_its_work_undone(name, scheme, gone):
    assert gone(compiled(scheme, disable={name}, frozen_chunks=4).program().graph)
    assert not gone(compiled(scheme, frozen_chunks=4).program().graph)


def test_the_program_after_a_named_pass():
    trainer = compiled(SPARSE)
    after_autodiff = trainer.program(after="autodiff").graph
    assert after_autodiff.section("backward") and not after_autodiff.section("update")
    assert any(k.startswith("grad:") for k in after_autodiff.outputs)
    after_masks = trainer.program(after="masks").graph
    assert after_masks.section("update") and any(n.op_name.startswith("pockengine.pack_keep")
                                                 for n in after_masks.nodes)
    assert any(n.target is aten.convolution.default and n.args[1].meta.shape[2:] == (1, 1)
               for n in after_masks.nodes)  # matmul runs later
    # the last pass's program is the compiled one
    assert str(trainer.program(gradients=True, after="matmul").graph) == str(trainer.program(gradients=True).graph)
    gradients = trainer.program(gradients=True, after="gradients").graph
    assert list(gradients.outputs) == ["loss"] + [f"grad:{name}" for name in trainer.trained]
    assert not any(n.mutates for n in gradients.nodes)
    with pytest.raises(pe.UserInputError, match="no pass 'mask'"):
        trainer.program(after="mask")


PASSES = pipeline.PASSES


def _failing(name: str, error: Exception):
    def run(graph, ctx):
        raise error
    return tuple(dataclasses.replace(p, run=run) if p.name == name else p for p in PASSES)


def test_an_error_inside_a_pass_names_it_and_those_before_it(monkeypatch):
    monkeypatch.setattr(pipeline, "PASSES", _failing("recompute", KeyError("boom")))
    with pytest.raises(pe.CompilerError) as err:
        compiled(SPARSE)
    before = "clones, fold, attention_masks, cross_entropy, autodiff, attention, update, constants"
    assert f"pass 'recompute' (after {before}) failed: KeyError" in str(err.value)
    # errors that already tell the user what to do keep their type, with the pass as a note
    monkeypatch.setattr(pipeline, "PASSES", _failing("layout", pe.UserInputError("bad input")))
    with pytest.raises(pe.UserInputError) as err:
        compiled(SPARSE)
    assert any("pass 'layout'" in note for note in err.value.__notes__)


def test_the_check_between_passes_finds_a_pass_that_breaks_the_graph(monkeypatch):
    def misorder(graph, ctx):  # moves the last op to the front of the ops: it reads values not defined yet
        body = [n for n in graph.nodes if not n.is_input]
        graph.nodes.remove(body[-2])
        graph.nodes.insert(len(graph.nodes) - len(body) + 1, body[-2])

    monkeypatch.setattr(pipeline, "PASSES", tuple(dataclasses.replace(p, run=misorder) if p.name == "recompute"
                                                  else p for p in PASSES))
    with pytest.raises(pe.CompilerError, match="malformed after pass 'recompute'.*before it is defined"):
        compiled(SPARSE, check=True)


def _graph() -> tuple[Graph, object, object]:
    g = Graph()
    x = g.input("x", BATCH, TensorMeta((4, 4), torch.float32))
    y = g.call(aten.mul.Tensor, (x, x))
    return g, x, y


def test_lint_names_what_is_wrong():
    g, x, y = _graph()
    g.outputs = {"loss": g.call(aten.sum.default, (y,))}
    g.lint()
    late = g.input("late", BATCH, TensorMeta((1,), torch.float32))
    g.nodes.remove(late)
    g.nodes.append(late)
    with pytest.raises(ValueError, match="input %late comes after an op"):
        g.lint()
    g, x, y = _graph()
    g.nodes.append(g.nodes[-1])
    with pytest.raises(ValueError, match="two values are named %mul"):
        g.lint()
    g, x, y = _graph()
    y.meta = None
    with pytest.raises(ValueError, match="no metadata"):
        g.lint()
    g, x, y = _graph()
    g.outputs = {"loss": g.call(aten.sum.default, (y,))}
    g.nodes.remove(y)
    with pytest.raises(ValueError, match=r"reads \[%mul\] before it is defined"):
        g.lint()


# ------------------------------------------------------------------------------------------------ options
def test_options_are_validated_once_with_the_allowed_values():
    with pytest.raises(pe.UserInputError, match="activation_masks must be one of"):
        pe.Options(activation_masks="bytes")
    with pytest.raises(pe.UserInputError, match="frozen_chunks"):
        pe.Options(frozen_chunks=0)
    with pytest.raises(pe.UserInputError, match=r"unknown option\(s\) \['frozen_chunk'\]"):
        compiled(SPARSE, frozen_chunk=2)
    options = pe.Options(freeze_batchnorm=True, frozen_chunks=2, disable={"matmul", "inplace"}, check=True)
    assert pe.Options.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_a_checkpoint_keeps_the_options(tmp_path):
    trainer = compiled(SPARSE, disable={"matmul"}, frozen_chunks=2, seed=3)
    trainer.save(tmp_path / "ckpt")
    assert pe.read_checkpoint(tmp_path / "ckpt").meta["options"] == trainer.options.to_dict()
    resumed = pe.load(tmp_path / "ckpt", mobile_net(), pe.losses.cross_entropy(), batch())
    assert resumed.options == trainer.options


# ------------------------------------------------------------------------------------------------ op facts
def test_op_facts_come_from_atens_schemas_and_tags():
    assert ops.is_view(aten.reshape.default) and ops.is_view(aten.diagonal.default)
    assert ops.is_view(aten.split.Tensor) and ops.is_view(aten._unsafe_view.default)
    assert not ops.is_view(aten.clone.default) and not ops.is_view(aten.add_.Tensor)
    assert ops.is_mutating(aten.add_.Tensor) and not ops.is_mutating(aten.add.Tensor)
    assert ops.is_pointwise(aten.add.Tensor) and ops.is_pointwise(aten.hardswish.default)
    assert not ops.is_pointwise(aten.native_dropout.default) and not ops.is_pointwise(aten.mm.default)
    assert ops.in_place_variant(aten.add.Tensor) is aten.add_.Tensor
    assert ops.in_place_variant(aten.convolution.default) is None
    assert all(ops.in_place_variant(op) is not None for op in ops.RUN_IN_PLACE)


def test_the_in_place_pass_does_not_overwrite_what_a_view_shares():
    """A view op (here one no hand list knew, `diagonal`) shares its input's storage: overwriting it would change
    the input, which is read afterwards."""
    g, x, y = _graph()
    view = g.call(aten.diagonal.default, (y,))
    r = g.call(aten.relu.default, (view,))
    g.outputs = {"loss": g.call(aten.add.Tensor, (g.call(aten.sum.default, (r,)), g.call(aten.sum.default, (y,))))}
    run_in_place(g)
    assert r.target is aten.relu.default
    g, x, y = _graph()  # control: a value of its own that dies there is overwritten
    r = g.call(aten.relu.default, (y,))
    g.outputs = {"loss": g.call(aten.sum.default, (r,))}
    run_in_place(g)
    assert r.target is aten.relu_.default


@pytest.mark.parametrize("read_later", [None, "y", "exp"])
def test_the_in_place_pass_chains_ops_on_one_storage_while_no_value_of_it_is_read_later(read_later):
    """The log-softmax backward's shape: (exp(y) * x) - x. exp runs in y's storage, the product in that same storage
    (exp_'s output is y's storage), the difference too: unless y or exp(y) is read after them."""
    g, x, y = _graph()
    e = g.call(aten.exp.default, (y,))
    m = g.call(aten.mul.Tensor, (e, x))
    d = g.call(aten.sub.Tensor, (m, x))
    loss = g.call(aten.sum.default, (d,))
    later = {"y": y, "exp": e}.get(read_later)
    if later is not None:
        loss = g.call(aten.add.Tensor, (loss, g.call(aten.sum.default, (later,))))
    g.outputs = {"loss": loss}
    run_in_place(g)
    assert e.target is (aten.exp.default if read_later == "y" else aten.exp_.default)
    # the product overwrites exp's output (y's storage, or its own when exp could not run in place) unless that is
    # read later
    assert m.target is (aten.mul.Tensor if read_later == "exp" else aten.mul_.Tensor)
    assert d.target is aten.sub_.Tensor  # whichever storage m holds dies at d
    assert not _shared_writes(g, {n for n in (e, m, d) if n.mutates})


def _meta(a):
    if isinstance(a, torch.device):
        return torch.device("meta")
    return a


def _shared_writes(graph: Graph, written: set) -> list[str]:
    """Run `graph` on meta tensors (storage identity is kept, as for real ones); for each node in `written`,
    the live values (inputs are always live: the caller holds them) sharing storage with the one it overwrites."""
    live = Liveness.of(graph)
    values = {n: torch.empty(n.meta.shape, dtype=n.meta.dtype, device="meta") if isinstance(n.meta, TensorMeta)
              else 1.0 for n in graph.inputs()}
    alive = set(graph.inputs())
    bad = []
    for i, n in enumerate(live.body):
        if n in written:
            x = n.args[0]
            key = values[x].untyped_storage()._cdata
            sharing = [m.name for m in alive if m is not x and any(
                isinstance(t, torch.Tensor) and t.untyped_storage()._cdata == key for t in tree_flatten(values[m])[0])]
            if x.is_input or sharing:
                bad.append(f"%{n.name} = {n.op_name}(%{x.name}) overwrites storage of {sharing or 'an input'}")
        args, kwargs = tree_map(lambda a: values[a] if a in values else _meta(a), (n.args, n.kwargs))
        values[n] = (args[0][args[1]] if n.target is operator.getitem
                     else _META_OVERRIDES.get(n.target, n.target)(*args, **kwargs))
        alive.add(n)
        alive -= set(live.dying.get(i, [])) - set(graph.inputs())
    return bad


CASES = {"mobilenet, sparse": lambda: (mobile_net(), pe.losses.cross_entropy(), batch(), SPARSE)}
CASES.update({name: (lambda name=name: (MODELS[name][0](0.0).train(), MODELS[name][2], MODELS[name][1](),
                                        pe.Scheme.full())) for name in ("cnn", "bert", "gpt2", "llama")})


@pytest.mark.parametrize("case", list(CASES))
def test_the_in_place_pass_never_writes_into_storage_another_live_value_holds(case):
    model, loss_fn, data, scheme = CASES[case]()
    trainer = pe.compile(model, loss_fn, data, optimizer=pe.optim.SGD(lr=0.1, momentum=0.9), scheme=scheme)
    before = {n.name: n.target for n in trainer.program(after="early_update").graph.nodes}
    graph = trainer.program(after="inplace").graph
    written = {n for n in graph.nodes if n.name in before and before[n.name] is not n.target}
    assert written, "the pass found nothing to run in place: the check would be empty"
    assert all(n.target is ops.in_place_variant(before[n.name]) for n in written)
    assert not _shared_writes(graph, written)
