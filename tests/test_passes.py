"""The graph passes that make sparse steps small and fast change nothing that a step computes.

Each is compared with the program compiled without it (or with autograd), on a MobileNetV2-style network: bit and
byte activation masks, micro-batches of the frozen prefix, constants folded at compile time, weight-derived values
recomputed in the backward pass.
"""

import copy

import pytest
import torch
import torch.nn as nn

import pockengine as pe
from pockengine.ir.graph import BATCH, CONST, PARAM
from pockengine.kernels import APPLY_KEEP_, BATCH_NORM, BATCH_NORM_BACKWARD, PACK_KEEP
from pockengine.memory.tracker import LiveStorageTracker
from pockengine.passes import frozen_region

aten = torch.ops.aten


def mobile_net(size_multiplier: int = 1) -> nn.Module:
    torch.manual_seed(0)

    def block(cin, cout, stride):
        hidden = cin * 4
        return nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                             nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                             nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, cout, 1, bias=False),
                             nn.BatchNorm2d(cout))

    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          block(16, 24, 2), block(24, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    # statistics that are not the identity, so that folding them is visible
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def batch(n=8, size=31, seed=0):  # 31: activations whose sizes are not multiples of 8
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g),), torch.randint(0, 10, (n,), generator=g)


SPARSE = pe.Scheme.from_dict({"rules": [{"modules": "4", "mode": "bias"},
                                        {"modules": "4.6", "mode": "partial", "ratio": "1/2"},
                                        {"modules": "7", "mode": "full"}]})


def compiled(scheme, **options) -> pe.Trainer:
    return pe.compile(mobile_net(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.05),
                      scheme=scheme, freeze_batchnorm=True, **options)


def assert_same_training(a: pe.Trainer, b: pe.Trainer, exact: bool) -> None:
    ga, gb = a.gradients(batch()), b.gradients(batch())
    assert ga.keys() == gb.keys()
    for name in ga:
        if exact:
            assert torch.equal(ga[name], gb[name]), name
        else:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)
    for seed in range(3):
        la, lb = a.step(batch(seed=seed)), b.step(batch(seed=seed))
        assert la == pytest.approx(lb, rel=1e-5)


def test_activation_masks_give_the_gradients_of_the_activations():
    masked, plain = compiled(pe.Scheme.bias_only()), compiled(pe.Scheme.bias_only(), activation_masks="off")
    ops = {n.target for n in masked.program().graph.nodes}
    assert aten.hardtanh_backward.default not in ops and aten.threshold_backward.default not in ops
    assert PACK_KEEP in ops and APPLY_KEEP_ in ops
    assert_same_training(masked, plain, exact=True)
    assert masked.memory_plan().saved_bytes * 20 < plain.memory_plan().saved_bytes


def test_frozen_prefix_runs_in_micro_batches_with_the_same_results():
    chunked, whole = compiled(pe.Scheme.head(), frozen_chunks=4), compiled(pe.Scheme.head(), frozen_chunks=1)
    convs = [n for n in chunked.program().graph.nodes if n.module != "7" and n.section == "forward"
             and n.target in (aten.convolution.default, aten.addmm.default, aten.mm.default)]
    assert len(convs) == 4 * 7  # every frozen convolution (1x1: a matrix multiply), once per micro-batch
    assert any(n.target is aten.cat.default for n in chunked.program().graph.nodes)
    assert chunked.memory_plan().peak_bytes * 2 < whole.memory_plan().peak_bytes
    assert_same_training(chunked, whole, exact=False)


def test_auto_micro_batches_lower_the_measured_peak():
    model = mobile_net()
    auto = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.05), scheme=SPARSE,
                      freeze_batchnorm=True)
    whole = compiled(SPARSE, frozen_chunks=1)
    assert auto.memory_plan().peak_bytes < 0.7 * whole.memory_plan().peak_bytes
    data = batch()
    auto.step(data)
    tracker = LiveStorageTracker()
    tracker.ignore(*model.parameters(), *model.buffers(), *data[0], data[1],
                   *(t for s in auto.state.values() for t in s.values()))
    with tracker:
        auto.step(data)
    assert abs(auto.memory_plan().peak_bytes - tracker.peak_bytes) <= 0.10 * tracker.peak_bytes
    assert_same_training(compiled(SPARSE), whole, exact=False)


