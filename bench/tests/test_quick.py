"""Smoke test of `python -m bench --quick` (CI): every system runs on every workload, and pockengine's first-step
losses equal PyTorch eager's. Nothing about speed is asserted. Slow (2-3 minutes on 2 cores): `-m "not slow"` leaves
it out.

Skips nothing silently: ONNX Runtime's and ExecuTorch's environments (.venv-ort, .venv-executorch) are built by
bench/setup_ort.sh and bench/setup_executorch.sh when missing (idempotent), and the models and data come from the packages that scripts/setup.sh installs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ["mobilenetv2", "minilm", "smollm2", "smollm2_long"]
SYSTEMS = {"pockengine", "pockengine-onnx", "eager", "torch.compile", "ort"}
# ExecuTorch trains whole tensors only: the quick sparse scheme (partial channels) is listed as not runnable for it
LORA_WORKLOADS = {"minilm", "smollm2"}
# the long-sequence workload runs system variants and leaves out the systems the others cover (bench/workloads.yaml)
QUICK_SYSTEMS = {"smollm2_long": {"pockengine", "pockengine[attention=flash]", "eager", "eager[attn=eager]"}}

# one worker runs both tests under pytest-xdist, so that the benchmark runs once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench_quick")]


@pytest.fixture(scope="module")
def environments():
    for script, venv in (("setup_ort.sh", ".venv-ort"), ("setup_executorch.sh", ".venv-executorch")):
        subprocess.run(["bash", str(REPO / "bench" / script)], check=True, cwd=REPO)
        assert (REPO / venv / "bin" / "python").exists()


@pytest.fixture(scope="module")
def quick_results(environments, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_bench_runs_every_system(quick_results):
    out, results = quick_results
    assert set(results["workloads"]) == set(WORKLOADS)
    problems = []
    for name, w in results["workloads"].items():
        systems = {r["system"] for r in w["runs"].values()}
        expected = QUICK_SYSTEMS.get(name) or SYSTEMS | ({"peft-lora"} if name in LORA_WORKLOADS else set())
        assert systems == expected, (name, systems)
        if name not in QUICK_SYSTEMS and "executorch" not in w["excluded"]:
            assert "part of some tensors' channels" in w["not_runnable"]["executorch|sparse"], name
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
