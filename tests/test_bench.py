"""Smoke test of `pockengine bench --quick` (CI): every system runs on every workload, and pockengine's first-step
losses equal PyTorch eager's. Nothing about speed is asserted.

Skips nothing silently: ONNX Runtime's environment (.venv-ort) is built by bench/setup_ort.sh when missing
(idempotent), and the models and data come from the packages that scripts/setup.sh installs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ["mobilenetv2", "minilm", "smollm2"]
SYSTEMS = {"pockengine", "eager", "torch.compile", "ort"}
LORA_WORKLOADS = {"minilm", "smollm2"}


@pytest.fixture(scope="module")
def ort_env():
    subprocess.run(["bash", str(REPO / "bench" / "setup_ort.sh")], check=True, cwd=REPO)
    assert (REPO / ".venv-ort" / "bin" / "python").exists()


@pytest.fixture(scope="module")
def quick_results(ort_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "pockengine.bench.cli", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_bench_runs_every_system(quick_results):
    out, results = quick_results
    assert set(results["workloads"]) == set(WORKLOADS)
    problems = []
    for name, w in results["workloads"].items():
        systems = {r["system"] for r in w["runs"].values()}
        expected = SYSTEMS | ({"peft-lora"} if name in LORA_WORKLOADS else set())
        assert systems == expected, (name, systems)
        for key, run in w["runs"].items():
            if run.get("error"):
                problems.append(f"{name} {key}: {run['error'][:500]}")
                continue
            assert len(run["times"]) == w["steps"], (name, key)
            assert run["median_s"] > 0 and run["peak_rss_kb"] > 0
            assert all(l == l for l in run["losses"]), (name, key, run["losses"])  # no NaN
    assert not problems, "\n".join(problems)
    for f in ("README.md", "bench.png", "results.json"):
        assert (out / f).stat().st_size > 0


def test_quick_bench_pockengine_first_loss_equals_eager(quick_results):
    _, results = quick_results
    for name, w in results["workloads"].items():
        for key, run in w["runs"].items():
            if run["system"] != "pockengine":
                continue
            eager = w["runs"][f"eager|{run['scheme']}"]
            assert run["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-5, abs=1e-6), (name, key)


def test_schemes_resolve_and_match_the_config():
    """Every scheme of bench/schemes.yaml is a valid pockengine.Scheme for its workload's modules."""
    from pockengine.bench.workloads import load_config, scheme_for

    workloads, schemes = load_config()
    for name, spec in workloads["workloads"].items():
        for scheme in spec["schemes"]:
            for quick in (False, True):
                s = scheme_for(name, scheme, quick)
                assert s.name == scheme
        assert set(spec["schemes"]) <= set(schemes[name])


def _job(tmp_path, system: str) -> dict:
    return {"kind": "system", "system": system, "scheme": "sparse", "pass": "time", "workload": "mobilenetv2",
            "quick": True, "threads": 1, "work_dir": str(tmp_path)}


def test_worker_error_reaches_the_runner_with_its_message(tmp_path):
    from pockengine.bench.runner import Worker, WorkerError

    w = Worker(_job(tmp_path, "no-such-system"), tmp_path / "worker.log")
    with pytest.raises(WorkerError, match="no-such-system"):
        w.read(timeout=300)
    assert "Traceback" in (tmp_path / "worker.log").read_text()
    assert not w.proc.is_alive()


def test_worker_that_dies_is_reported_not_awaited(tmp_path):
    from pockengine.bench import worker, workloads
    from pockengine.bench.runner import Worker, WorkerError

    selections = workloads.resolve(workloads.build("mobilenetv2", quick=True),
                                   workloads.scheme_for("mobilenetv2", "sparse", quick=True))
    worker.save_selections(str(tmp_path), "sparse", selections)
    proc = Worker(_job(tmp_path, "eager"), tmp_path / "worker.log")
    assert proc.read(timeout=300)["ready"]
    proc.proc.kill()
    with pytest.raises(WorkerError, match="exited with code|is gone"):
        proc.ask(cmd="step")


@pytest.mark.parametrize("compile_threads", [None, 1])
def test_torch_compile_system_trains_with_the_default_and_the_quick_compile_threads(compile_threads):
    import torch

    import pockengine as pe
    from pockengine.bench.systems import TorchCompile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batch = ((torch.randn(5, 4),), torch.randint(0, 3, (5,)))
    system = TorchCompile()
    system.setup(model, pe.losses.cross_entropy(), batch, pe.Scheme.full().resolve(model), lr=0.1,
                 compile_threads=compile_threads)
    losses = [system.step(batch) for _ in range(3)]
    assert losses[2] < losses[0]


def test_bench_on_cuda_without_a_gpu_exits_2_saying_why(monkeypatch, capsys):
    import torch

    from pockengine.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--workload", "mobilenetv2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch.cuda.is_available() is False" in err and "NVIDIA GPU" in err