def test_frozen_region_stops_where_samples_mix():
    """Train-mode BatchNorm normalizes over the batch: it and everything after it run at full batch."""
    model = mobile_net().train()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.head(), frozen_chunks=1)
    graph = trainer.program().graph
    region, boundary, size = frozen_region(graph, {n for n in graph.inputs(PARAM) if n.module == "7"})
    assert size == 8
    assert region and all(n.target is not BATCH_NORM for n in region)
    first_bn = next(n for n in graph.nodes if n.target is BATCH_NORM)  # channels-last: pockengine's precise one
    assert first_bn.args[0] in boundary  # the first convolution's output leaves the region there
    eager = copy.deepcopy(model)
    chunked = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.head(), frozen_chunks=4)
    ref = pe.losses.cross_entropy()(eager(batch()[0][0]), batch()[1]).item()
    assert chunked.loss(batch()) == pytest.approx(ref, rel=1e-5)


def test_small_frozen_values_are_folded_at_compile_time():
    trainer = compiled(pe.Scheme.bias_only())
    graph = trainer.program().graph
    assert not any(n.target is aten.rsqrt.default for n in graph.nodes)  # BatchNorm scales are constants
    folded = [n for n in graph.inputs(CONST) if n.name.endswith("_folded")]
    assert folded and all(n.meta.nbytes <= 1 << 16 for n in folded)
    # the frozen convolution weights themselves are still read from the model at every step
    assert {n.module for n in graph.inputs(PARAM)} >= {"0", "3.0"}


def test_train_mode_statistics_are_never_folded():
    model = mobile_net().train()
    # lr 0: the weights stay as they are, so eager forward passes see what the steps saw
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.0),
                         scheme=pe.Scheme.bias_only())
    eager = copy.deepcopy(model)
    for seed in range(2):
        trainer.step(batch(seed=seed))
        eager(batch(seed=seed)[0][0])  # updates the running statistics as the step did
    torch.testing.assert_close(dict(model.named_buffers()), dict(eager.named_buffers()), rtol=1e-5, atol=1e-6)


def test_backward_keeps_no_weight_sized_value_from_the_forward_pass():
    """Folded convolution weights are recomputed where the backward pass needs them, not saved."""
    graph = compiled(SPARSE).program().graph
    batch_inputs = set(graph.inputs(BATCH))
    depends = set(batch_inputs)
    for n in graph.nodes:
        if not n.is_input and any(i in depends for i in n.inputs):
            depends.add(n)
    saved = {i for n in graph.section("backward") for i in n.inputs
             if not i.is_input and i.section == "forward"}
    assert saved and saved <= depends, sorted(i.name for i in saved - depends)


def test_eval_dropout_copies_are_dropped():
    """Attention probabilities through an eval-mode dropout (a clone in the captured graph) are saved once."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(6))
            self.drop = nn.Dropout(0.1)

        def forward(self, q, v):
            probs = torch.softmax(q @ q.transpose(-1, -2) + self.bias, -1)
            return self.drop(probs) @ v

    torch.manual_seed(0)
    model = Attention().eval()
    data = ((torch.randn(4, 6, 6), torch.randn(4, 6, 6)), torch.randn(4, 6, 6))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    trainer = pe.compile(model, loss_fn, data)
    graph = trainer.program().graph
    assert not [n for n in graph.nodes if n.target is aten.clone.default and not n.kwargs]
    probs = 4 * 6 * 6 * 4
    assert trainer.memory_plan().saved_bytes <= probs + 64  # the probabilities, once (plus the 0-d loss)
    (ref,) = torch.autograd.grad(loss_fn(model(*data[0]), data[1]), [model.bias])
    torch.testing.assert_close(trainer.gradients(data)["bias"], ref, rtol=1e-5, atol=1e-6)


class Residual(nn.Module):
    """A ResNet basic block with a downsampling branch: torch.export orders the branch after the main path."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.conv1, self.conv2 = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv2(torch.relu(self.conv1(x))) + self.down(x)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("chunks", [2, "auto"])
def test_micro_batches_end_before_a_trained_branch_reads_the_region(chunks):
    """conv1 trains and reads the stem's output; the frozen `down` branch, placed after it, must not drag the
    micro-batches past that read."""
    torch.manual_seed(0)
    model = Residual()
    scheme = pe.Scheme.from_dict({"rules": [{"modules": "conv1", "mode": "full"}, {"modules": "head", "mode": "full"}]})
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.05), scheme=scheme,
                         frozen_chunks=chunks)
    whole = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.05),
                       scheme=scheme, frozen_chunks=1)
    trainer.memory_plan()
    assert_same_training(trainer, whole, exact=False)


def test_a_copy_of_a_view_is_kept_for_the_views_after_it():
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x[..., :3].clone().view(-1, 3) * self.w

    torch.manual_seed(0)
    model = Narrow()
    data = ((torch.randn(2, 4, 5),), torch.randn(8, 3))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(loss_fn(model(*data[0]), data[1]), [model.w])
    torch.testing.assert_close(pe.compile(model, loss_fn, data).gradients(data)["w"], ref, rtol=1e-5, atol=1e-6)


