"""The report generator (bench/report/): the CUDA report's figures and text from a made-up results.json, and the
committed reports of docs/benchmarks as the generator writes them from their results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.workloads import workload_config as _config

REPO = Path(__file__).resolve().parents[2]


def workload_config(name):
    return _config(name, False)


MB = 2 ** 20


def _cuda_results() -> dict:
    """A results.json as `python -m bench --device cuda` writes it (figures made up, fields as the runner sets)."""
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
            "command": {"mobilenetv2": "python -m bench --workload mobilenetv2 --device cuda"}}


def test_cuda_memory_figures_come_from_the_allocator_counts():
    from bench.report.tables import step_mb, training_mb

    run = _cuda_results()["workloads"]["mobilenetv2"]["runs"]["pockengine|sparse"]
    assert step_mb(run) == 30.0  # peak during the steps - allocated before them
    assert training_mb(run) == 200.0  # the larger of the set-up's peak and the steps'
    assert training_mb({**run, "cuda_setup_peak_bytes": 50 * MB}) == 130.0


def test_cuda_report_names_the_gpu_lists_excluded_systems_and_says_how_memory_was_measured(tmp_path):
    from bench import report

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


@pytest.mark.parametrize("folder", ["docs/benchmarks", "docs/benchmarks/cuda", "docs/benchmarks/ondevice"])
def test_committed_reports_are_what_the_generator_writes_from_their_results(folder, tmp_path):
    """docs/benchmarks/**/README.md regenerate byte for byte from their results.json (`python -m bench.report
    FOLDER`): a change to the generator's text comes with the regenerated reports."""
    from bench import report

    committed = REPO / folder
    results = json.loads((committed / "results.json").read_text())
    report.write(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == (committed / "README.md").read_text()
    assert all(command.startswith("python -m bench ") for command in results["command"].values())


def test_report_divides_pockengine_by_each_peer_and_explains_system_variants(tmp_path):
    """The peer table: pockengine ÷ every other system of its scheme (variants included); each variant's options
    are explained under the tables, and variants sort after their system."""
    from bench import report
    from bench.report.tables import rows

    results = _cuda_results()
    w = results["workloads"]["mobilenetv2"]
    variant = {**w["runs"]["eager|sparse"], "system": "eager[attn=eager]", "median_s": 0.012, "min_s": 0.012,
               "max_s": 0.012, "cuda_peak_bytes": 220 * MB, "tracked_step_bytes": 116 * MB}
    w["runs"] = {"eager[attn=eager]|sparse": variant, **w["runs"]}
    assert [r["system"] for r in rows(w)] == ["pockengine", "eager", "eager[attn=eager]", "torch.compile"]
    report.write(results, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| sparse | pockengine | eager | 0.75 | 0.50 | 0.50 |" in text  # 6/8 ms, 30/60 MB, 29/58 MB
    assert "| sparse | pockengine | eager[attn=eager] | 0.50 | 0.25 | 0.25 |" in text  # 6/12 ms, 30/120, 29/116
    assert "| sparse | pockengine | torch.compile | 1.20 | 0.75 | – |" in text  # not tracked
    assert '- `eager[attn=eager]`: the model with Hugging Face\'s `attn_implementation="eager"`' in text
