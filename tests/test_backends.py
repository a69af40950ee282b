"""Backends: the same finished program run op by op (`backend="aten"`) or compiled by Inductor (`"inductor"`), and
`"auto"` choosing by measurement, with its choice cached on disk.

Parity on Inductor: gradients against torch.autograd (rel err <= 1e-4, as tests/test_model_parity.py), and three
training steps at changing learning rates against the ATen backend (parameters and losses, rel 1e-4), on the CPU and,
where there is one, on a GPU (there the Inductor program is replayed as CUDA graphs, in exact fp32). Inductor
compiles C++ for every graph (10-60 s each on a loaded 2-core machine, a few seconds with its cache warm), so the
models are few and tiny, and the tests that compile are marked slow.
"""

from __future__ import annotations

import copy
import json
import pytest
import torch
import torch.nn as nn

import pockengine as pe
from model_zoo.parity import autograd_gradients, float64_gradients, gradient_errors, rel_err
from pockengine.scheme import Rule
from pockengine.storage import cached_file
from torch.utils._pytree import tree_map

transformers = pytest.importorskip("transformers")

MLP_BATCH = ((torch.randn(6, 10, generator=torch.Generator().manual_seed(1)),), torch.tensor([0, 1, 2, 3, 0, 1]))


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 16), nn.GELU(),
                         nn.LayerNorm(16), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 5))


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _tokens() -> tuple:
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids}, ids


# a sparse scheme: channels of two projections, one of them deep in the network, and the last layers' biases
LLAMA_SPARSE = pe.Scheme("sparse", [Rule("model.layers.0.self_attn.k_proj", "partial", 0.25, "magnitude"),
                                    Rule("model.layers.1.mlp.down_proj", "partial", 0.5, "first"),
                                    Rule("model.norm", "full")])

CASES = {  # name: (model, batch, loss, optimizer, scheme)
    "mlp": (_mlp, lambda: MLP_BATCH, pe.losses.cross_entropy(), lambda: pe.optim.AdamW(lr=0.01), pe.Scheme.full()),
    "cnn": (_cnn, lambda: ((torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),),
                           torch.tensor([1, 4])),
            pe.losses.cross_entropy(), lambda: pe.optim.SGD(lr=0.05, momentum=0.9), pe.Scheme.full()),
    "llama": (_llama, _tokens, pe.losses.causal_lm(), lambda: pe.optim.AdamW(lr=0.01), LLAMA_SPARSE),
}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.fixture
def on_device(request):
    """The test's device (its `device` parameter); on a GPU without TensorFloat-32, restored after."""
    if request.getfixturevalue("device") != "cuda":
        yield
        return
    from bench.gpu import strict_fp32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    strict_fp32()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["mlp", "cnn", "llama"])
def test_inductor_matches_autograd_and_the_aten_backend(name, device, on_device):
    build, make_batch, loss_fn, optimizer, scheme = CASES[name]
    model = build().train().to(device)
    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, make_batch())
    ref_model = copy.deepcopy(model)
    ref_loss, ref = autograd_gradients(copy.deepcopy(model), loss_fn, batch)

    trainers = {b: pe.compile(copy.deepcopy(model), loss_fn, batch, optimizer=optimizer(), scheme=scheme, backend=b,
                              cuda_graphs=True) for b in ("aten", "inductor")}
    trainer = trainers["inductor"]
    graphs = ", CUDA graphs" if device == "cuda" else ""
    assert f"backend: inductor{graphs} (backend='inductor')" in str(trainer.program().graph).splitlines()[1]
    grads = trainer.gradients(batch)
    assert type(trainer.program(gradients=True)).__name__ == ("CudaGraphProgram" if graphs else "InductorProgram")
    assert trainer.loss(batch) == pytest.approx(ref_loss, rel=1e-5)
    bad = gradient_errors(grads, ref, lambda: float64_gradients(ref_model, loss_fn, batch),
                          {n: None if (m := s.mask(ref[n].shape)) is None else m.to(device)
                           for n, s in trainer.trained.items()})
    assert not bad, "\n".join(bad)

    # three steps, the learning rate changing at each: a run-time input, never a constant of Inductor's code
    losses = {b: [t.step(batch, lr=lr) for lr in (0.01, 0.03, 0.002)] for b, t in trainers.items()}
    assert losses["inductor"] == pytest.approx(losses["aten"], rel=1e-4)
    ours, theirs = (dict(t.model.named_parameters()) for t in trainers.values())
    moved = [n for n in trainer.trained if rel_err(ours[n].detach(), model.get_parameter(n).detach()) > 1e-3]
    assert len(moved) >= len(trainer.trained) / 2, moved  # the comparison below compares trained weights
    errors = {n: rel_err(theirs[n].detach(), ours[n].detach()) for n in ours}
    assert max(errors.values()) <= 1e-4, errors
    for n, b in trainers["aten"].model.named_buffers():  # BatchNorm statistics, copied back in place
        assert torch.allclose(dict(trainer.model.named_buffers())[n], b, rtol=1e-4, atol=1e-6), n

    # a non-finite loss stops the step between Inductor's two regions: no update
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    bad_batch = (tuple(torch.full_like(x, float("nan")) if x.is_floating_point() else x for x in batch[0]), batch[1]) \
        if isinstance(batch[0], tuple) else None
    if bad_batch is not None:
        with pytest.raises(pe.NonFiniteLossError):
            trainer.step(bad_batch)
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_random_programs_stay_on_aten_and_say_why():
    """Inductor's random ops draw from their own seeds, not the trainer's generator: dropout keeps the ATen
    backend (no Inductor compile happens), and the listing says why."""
    trainer = pe.compile(_mlp(dropout=0.3).train(), pe.losses.cross_entropy(), MLP_BATCH, backend="inductor")
    remark = str(trainer.program().graph).splitlines()[1]
    assert remark.startswith("backend: aten (Inductor cannot run this program:") and "random" in remark
    assert ": aten (Inductor cannot run this program:" in trainer.summary()
    assert type(trainer.program()).__name__ == "CompiledProgram"


