"""pockengine on a CUDA GPU: the same contracts as on the CPU, checked on the device (skipped where there is none).

Gradients equal torch.autograd's and 5 steps equal eager PyTorch's on the GPU (the parity harness of
test_sparse_parity.py, run with `device="cuda"`), the memory plan predicts what the tracker measures there, and
what the trainer creates (state, channel indices, the random generator) lives on the GPU, and every random op
draws from that generator. TensorFloat-32 is off
for the whole module: cuDNN convolutions use it by default and cuBLAS matrix multiplies do not, so with it a 1x1
convolution would round differently in eager PyTorch (cuDNN) and in pockengine (addmm), far beyond 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pockengine as pe
from bench.gpu import strict_fp32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")

CUDA = torch.device("cuda", 0)
# Small models of every family the CPU suite checks, the convolution ones in each layout-relevant scheme, and the
# real MobileNetV2 (weights from the pockengine cache).
PARITY = [("mlp", "partial"), ("mlp", "last"), ("cnn_frozen_bn", "bias_only"), ("cnn_frozen_bn", "partial"),
          ("cnn_train_bn", "partial"), ("bert", "partial"), ("gpt2", "partial"), ("llama", "last"),
          ("resnet", "partial"), ("mobilenet_v2", "partial")]


@pytest.fixture(autouse=True, scope="module")
def exact_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    strict_fp32()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _parity(family: str, scheme: str, opt: str = "sgd"):
    from test_sparse_parity import _run

    return _run(family, scheme, opt, device="cuda")


@pytest.mark.parametrize("family, scheme", PARITY)
def test_gradients_match_autograd_on_cuda(family, scheme):
    f = _parity(family, scheme)
    assert f.gradient_keys == set(f.trained)
    assert not f.gradient_errors, "\n".join(f.gradient_errors)


@pytest.mark.parametrize("family, scheme", PARITY)
def test_sgd_steps_match_eager_on_cuda_and_touch_only_the_scheme(family, scheme):
    f = _parity(family, scheme)
    assert not f.trajectory_errors, "\n".join(f.trajectory_errors)
    assert not f.touched, "\n".join(f.touched)


@pytest.mark.parametrize("family", ["mlp", "cnn_frozen_bn"])
def test_adamw_steps_match_eager_on_cuda(family):
    f = _parity(family, "partial", "adamw")
    assert not f.trajectory_errors, "\n".join(f.trajectory_errors)


@pytest.mark.parametrize("scheme", ["full", "sparse"])
def test_memory_plan_predicts_the_tracked_peak_on_cuda(scheme):
    from test_memory import SCHEMES, batch, measured_peak, mobile_block_net

    model = mobile_block_net().to(CUDA)
    (x,), y = batch()
    b = ((x.to(CUDA),), y.to(CUDA))
    trainer = pe.compile(model, pe.losses.cross_entropy(), b, optimizer=pe.optim.SGD(lr=0.01, momentum=0.9),
                         scheme=SCHEMES[scheme], freeze_batchnorm=True)
    trainer.step(b)
    peak, left = measured_peak(trainer, model, b)
    plan = trainer.memory_plan()
    assert abs(plan.peak_bytes - peak) <= 0.10 * peak, plan.table()
    assert left <= 64  # every intermediate freed: at most the returned 0-d loss survives the step


def test_auto_frozen_chunks_is_one_micro_batch_on_cuda():
    from test_memory import SCHEMES, batch, mobile_block_net

    (x,), y = batch(n=8)
    b = ((x.to(CUDA),), y.to(CUDA))
    programs = [pe.compile(mobile_block_net().to(CUDA), pe.losses.cross_entropy(), b, scheme=SCHEMES["sparse"],
                           freeze_batchnorm=True, frozen_chunks=chunks).program()
                for chunks in ("auto", 1)]
    assert programs[0].source == programs[1].source


def test_trainer_state_indices_and_dropout_live_on_the_gpu_and_dropout_is_seeded():
    def run(seed: int) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).to(CUDA).train()
        g = torch.Generator().manual_seed(1)
        b = ((torch.randn(8, 6, generator=g).to(CUDA),), torch.randint(0, 3, (8,), generator=g).to(CUDA))
        scheme = pe.Scheme.from_dict({"rules": [{"modules": "0", "mode": "partial", "ratio": 0.5,
                                                 "select": "magnitude"}, {"modules": "3", "mode": "full"}]})
        trainer = pe.compile(model, pe.losses.cross_entropy(), b, optimizer=pe.optim.AdamW(lr=0.01),
                             scheme=scheme, seed=seed)
        assert trainer.generator.device.type == "cuda"
        assert all(t.device == CUDA for t in trainer.program().graph.constants.values())
        assert all(t.device == CUDA for st in trainer.state.values() for t in st.values())
        return [trainer.step(b) for _ in range(3)]

    assert run(seed=3) == pytest.approx(run(seed=3), rel=1e-6)
    assert run(seed=3) != pytest.approx(run(seed=4), rel=1e-3)


def test_drop_path_and_other_random_ops_draw_from_the_trainers_gpu_generator():
    from test_random_ops import batch, residual

    def run(seed: int, global_seed: int) -> list[float]:
        (x,), y = batch()
        b = ((x.to(CUDA),), y.to(CUDA))
        trainer = pe.compile(residual(noise=True).to(CUDA), pe.losses.cross_entropy(), b, seed=seed)
        losses = []
        for step in range(3):
            torch.cuda.manual_seed_all(global_seed + step)
            losses.append(trainer.step(b))
        return losses

    assert run(seed=3, global_seed=0) == pytest.approx(run(seed=3, global_seed=10), rel=1e-6)
    assert run(seed=3, global_seed=0) != pytest.approx(run(seed=4, global_seed=0), rel=1e-3)


def test_batch_on_the_cpu_for_a_model_on_the_gpu_is_refused_naming_both():
    from test_trainer import batch, small_cnn

    (x,), y = batch()
    trainer = pe.compile(small_cnn().to(CUDA), pe.losses.cross_entropy(), ((x.to(CUDA),), y.to(CUDA)))
    with pytest.raises(pe.UserInputError, match=r"leaf 0 is on cpu, but the model is on cuda:0.*\.to\('cuda:0'\)"):
        trainer.step(((x,), y))


def test_checkpoint_of_a_gpu_trainer_resumes_on_the_gpu(tmp_path):
    from test_trainer import batch, small_cnn

    (x,), y = batch()
    b = ((x.to(CUDA),), y.to(CUDA))
    trainer = pe.compile(small_cnn().to(CUDA), pe.losses.cross_entropy(), b,
                         optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    trainer.step(b)
    trainer.save(tmp_path / "ckpt")
    expected = trainer.step(b)
    resumed = pe.load(tmp_path / "ckpt", small_cnn().to(CUDA), pe.losses.cross_entropy(), b)
    assert resumed.step(b) == pytest.approx(expected, rel=1e-5)


# -- the Inductor backend replayed as CUDA graphs (pockengine/backend/cuda_graphs.py) ------------------------------
def _graphed_and_aten(optimizer, **options):
    """Two trainers of the same small CNN (train-mode BatchNorm: buffers written too) on the GPU: Inductor with CUDA
    graphs, and the ATen backend; the batches of 4 steps."""
    from test_trainer import batch, small_cnn

    batches = [tuple(t.to(CUDA) if isinstance(t, torch.Tensor) else (t[0].to(CUDA),) for t in batch(seed=s))
               for s in range(4)]
    trainers = [pe.compile(small_cnn().to(CUDA), pe.losses.cross_entropy(), batches[0], optimizer=optimizer(),
                           backend=backend, **{"cuda_graphs": True, **options}) for backend in ("inductor", "aten")]
    return trainers, batches


def _state(trainer):
    return {**dict(trainer.model.named_parameters()), **dict(trainer.model.named_buffers())}


@pytest.mark.parametrize("optimizer", [lambda: pe.optim.SGD(lr=0.05, momentum=0.9), lambda: pe.optim.AdamW(lr=0.01)],
                         ids=["sgd", "adamw"])
def test_inductor_with_cuda_graphs_trains_as_the_aten_backend(optimizer):
    from test_trainer import rel_err

    (graphed, aten_trainer), batches = _graphed_and_aten(optimizer)
    assert type(graphed.program()).__name__ == "CudaGraphProgram"
    assert pe.Options().cuda_graphs  # the default, which _graphed_and_aten also sets
    assert "inductor, CUDA graphs" in graphed.program().graph.remarks[-1]
    assert graphed.program().graph_pool_bytes > 0
    # A learning rate that changes every step (AdamW's bias corrections change anyway): the graphs read it from
    # device memory, so a value baked in at capture would show here.
    for i, b in enumerate(batches):
        lr = 0.05 / (i + 1)
        assert graphed.step(b, lr=lr) == pytest.approx(aten_trainer.step(b, lr=lr), rel=1e-4)
    ours, theirs = _state(graphed), _state(aten_trainer)
    for name, t in theirs.items():
        if t.is_floating_point():
            assert rel_err(ours[name].detach(), t.detach()) < 1e-4, name


def test_cuda_graphs_stop_a_non_finite_step_before_any_update():
    (graphed, _), batches = _graphed_and_aten(lambda: pe.optim.SGD(lr=0.05, momentum=0.9))
    graphed.step(batches[0])
    before = {n: t.detach().clone() for n, t in _state(graphed).items()}
    momentum = {n: {k: t.clone() for k, t in s.items()} for n, s in graphed.state.items()}
    (x,), y = batches[1]
    bad = ((torch.full_like(x, float("nan")),), y)
    with pytest.raises(pe.NonFiniteLossError):
        graphed.step(bad)
    assert all(torch.equal(t, before[n]) for n, t in _state(graphed).items())
    assert all(torch.equal(t, momentum[n][k]) for n, s in graphed.state.items() for k, t in s.items())
    graphed.step(batches[2])  # and the next finite step trains
    assert not all(torch.equal(t, before[n]) for n, t in _state(graphed).items())


def test_cuda_graphs_follow_a_parameter_replaced_between_steps():
    """`p.data = ...` gives a parameter new memory; the graphs, captured on the old addresses, are captured again."""
    (graphed, aten_trainer), batches = _graphed_and_aten(lambda: pe.optim.SGD(lr=0.05))
    for trainer in (graphed, aten_trainer):
        trainer.step(batches[0])
        weight = trainer.model[0].weight
        weight.data = weight.data * 0.5
    assert graphed.step(batches[1]) == pytest.approx(aten_trainer.step(batches[1]), rel=1e-4)
    assert torch.allclose(graphed.model[0].weight, aten_trainer.model[0].weight, rtol=1e-4, atol=1e-6)


def test_gradients_from_cuda_graphs_are_copies_and_graphs_can_be_switched_off():
    (graphed, aten_trainer), batches = _graphed_and_aten(lambda: pe.optim.SGD(lr=0.05))
    first = graphed.gradients(batches[0])
    kept = {n: g.clone() for n, g in first.items()}
    graphed.gradients(batches[1])  # a replay overwrites the graph's outputs, not what the first call returned
    assert all(torch.equal(first[n], kept[n]) for n in kept)
    expected = aten_trainer.gradients(batches[0])
    assert all(torch.allclose(kept[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)
    (plain, _), _ = _graphed_and_aten(lambda: pe.optim.SGD(lr=0.05), cuda_graphs=False)
    assert type(plain.program()).__name__ == "InductorProgram"
