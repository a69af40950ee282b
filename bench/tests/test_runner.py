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
    assert set(cuda) == {"pockengine-onnx", "ort", "executorch", "peft-lora"}
    assert "CPU build" in cuda["ort"] and "no LoRA configuration" in cuda["peft-lora"]
    assert "portable CPU kernels" in cuda["executorch"] and "CPU execution provider" in cuda["pockengine-onnx"]
    assert set(excluded(workload_config("mobilenetv2"), ALL, "cpu")) == {"peft-lora"}
    assert excluded(workload_config("minilm"), ALL, "cpu") == {}
    assert set(excluded(workload_config("smollm2"), ALL, "cpu")) == {"executorch"}
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
    assert "unknown workload ['resnet']" in capsys.readouterr().err
    assert main(["--workload", "minilm", "--systems", "eager,jax"]) == 2
    assert "no system 'jax'" in capsys.readouterr().err
    assert main(["--workload", "minilm", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_system_variants_are_named_with_options_that_the_system_offers():
    from bench.systems import Eager, PockEngine, make_system
    from bench.variants import parse_system

    assert parse_system("eager[attn=eager]") == ("eager", {"attn": "eager"})
    assert parse_system("pockengine[attention=math]") == ("pockengine", {"attention": "math"})
    assert parse_system("torch.compile") == ("torch.compile", {})
    assert isinstance(make_system("eager[attn=eager]"), Eager)
    assert make_system("pockengine[attention=flash]").chosen == {"attention": "flash"}
    with pytest.raises(ValueError, match=r"eager has no option attn=math; its options: attn=sdpa\|eager"):
        make_system("eager[attn=math]")
    with pytest.raises(ValueError, match="ort has no option attn=eager; its options: none"):
        make_system("ort[attn=eager]")
    with pytest.raises(ValueError, match=r"name\[option=value,...\]"):
        make_system("eager[attn]")


def test_the_ablation_variants_switch_off_the_passes_after_theirs():
    from bench.systems import make_system
    from pockengine.pipeline import optional_pass_names

    names = optional_pass_names()
    assert make_system("pockengine")._disabled_passes() == set()
    assert make_system("pockengine[upto=none]")._disabled_passes() == set(names)
    assert make_system(f"pockengine[upto={names[-1]}]")._disabled_passes() == set()
    assert make_system("pockengine[upto=layout]")._disabled_passes() == set(names[names.index("layout") + 1:])
    with pytest.raises(ValueError, match="pockengine has no option upto=fusion"):
        make_system("pockengine[upto=fusion]")


def test_a_workloads_variants_run_after_their_system_and_left_out_systems_are_listed():
    from bench.cli import SYSTEMS as ALL
    from bench.runner import _jobs, excluded

    cfg = workload_config("smollm2_long")
    assert [s for s, _ in _jobs(cfg, ["last4"], ["pockengine", "eager", "torch.compile"])] == [
        "pockengine", "eager", "eager[attn=eager]", "torch.compile"]
    # a variant asked for by name runs without its plain system; the workload's variants of absent systems do not
    assert _jobs(cfg, ["last4"], ["pockengine[attention=math]", "eager"]) == [
        ("pockengine[attention=math]", "last4"), ("eager", "last4"), ("eager[attn=eager]", "last4")]
    left_out = excluded(cfg, ALL, "cpu")
    assert set(left_out) == {"ort", "pockengine-onnx", "executorch", "peft-lora"}
    assert all("long-sequence workload" in left_out[s] for s in ("ort", "pockengine-onnx", "executorch"))


def test_bad_system_variant_on_the_command_line_exits_2_naming_the_options(capsys):
    from bench.cli import _systems, main

    assert _systems("eager,pockengine[attention=math,x=y]") == ["eager", "pockengine[attention=math,x=y]"]
    assert main(["--workload", "smollm2_long", "--systems", "eager[attn=flash]"]) == 2
    assert "eager has no option attn=flash" in capsys.readouterr().err


def test_eager_attention_variant_trains_the_model_with_hugging_faces_eager_attention():
    """`eager[attn=eager]` switches a Hugging Face model to attn_implementation="eager": the same function as its
    default sdpa attention (first losses agree), computed another way."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pockengine as pe
    from bench.systems import make_system

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == "sdpa"  # transformers' default, as loaded
    ids = torch.randint(0, 64, (2, 16))
    batch = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)
    selections = pe.Scheme.from_dict({"rules": [{"modules": "model.layers.1", "mode": "full"}]}).resolve(model)
    losses = {}
    for spec in ("eager", "eager[attn=eager]"):
        system = make_system(spec)
        system.setup(copy.deepcopy(model), pe.losses.causal_lm(), batch, selections, lr=0.01)
        losses[spec] = [system.step(batch) for _ in range(2)]
        assert system.model.config._attn_implementation == ("eager" if "attn" in spec else "sdpa")
    assert losses["eager[attn=eager]"][0] == pytest.approx(losses["eager"][0], rel=1e-5)
    assert losses["eager[attn=eager]"][1] < losses["eager[attn=eager]"][0]


def test_packed_reviews_fill_every_row_with_consecutive_review_tokens():
    from bench.workloads import _packed_reviews
    from pockengine.data import load_movie_reviews

    class Characters:  # a tokenizer stand-in: one token per character
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    rows = _packed_reviews(Characters(), 3, 2000)
    assert [len(r) for r in rows] == [2000] * 3
    stream: list[int] = []
    for text in load_movie_reviews("imdb")[0]:  # the reviews in file order, each ended by the end-of-text token
        stream += [ord(c) for c in text] + [0]
        if len(stream) >= 6000:
            break
    assert rows[0] + rows[1] + rows[2] == stream[:6000]