def test_systems_that_cannot_run_are_listed_with_why():
    from pockengine.bench.cli import SYSTEMS as ALL
    from pockengine.bench.runner import excluded

    cuda = excluded(workload_config("mobilenetv2"), ALL, "cuda")
    assert set(cuda) == {"ort", "peft-lora"}
    assert "CPU build" in cuda["ort"] and "no LoRA configuration" in cuda["peft-lora"]
    assert set(excluded(workload_config("mobilenetv2"), ALL, "cpu")) == {"peft-lora"}
    assert excluded(workload_config("minilm"), ALL, "cpu") == {}
    assert excluded(workload_config("minilm"), ["eager"], "cuda") == {}


def workload_config(name):
    from pockengine.bench.workloads import workload_config as config

    return config(name, False)


MB = 2 ** 20


def _cuda_results() -> dict:
    """A results.json as `pockengine bench --device cuda` writes it (figures made up, fields as the runner sets)."""
    cfg = {**workload_config("mobilenetv2"), "schemes": ["sparse"]}
    scheme = {"rules": {"name": "sparse"}, "trained_tensors": 2, "trained_entries": 50, "total_entries": 100,
              "eager_flops": 4e9}

    def run(system, step_ms, before, peak, setup_peak, tracked=None):
        return {"system": system, "scheme": "sparse", "losses": [2.5, 2.4], "median_s": step_ms / 1e3,
                "min_s": step_ms / 1e3, "max_s": step_ms / 1e3, "setup_s": 3.0, "notes": [],
                "cuda_before_bytes": before * MB, "cuda_peak_bytes": peak * MB,
                "cuda_setup_peak_bytes": setup_peak * MB,
                "memory_method": "timing pass, CUDA caching allocator", "tracked_step_bytes": tracked,
                "predicted_step_bytes": tracked, "flops": 4e9 if tracked else None}

    w = {"workload": "mobilenetv2", "quick": False, "description": cfg["description"], "config": cfg, "steps": 10,
         "warmup": 3, "memory_steps": 3, "memory_warmup": 2, "schemes": {"sparse": scheme}, "unit": "samples",
         "items_per_step": 8, "device": "cuda", "loadavg_start": [0.1], "loadavg_end": [0.2],
         "quiet_gate": {"waited_s": 0.0, "busy_steps": 0}, "finished": "2026-01-01 00:00:00",
         "matmul_flops_per_s": 5e13, "matmul_rates": [5e13, 5e13], "matmul_n": 8192,
         "excluded": {"ort": "ONNX Runtime training is installed as its CPU build", "peft-lora": "no LoRA here"},
         "runs": {"pockengine|sparse": run("pockengine", 6.0, 100, 130, 200, 29 * MB),
                  "eager|sparse": run("eager", 8.0, 100, 160, 120, 58 * MB),
                  "torch.compile|sparse": run("torch.compile", 5.0, 100, 140, 900)}}
    machine = {"cpu": "Some CPU", "cores": 16, "memory_gb": 128.0, "python": "3.12.0", "torch": "2.11.0+cu130",
               "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gb": 79.2, "cuda": "13.0", "cudnn": 91000,
               "driver": "580.00"}
    return {"machine": machine, "device": "cuda", "workloads": {"mobilenetv2": w},
            "command": {"mobilenetv2": "pockengine bench --workload mobilenetv2 --device cuda"}}


def test_cuda_memory_figures_come_from_the_allocator_counts():
    from pockengine.bench.report import step_mb, training_mb

    run = _cuda_results()["workloads"]["mobilenetv2"]["runs"]["pockengine|sparse"]
    assert step_mb(run) == 30.0  # peak during the steps - allocated before them
    assert training_mb(run) == 200.0  # the larger of the set-up's peak and the steps'
    assert training_mb({**run, "cuda_setup_peak_bytes": 50 * MB}) == 130.0


def test_cuda_report_names_the_gpu_lists_excluded_systems_and_says_how_memory_was_measured(tmp_path):
    from pockengine.bench import report

    report.write(_cuda_results(), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "NVIDIA H100 80GB HBM3 (79.2 GB), NVIDIA driver 580.00, torch 2.11.0+cu130 built for CUDA 13.0" in text
    assert "- ort: not run: ONNX Runtime training is installed as its CPU build" in text
    assert "- peft-lora: not run: no LoRA here" in text
    assert "| sparse | pockengine | 200 | 30.0 | 29.0 | 29.0 |" in text
    assert "| sparse | torch.compile | 900 | 40.0 | – | – |" in text
    assert "torch.cuda.max_memory_allocated()" in text and "torch.cuda.synchronize()" in text
    assert "VmHWM" not in text and "8192² `torch.mm` on the GPU" in text
    assert (tmp_path / "bench.png").stat().st_size > 0
