"""Memory: the static plan predicts what the live-storage tracker measures; the passes that save memory are exact
(the recompute pass on a tiny Llama too)."""

import copy
import operator

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import pockengine as pe
from model_zoo.parity import autograd_gradients, float64_gradients, gradient_errors
from pockengine.capture import capture
from pockengine.memory.tracker import LiveStorageTracker
from pockengine.passes import fold_frozen_batchnorm, run_in_place
from pockengine.scheme import gradient_masks

aten = torch.ops.aten


def mobile_block_net() -> nn.Module:
    torch.manual_seed(0)

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cin * 4, 1, bias=False), nn.BatchNorm2d(cin * 4), nn.ReLU6(),
                             nn.Conv2d(cin * 4, cin * 4, 3, stride, 1, groups=cin * 4, bias=False),
                             nn.BatchNorm2d(cin * 4), nn.ReLU6(), nn.Conv2d(cin * 4, cout, 1, bias=False),
                             nn.BatchNorm2d(cout))

    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                         block(16, 24, 2), block(24, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, size, size, generator=g),), torch.randint(0, 10, (n,), generator=g)


SCHEMES = {
    "full": pe.Scheme.full(),
    "bias_only": pe.Scheme.bias_only(),
    "sparse": pe.Scheme.from_dict({"rules": [
        {"modules": "*", "mode": "bias"},
        {"modules": "4.0", "mode": "partial", "ratio": "1/4"},
        {"modules": "4.6", "mode": "partial", "ratio": "1/2", "select": "magnitude"},
        {"modules": "7", "mode": "full"}]}),
}


def measured_peak(trainer, model, b) -> tuple[int, int]:
    tracker = LiveStorageTracker()
    tracker.ignore(*model.parameters(), *model.buffers(), *b[0], b[1],
                   *(t for s in trainer.state.values() for t in s.values()))
    with tracker:
        trainer.step(b)
    return tracker.peak_bytes, tracker.live_bytes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_predicted_peak_matches_measured(scheme):
    model = mobile_block_net()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.01, momentum=0.9),
                         scheme=SCHEMES[scheme], freeze_batchnorm=True)
    trainer.step(batch())
    peak, left = measured_peak(trainer, model, batch())
    plan = trainer.memory_plan()
    assert abs(plan.peak_bytes - peak) <= 0.10 * peak, plan.table()
    assert left <= 64  # every intermediate freed: at most the returned 0-d loss survives the step
    assert plan.resident["weights"] == sum(p.numel() * 4 for p in model.parameters())


def test_sparse_schemes_save_memory_and_keep_little_for_backward():
    plans = {}
    for name, scheme in SCHEMES.items():
        trainer = pe.compile(mobile_block_net(), pe.losses.cross_entropy(), batch(),
                             optimizer=pe.optim.SGD(lr=0.01), scheme=scheme, freeze_batchnorm=True)
        plans[name] = trainer.memory_plan()
    assert plans["bias_only"].saved_bytes * 10 < plans["full"].saved_bytes
    assert plans["bias_only"].peak_bytes * 1.5 < plans["full"].peak_bytes
    assert plans["sparse"].peak_bytes < plans["full"].peak_bytes


def test_bias_only_program_is_pruned():
    trainer = pe.compile(mobile_block_net(), pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.bias_only(),
                         freeze_batchnorm=True)
    graph = trainer.program().graph
    ops = {n.target for n in graph.nodes}
    assert aten._native_batch_norm_legit_no_training.default not in ops  # folded into the convolutions
    assert aten.hardtanh_backward.default not in ops  # replaced by a bit mask
    for n in graph.nodes:
        if n.target is aten.convolution_backward.default:
            assert n.args[-1][1] is False  # no weight gradient is ever computed


def test_backprop_stops_at_the_earliest_trained_layer():
    trainer = pe.compile(mobile_block_net(), pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.last(2),
                         freeze_batchnorm=True)
    backward_modules = {n.module for n in trainer.program().graph.section("backward")}
    # last(2) trains 4.7 (a BatchNorm) and 7 (the head); 5 and 6 (pooling, flatten) lie between them.
    assert backward_modules <= {"4.7", "5", "6", "7", ""}, backward_modules


def test_partial_channels_cut_weight_gradient_flops():
    def backward_flops(ratio):
        rules = [{"modules": "4.6", "mode": "partial" if ratio < 1 else "full", "ratio": ratio}]
        trainer = pe.compile(mobile_block_net(), pe.losses.cross_entropy(), batch(),
                             scheme=pe.Scheme.from_dict({"rules": rules}), freeze_batchnorm=True)
        with FlopCounterMode(display=False) as counter:
            trainer.gradients(batch())
        return counter.get_flop_counts()["Global"].get(aten.convolution_backward.default, 0)

    full, quarter = backward_flops(1.0), backward_flops(0.25)
    assert quarter == pytest.approx(full / 4, rel=0.01)


