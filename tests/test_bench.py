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