def test_backend_options_are_validated():
    with pytest.raises(pe.UserInputError, match="backend must be one of .*'aten', 'inductor', 'auto'.*'tvm'"):
        pe.compile(_mlp(), pe.losses.cross_entropy(), MLP_BATCH, backend="tvm")
    with pytest.raises(pe.UserInputError, match="cuda_graphs must be True or False, got 'yes'"):
        pe.compile(_mlp(), pe.losses.cross_entropy(), MLP_BATCH, cuda_graphs="yes")


@pytest.mark.slow
def test_auto_measures_once_caches_the_choice_and_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    model = _mlp()

    def compile_auto() -> tuple[pe.Trainer, str]:
        trainer = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), MLP_BATCH,
                             optimizer=pe.optim.SGD(lr=0.1), backend="auto")
        return trainer, str(trainer.program().graph).splitlines()[1]

    trainer, remark = compile_auto()
    assert remark.startswith("backend: ") and "(auto, measured now: aten " in remark and " ms, inductor " in remark
    (entry,) = (tmp_path / "backend").glob("*.json")
    recorded = json.loads(entry.read_text())
    assert recorded["backend"] in remark and set(recorded["seconds"]) == {"aten", "inductor"}
    assert recorded["fields"]["torch"] == torch.__version__
    # measuring trained nothing: the first step starts from the model's weights
    first = pe.compile(copy.deepcopy(model), pe.losses.cross_entropy(), MLP_BATCH, optimizer=pe.optim.SGD(lr=0.1))
    assert trainer.step(MLP_BATCH) == pytest.approx(first.step(MLP_BATCH), rel=1e-6)
    assert trainer.summary().endswith(remark.removeprefix("backend: "))

    again, remark = compile_auto()
    assert f"auto, measured {recorded['measured']}, cached" in remark

    entry.write_text(entry.read_text().replace('"backend"', '"backend" ', 1))  # a changed byte: checksum fails
    with pytest.warns(RuntimeWarning, match="backend choice .* does not match its recorded checksum"):
        again, remark = compile_auto()
    assert "measured now" in remark

    # a well-formed entry for another key (a stale format, a hash collision) is measured again, never trusted
    stale = json.loads(entry.read_text()) | {"key": "0" * 64, "backend": "inductor"}
    entry.unlink()
    cached_file(entry, lambda tmp: tmp.write_text(json.dumps(stale)), "test entry")  # with its right checksum
    with pytest.warns(RuntimeWarning, match="not one for this program"):
        again, remark = compile_auto()
    assert "measured now" in remark and json.loads(entry.read_text())["key"] == recorded["key"]


def test_the_default_backend_comes_from_the_environment(monkeypatch):
    """POCKENGINE_BACKEND runs a whole test suite on another backend (the parity tests on Inductor)."""
    monkeypatch.setenv("POCKENGINE_BACKEND", "inductor")
    assert pe.Options().backend == "inductor" and pe.Options(backend="aten").backend == "aten"
    monkeypatch.setenv("POCKENGINE_BACKEND", "tvm")
    with pytest.raises(pe.UserInputError, match="backend must be one of"):
        pe.Options()
    monkeypatch.delenv("POCKENGINE_BACKEND")
    assert pe.Options().backend == "aten"


@pytest.mark.slow
def test_inductor_traces_the_run_time_padding_test_as_the_masked_form():
    """A padding mask of all ones drops the attention's mask at run time on the ATen backend
    (pockengine/kernels/attention.py); Inductor's traced graph cannot branch on a value and runs the masked form:
    the same gradients as autograd's (1e-4) with padding and without."""
    model = _llama().train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))

    def batch(padded: bool) -> tuple:
        mask = torch.ones(2, 8, dtype=torch.long)
        labels = ids.clone()
        if padded:  # left padding; the loss ignores what the padded positions predict
            mask[0, :2] = 0
            labels[0, :3] = -100
        return {"input_ids": ids, "attention_mask": mask}, labels

    trainer = pe.compile(copy.deepcopy(model), pe.losses.causal_lm(), batch(False), attention="flash",
                         backend="inductor")
    assert "pockengine.flash_attention_unmasked_if_backward" in str(trainer.program(gradients=True).graph)
    assert type(trainer.program(gradients=True)).__name__ == "InductorProgram"
    for padded in (False, True):
        _, expected = autograd_gradients(copy.deepcopy(model), pe.losses.causal_lm(), batch(padded))
        grads = trainer.gradients(batch(padded))
        errors = {n: rel_err(grads[n], r) for n, r in expected.items()}
        assert max(errors.values()) <= 1e-4, (padded, errors)
