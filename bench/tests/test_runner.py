"""The benchmark's parts without a full run: its configuration, its command line, the worker processes and how
their failures reach the runner, and the systems that cannot run on a workload or device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_schemes_resolve_and_match_the_config():
    """Every scheme of bench/schemes.yaml is a valid pockengine.Scheme for its workload's modules."""
    from bench.workloads import load_config, scheme_for

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


@pytest.mark.slow  # a worker process preloads torch, Inductor, transformers and peft
def test_worker_error_reaches_the_runner_with_its_message(tmp_path):
    from bench.runner import Worker, WorkerError

    w = Worker(_job(tmp_path, "no-such-system"), tmp_path / "worker.log")
    with pytest.raises(WorkerError, match="no-such-system"):
        w.read(timeout=300)
    assert "Traceback" in (tmp_path / "worker.log").read_text()
    assert not w.proc.is_alive()


@pytest.mark.slow  # a worker process preloads torch, Inductor, transformers and peft
def test_worker_that_dies_is_reported_not_awaited(tmp_path):
    from bench import worker, workloads
    from bench.runner import Worker, WorkerError

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
    from bench.systems import TorchCompile

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

    from bench.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--workload", "mobilenetv2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch.cuda.is_available() is False" in err and "NVIDIA GPU" in err


def test_systems_that_cannot_run_are_listed_with_why():
    from bench.cli import SYSTEMS as ALL
    from bench.runner import excluded

    cuda = excluded(workload_config("mobilenetv2"), ALL, "cuda")
    assert set(cuda) == {"ort", "peft-lora"}
    assert "CPU build" in cuda["ort"] and "no LoRA configuration" in cuda["peft-lora"]
    assert set(excluded(workload_config("mobilenetv2"), ALL, "cpu")) == {"peft-lora"}
    assert excluded(workload_config("minilm"), ALL, "cpu") == {}
    assert excluded(workload_config("minilm"), ["eager"], "cuda") == {}


def workload_config(name):
    from bench.workloads import workload_config as config

    return config(name, False)


def test_python_m_bench_runs_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench") and "--workload" in proc.stdout


def test_unknown_workload_or_bad_steps_exit_2_naming_the_choices(capsys):
    from bench.cli import main

    assert main(["--workload", "resnet"]) == 2
    assert "unknown workload or system ['resnet']" in capsys.readouterr().err
    assert main(["--workload", "minilm", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