def test_a_sum_keeps_its_first_operands_layout_when_run_in_place():
    """`w + q` with q permuted is laid out like w (contiguous), so export records a view after it; run in place in
    q's storage it would be permuted and the view would fail (Mamba2's gated norm under the partial scheme)."""
    class PermutedSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 8, 4, 3))

        def forward(self, x):
            return (self.w + torch.sin(x.permute(0, 3, 1, 2))).view(2, -1)

    torch.manual_seed(0)
    model = PermutedSecond()
    data = ((torch.randn(2, 4, 3, 8),), torch.randn(2, 96))
    loss_fn = lambda out, target: (out * target).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(loss_fn(model(*data[0]), data[1]), [model.w])
    torch.testing.assert_close(pe.compile(model, loss_fn, data).gradients(data)["w"], ref, rtol=1e-5, atol=1e-6)


def test_parameters_are_updated_as_soon_as_the_backward_pass_is_done_with_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    data = ((torch.randn(5, 6),), torch.randint(0, 4, (5,)))
    trainer = pe.compile(model, pe.losses.cross_entropy(), data, optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    graph = trainer.program().graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    loss = graph.outputs["loss"]
    updates = [n for n in graph.nodes if n.section == "update"]
    assert min(order[u] for u in updates) > order[loss]  # after the NaN/inf check: a failed step changes nothing
    head_update = max(order[u] for u in updates if u.module == "4")
    first_layer_backward = max(order[n] for n in graph.section("backward") if n.module == "0")
    assert head_update < first_layer_backward  # the head is updated before the backward pass reaches layer 0
    # ... yet every weight is updated only after the backward pass has read its old value
    for u in updates:
        if u.mutates and u.args[0] in graph.inputs(PARAM):
            readers = [n for n in graph.nodes if n.section == "backward" and u.args[0] in n.inputs]
            assert all(order[r] < order[u] for r in readers), u
    # gradients do not pile up: at most the largest one and the one being computed are alive at the peak
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert trainer.memory_plan().at_peak.get("gradients", 0) < grads / 2


def test_pointwise_convolutions_run_as_matrix_multiplies():
    fast = compiled(SPARSE)
    graph = fast.program().graph
    assert not any(n.target is aten.convolution.default and n.args[1].meta.shape[2:] == (1, 1) for n in graph.nodes)
    products = {n.section for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)}
    assert {"forward", "backward"} <= products  # 1x1 layers forward, and the gradient to their input
    plain = compiled(SPARSE, disable={"matmul"})
    assert any(n.target is aten.convolution.default and n.args[1].meta.shape[2:] == (1, 1)
               for n in plain.program().graph.nodes)
    assert_same_training(fast, plain, exact=False)


def test_train_mode_batch_norm_in_channels_last_is_as_precise_as_autograd():
    """ATen's channels-last CPU batch norm sums its statistics and its backward's sums in float; the layout pass puts
    pockengine's kernels in its place (double sums, as the contiguous kernels autograd runs). With inputs of mean 4
    ATen's kernels put the batch norm parameters' gradients 1e-3 from float64 autograd, 20x further than fp32
    autograd is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).train()
    g = torch.Generator().manual_seed(0)
    data = ((torch.randn(8, 3, 48, 48, generator=g) + 4,), torch.randint(0, 3, (8,), generator=g))
    loss_fn = pe.losses.cross_entropy()

    def autograd(m, x):
        return dict(zip([n for n, _ in m.named_parameters()],
                        torch.autograd.grad(loss_fn(m(x), data[1]), list(m.parameters()))))

    def distance(grad, exact):
        return ((grad.double() - exact).abs().max() / exact.abs().max()).item()

    fp32 = autograd(copy.deepcopy(model), data[0][0])
    fp64 = autograd(copy.deepcopy(model).double(), data[0][0].double())
    trainer = pe.compile(copy.deepcopy(model), loss_fn, data, scheme=pe.Scheme.full())
    assert trainer.channels_last
    ops = [n.target for n in trainer.program().graph.nodes]
    assert ops.count(BATCH_NORM) == 2 and ops.count(BATCH_NORM_BACKWARD) == 2
    ours = trainer.gradients(data)
    for name in ("1.weight", "1.bias", "4.weight", "4.bias"):
        assert distance(ours[name], fp64[name]) <= max(distance(fp32[name], fp64[name]), 1e-6), name
    trainer.step(data)  # the running statistics as PyTorch updates them
    reference = copy.deepcopy(model)
    reference(data[0][0])
    torch.testing.assert_close(trainer.model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(trainer.model[1].running_var, reference[1].running_var)
