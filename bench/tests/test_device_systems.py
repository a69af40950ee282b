"""The benchmark's on-device systems on a tiny model: `pockengine-onnx` (the exported step trained by
pockengine.runtime.onnx in a child process without torch) and `executorch` (ExecuTorch 1.5.1 training in
.venv-executorch); which schemes a whole-tensor system cannot run; the report's rows for them."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import pockengine as pe
from bench import systems
from bench.workloads import Workload

LR = 0.1


def _workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    batches = [((torch.randn(4, 6),), torch.randint(0, 3, (4,))) for _ in range(2)]
    return Workload("tiny", {"model": "tiny"}, model, pe.losses.cross_entropy(), batches, "samples", 4, LR, False,
                    ["pixels"])


def _train(system: systems.System, w: Workload, selections, tmp_path, steps: int = 3) -> list[float]:
    system.setup(copy.deepcopy(w.model), w.loss_fn, w.batch(0), selections, lr=LR, workload=w,
                 work_dir=str(tmp_path / system.name), threads=1, scheme_name="scheme")
    try:
        return [system.step(w.batch(i)) for i in range(steps)]
    finally:
        system.close()


@pytest.mark.slow  # compiles twice, exports to ONNX, starts a child process: about a minute on 2 busy cores
def test_onnx_runner_system_trains_partial_channels_like_the_torch_backend_in_a_process_without_torch(tmp_path):
    """Same losses as the `pockengine` system (SGD momentum 0.9) over 3 steps, the second layer trained on half of
    its output channels; the child refuses to run if torch got imported, and reports the model file's size."""
    w = _workload()
    selections = pe.Scheme.from_dict({"rules": [{"modules": "0", "mode": "bias"},
                                                {"modules": "2", "mode": "partial", "ratio": 0.5,
                                                 "select": "first"}]}).resolve(w.model)
    assert any(s.kind == "partial" for s in selections.values())
    reference = _train(systems.PockEngine(), w, selections, tmp_path)
    runner = systems.PockEngineOnnx()
    losses = _train(runner, w, selections, tmp_path)
    assert losses == pytest.approx(reference, rel=1e-5)
    assert losses[2] < losses[0]
    assert runner.pid() != __import__("os").getpid() and runner.model_bytes() > 0
    assert runner.trained_entries() == 8 + 3 * 4 + 3  # the first bias; half the second weight's input channels, bias


@pytest.mark.slow  # a child process imports ExecuTorch and lowers the program: about a minute on 2 busy cores
@pytest.mark.xdist_group("bench_quick")  # the worker that builds the peers' environments for the smoke test: no race
def test_executorch_system_trains_the_requires_grad_subset_like_eager_sgd_with_momentum(tmp_path):
    """ExecuTorch's joint program and SGD (momentum 0.9) give eager PyTorch's losses on the bias-only subset."""
    # its own environment, made when missing (idempotent), as the benchmark's smoke test does: never a skip
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "setup_executorch.sh")], check=True)
    assert systems.EXECUTORCH_PYTHON.exists()
    w = _workload()
    selections = pe.Scheme.bias_only().resolve(w.model)
    reference = _train(systems.Eager(), w, selections, tmp_path)
    et = systems.ExecuTorchTraining()
    losses = _train(et, w, selections, tmp_path)
    assert losses == pytest.approx(reference, rel=1e-5)
    assert losses[2] < losses[0]
    assert et.model_bytes() > 0 and et.trained_entries() == 8 + 3