def test_fold_frozen_batchnorm_keeps_the_forward_exact():
    model = mobile_block_net().eval()
    cap = capture(model, pe.losses.cross_entropy(), batch())
    cap.graph.outputs = {"loss": cap.loss}
    before = sum(1 for n in cap.graph.nodes if "batch_norm" in n.op_name)
    fold_frozen_batchnorm(cap.graph, trained=set())
    trainer = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.head())
    after = sum(1 for n in trainer.program().graph.nodes if "batch_norm" in n.op_name)
    assert before == 7 and after == 0
    ref = pe.losses.cross_entropy()(model(batch()[0][0]), batch()[1]).item()
    assert trainer.loss(batch()) == pytest.approx(ref, rel=1e-5)


def test_in_place_only_where_the_input_dies():
    class Net(nn.Module):
        def forward(self, x):
            a = x * 2
            b = torch.relu(a)  # a dies here: in place
            c = x + 1
            d = torch.relu(c)  # c is read again below: not in place
            return b + d + c

    cap = capture(Net(), lambda out, y: (out * y).sum(), ((torch.randn(3),), torch.randn(3)))
    cap.graph.outputs = {"loss": cap.loss}
    run_in_place(cap.graph)
    relus = [n for n in cap.graph.nodes if n.op_name.startswith("relu")]
    assert [n.op_name for n in relus] == ["relu_.default", "relu.default"]
    assert all(n.target is not operator.getitem for n in relus)


def test_recompute_lowers_the_planned_peak_of_a_llama_step_and_keeps_its_gradients():
    """A tiny Llama as Hugging Face builds it (sdpa attention), trained as the SmolLM2 benchmark's sparse scheme
    trains its last blocks (norm scales, a quarter of the input channels of q/k/v, gate and up): with the `recompute`
    pass the backward pass rebuilds the normalized activations and SwiGLU's `silu(gate)` instead of keeping them, so
    the planned peak (the program's high-water mark, after the forward pass) is lower, still at least what the tracker
    measures, and the gradients are autograd's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (4, 48), generator=torch.Generator().manual_seed(0))
    data = ({"input_ids": ids}, ids.clone())
    partial = {"mode": "partial", "ratio": "1/4"}
    scheme = pe.Scheme.from_dict({"rules": [
        {"modules": "model.layers.1.*_layernorm", "mode": "full"},
        {"modules": "model.layers.1.self_attn.[qkv]_proj", **partial},
        {"modules": "model.layers.1.mlp.gate_proj", **partial}, {"modules": "model.layers.1.mlp.up_proj", **partial},
        {"modules": "model.norm", "mode": "full"}]})
    plans, trainers = {}, {}
    for disable in (frozenset(), frozenset({"recompute"})):
        trainer = pe.compile(copy.deepcopy(model), pe.losses.causal_lm(), data, optimizer=pe.optim.SGD(lr=0.0),
                             scheme=scheme, disable=disable)
        plans[disable], trainers[disable] = trainer.memory_plan(), trainer
        trainer.step(data)
        tracker = LiveStorageTracker()
        tracker.ignore(*trainer.model.parameters(), ids, data[1],
                       *(t for s in trainer.state.values() for t in s.values()))
        with tracker:
            trainer.step(data)
        assert 0 < tracker.peak_bytes <= plans[disable].peak_bytes, plans[disable].table()
    on, off = plans[frozenset()], plans[frozenset({"recompute"})]
    hidden = ids.numel() * config.hidden_size * 4
    # at least the two normalized activations of the trained block and the final norm's are no longer kept
    assert on.saved_bytes <= off.saved_bytes - 3 * hidden, (on.table(), off.table())
    assert on.peak_bytes < off.peak_bytes, (on.table(), off.table())

    trainer = trainers[frozenset()]
    listing = str(trainer.program().graph)
    notes = [line for line in listing.splitlines() if "recomputed: %" in line]
    assert any("silu.default(" in line and "mlp.act_fn" in line for line in notes), "\n".join(notes)
    assert any("post_attention_layernorm" in line for line in notes), "\n".join(notes)
    assert "recomputed: %" not in str(trainers[frozenset({"recompute"})].program().graph)

    ref_model, loss_fn = copy.deepcopy(model), pe.losses.causal_lm()
    _, ref = autograd_gradients(ref_model, loss_fn, data)
    bad = gradient_errors(trainer.gradients(data), ref, lambda: float64_gradients(ref_model, loss_fn, data),
                          gradient_masks(model, trainer.trained))
    assert not bad, "\n".join(bad)