@pytest.mark.slow  # as above
@pytest.mark.xdist_group("bench_quick")
def test_executorch_system_trains_a_hugging_face_model_with_sdpa_attention(tmp_path):
    """A BERT with transformers' default sdpa attention (MiniLM's workload): ExecuTorch has no kernel for the
    backward of the CPU flash attention that sdpa's joint program calls, so the system lowers the model with its
    eager attention; eager PyTorch's losses (sdpa) over 3 steps, and the system says so."""
    transformers = pytest.importorskip("transformers")
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "setup_executorch.sh")], check=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    mask = torch.ones(2, 8, dtype=torch.long)
    batches = [({"input_ids": torch.randint(3, 30, (2, 8)), "attention_mask": mask}, torch.tensor([0, 1]))
               for _ in range(2)]
    w = Workload("tiny_bert", {"model": "tiny_bert"}, model, pe.losses.cross_entropy(), batches, "samples", 2, LR,
                 False, ["input_ids", "attention_mask"])
    selections = pe.Scheme.bias_only().resolve(w.model)
    reference = _train(systems.Eager(), w, selections, tmp_path)
    et = systems.ExecuTorchTraining()
    losses = _train(et, w, selections, tmp_path)
    assert losses == pytest.approx(reference, rel=1e-5)
    assert any("eager attention" in n for n in et.notes())


def test_a_whole_tensor_system_does_not_run_a_scheme_with_partial_channels_and_says_why():
    from bench.runner import not_runnable

    jobs = [(s, sc) for sc in ("full", "sparse") for s in ("pockengine-onnx", "ort", "executorch")]
    why = not_runnable(jobs, {"full": {"partial": False}, "sparse": {"partial": True}})
    assert list(why) == ["executorch|sparse"]
    assert "part of some tensors' channels" in why["executorch|sparse"] and "requires_grad" in why["executorch|sparse"]


def test_report_lists_the_runner_beside_its_peers_with_process_peak_and_model_file(tmp_path):
    from bench import report
    from bench.workloads import workload_config

    cfg = {**workload_config("mobilenetv2", False), "schemes": ["full"]}
    MB = 1024

    def run(system, ms, baseline, before, peak, model_mb=None):
        r = {"system": system, "scheme": "full", "losses": [2.3, 2.2], "median_s": ms / 1e3, "min_s": ms / 1e3,
             "max_s": ms / 1e3, "setup_s": 1.0, "notes": [], "baseline_rss_kb": baseline * MB,
             "mem_before_kb": before * MB, "peak_rss_kb": peak * MB}
        return {**r, "model_bytes": model_mb * 2 ** 20} if model_mb else r

    w = {"workload": "mobilenetv2", "quick": False, "description": "tiny", "config": cfg, "steps": 10, "warmup": 3,
         "memory_steps": 3, "memory_warmup": 2, "unit": "samples", "items_per_step": 8, "device": "cpu",
         "schemes": {"full": {"rules": {}, "trained_tensors": 1, "trained_entries": 10, "total_entries": 10,
                              "partial": False}},
         "loadavg_start": [1.0], "loadavg_end": [1.0], "finished": "2026-01-01 00:00:00", "matmul_flops_per_s": 1e11,
         "not_runnable": {"executorch|sparse": "the scheme trains part of some tensors' channels: whole tensors only"},
         "runs": {"pockengine|full": run("pockengine", 100, 400, 500, 600),
                  "pockengine-onnx|full": run("pockengine-onnx", 120, 50, 140, 150, 9.0),
                  "executorch|full": run("executorch", 6000, 500, 600, 600, 9.5)}}
    results = {"machine": {"cpu": "Some CPU", "cores": 2, "memory_gb": 8, "python": "3.11", "torch": "2.13.0",
                           "onnxruntime": "1.31.1", "executorch": "1.5.1"},
               "device": "cpu", "workloads": {"mobilenetv2": w}, "command": {}}
    report.write(results, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "onnxruntime 1.31.1, executorch 1.5.1" in text
    # train mem 150 - 50 MB, ÷ the best other (executorch's 100 MB); process peak; model file
    assert "| full | pockengine-onnx | 100 | arena | – | – | – | 1.00 | – | 150 | 9.0 |" in text
    assert "| full | executorch | 100 | planned | – | – | – | 1.00 | – | 600 | 9.5 |" in text
    assert "| full | pockengine | pockengine-onnx | 0.83 | – | – | 2.00 |" in text  # 100/120 ms, 200/100 MB
    assert "| full | pockengine-onnx | executorch | 0.02 | – | – | 1.00 |" in text
    assert "| full | pockengine-onnx | pockengine |" not in text
    assert "- executorch on sparse: not run: the scheme trains part of some tensors' channels" in text
