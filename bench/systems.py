"""The systems under comparison, one class each, with one interface:

    system.setup(model, loss_fn, batch, selections, workload=w)  # selections: {parameter: Selection}
    loss = system.step(batch)                                     # one training step, returns the loss

Every system gets the same model (same weights), the same batches, the same trainable set (the scheme resolved once
for all), the same optimizer (SGD, momentum 0.9, same lr; ONNX Runtime has no momentum: see OrtTraining) and the same
number of threads (set by the worker process before anything is built).

- PockEngine:   pe.compile(model, loss_fn, batch, optimizer=pe.optim.SGD(lr, momentum=0.9), scheme=...)
- PockEngineOnnx: the same compiled step exported to ONNX (trainer.export_onnx), trained by pockengine.runtime.onnx
                on onnxruntime in a child process without torch
- Eager:        requires_grad on the trained parameters only, loss.backward(), partial channels by masking the
                gradient (pockengine.scheme.gradient_masks), torch.optim.SGD
- TorchCompile: the same with the forward + loss compiled by torch.compile (AOTAutograd compiles the backward);
                masking and the optimizer step run eagerly, as in the usual torch.compile training loop
- OrtTraining:  ONNX Runtime on-device training (onnxruntime-training-cpu in .venv-ort), driven in a child process
- ExecuTorchTraining: ExecuTorch 1.5.1 training (.venv-executorch), driven in a child process; whole tensors only
- PeftLoRA:     Hugging Face PEFT LoRA adapters (its own trainable set: the "lora" scheme), eager PyTorch

A system may run as a variant with options, named `system[option=value,...]` (`make_system`): `eager[attn=eager]`
and `torch.compile[attn=eager]` run the Hugging Face model with `attn_implementation="eager"` (attention as matmuls
and softmax) instead of its default `sdpa`; `pockengine[attention=math]` / `[attention=flash]` force pockengine's
attention kernels (`pe.compile(attention=...)`; its default "auto" chooses per shape); `pockengine[backend=inductor]`
(or `[backend=auto]`) runs pockengine's finished program compiled by Inductor (`pe.compile(backend=...)`), on a GPU
replayed as CUDA graphs unless `[graphs=off]`; `torch.compile[mode=reduce-overhead]` replays torch.compile's
forward and backward as CUDA graphs;
`pockengine[upto=PASS]` runs the optional passes of pockengine's pipeline up to PASS in pipeline order and switches
off those after it (`upto=none`: none of them), the rows of the ablation (docs/benchmarks/ablation.md). A workload
lists the variants it runs beside the plain systems (`variants` in bench/workloads.yaml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import pockengine as pe
from bench.variants import parse_system
from pockengine.autodiff.rules.attention import KERNELS as ATTENTION_KERNELS
from pockengine.backend import BACKENDS, CompiledProgram
from pockengine.options import CAPTURE_PROCESSES
from pockengine.pipeline import optional_pass_names
from pockengine.scheme import Scheme, Selection, gradient_masks

REPO = Path(__file__).resolve().parents[1]
ORT_PYTHON = Path(os.environ.get("POCKENGINE_ORT_PYTHON") or REPO / ".venv-ort" / "bin" / "python")
EXECUTORCH_PYTHON = Path(os.environ.get("POCKENGINE_EXECUTORCH_PYTHON")
                         or REPO / ".venv-executorch" / "bin" / "python")
MOMENTUM = 0.9
ONNX_PREFIX = "inner.model."  # parameter names in the exported graph: _EvalWrapper.inner -> LogitsForLoss.model


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _entries(model: nn.Module, selections: dict[str, Selection]) -> int:
    """Trained entries of `selections`: whole tensors, and the trained channels of partially trained ones."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() if s.kind == "full" else params[n].numel() // params[n].shape[s.dim] * len(s.channels)
               for n, s in selections.items())


class System:
    """Base class: `setup` prepares a training step for the trainable set, `step` runs one and returns the loss."""

    name = "system"
    needs_selections = True  # False for systems with their own trainable set (LoRA)
    counts_flops = True  # FlopCounterMode can watch its step (ATen ops run in this process)
    unsupported_devices: dict[str, str] = {}  # device -> why the system cannot train there
    options: dict[str, tuple[str, ...]] = {}  # option -> its values, for variants `name[option=value]`
    environment: tuple[Path, str] | None = None  # (its Python, the script that makes that virtual environment)
    partial_channels: str | None = None  # why the system cannot train part of a tensor's channels (None: it can)

    def __init__(self, **options: str) -> None:
        self.chosen = options  # checked by make_system

    def setup(self, model: nn.Module, loss_fn: Callable, batch: Any, selections: dict[str, Selection] | None,
              **kw: Any) -> None:
        raise NotImplementedError

    def step(self, batch: Any) -> float:
        raise NotImplementedError

    def import_runtime(self) -> None:
        """Load the libraries the system needs before the model exists, so that the memory baseline holds them
        (the code of the library, not the training memory)."""

    def pid(self) -> int:
        """The process whose memory is this system's (a child process for ONNX Runtime)."""
        return os.getpid()

    def baseline_rss_kb(self) -> int | None:
        """RSS of that process before the model was built, if it is not the worker itself."""
        return None

    def trained_entries(self) -> int:
        return 0

    def persistent_tensors(self) -> list[torch.Tensor]:
        """Tensors that live across steps (weights, buffers, optimizer state): not step memory for the tracker."""
        return []

    def predicted_step_bytes(self) -> int | None:
        """The system's own prediction of its step's peak memory, if it makes one."""
        return None

    def model_bytes(self) -> int | None:
        """Size of the files the system trains from (the exported model), where it trains from files."""
        return None

    def reserved_step_bytes(self) -> int:
        """GPU memory reserved for the step's intermediates outside the allocator's counts of allocated bytes (CUDA
        graphs' private pools): step memory the measured peak does not see."""
        return 0

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


HF_ATTENTION = ("sdpa", "eager")  # Hugging Face's attn_implementation: its default, and matmuls + softmax


def _set_hf_attention(model: nn.Module, implementation: str) -> None:
    """Switch a Hugging Face model's attention to `implementation` (what `from_pretrained(...,
    attn_implementation=...)` would have loaded)."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attn={implementation} needs a Hugging Face model; {type(model).__name__} is not one")
    model.set_attn_implementation(implementation)


class _TorchLoop(System):
    """Eager PyTorch training loop with gradient masks for partially trained parameters."""

    def _prepare(self, model: nn.Module, selections: dict[str, Selection], lr: float) -> None:
        if "attn" in self.chosen:
            _set_hf_attention(model, self.chosen["attn"])
        self.model = model
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in selections)
        self.masked = [(params[n], m.to(params[n].device, params[n].dtype).contiguous())
                       for n, m in gradient_masks(model, selections).items() if m is not None]
        self.trained = [params[n] for n in selections]
        self.opt = torch.optim.SGD(self.trained, lr=lr, momentum=MOMENTUM)
        self._entries = _entries(model, selections)

    def trained_entries(self) -> int:
        return self._entries

    def persistent_tensors(self) -> list[torch.Tensor]:
        state = [t for st in self.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return [*self.model.parameters(), *self.model.buffers(), *state]

    def _finish(self, loss: torch.Tensor) -> float:
        loss.backward()
        for p, m in self.masked:
            p.grad.mul_(m)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class Eager(_TorchLoop):
    name = "eager"
    options = {"attn": HF_ATTENTION}

    def setup(self, model, loss_fn, batch, selections, *, lr, **kw):
        self.loss_fn = loss_fn
        self._prepare(model, selections, lr)

    def step(self, batch):
        inputs, target = batch
        return self._finish(self.loss_fn(_call(self.model, inputs), target))


class TorchCompile(_TorchLoop):
    name = "torch.compile"
    counts_flops = False  # the compiled kernels bypass ATen dispatch
    # mode=reduce-overhead: its forward and backward replayed as CUDA graphs (the peer of pockengine's on a GPU)
    options = {"attn": HF_ATTENTION, "mode": ("default", "reduce-overhead")}

    def import_runtime(self) -> None:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401

    def setup(self, model, loss_fn, batch, selections, *, lr, compile_threads=None, **kw):
        # --quick starts every set-up at once on a small machine: there Inductor compiles in this process
        # (compile_threads=1) instead of starting a pool of compile workers, each importing torch.
        if compile_threads is not None:
            from torch._inductor import config as inductor_config

            inductor_config.compile_threads = compile_threads
        self._prepare(model, selections, lr)
        self.fn = torch.compile(lambda inputs, target: loss_fn(_call(model, inputs), target),
                                mode=self.chosen.get("mode", "default"))

    def step(self, batch):
        inputs, target = batch
        return self._finish(self.fn(inputs, target))


class PockEngine(System):
    name = "pockengine"
    options = {"attention": ATTENTION_KERNELS, "backend": BACKENDS, "capture": CAPTURE_PROCESSES,
               "upto": ("none", *optional_pass_names()), "graphs": ("on", "off")}

    @property
    def counts_flops(self) -> bool:
        # Only the ATen backend's ops go through ATen's dispatcher; Inductor's kernels and CUDA graph replays do not.
        return isinstance(self.trainer.program(), CompiledProgram)

    def import_runtime(self) -> None:
        import torch.export  # noqa: F401  (the capture machinery: torch._dynamo)
        import torch.export._trace  # noqa: F401  (its tracer, ~700 modules the first capture imports)
        torch.export.default_decompositions()
        if self.chosen.get("backend", "aten") != "aten":
            import torch._inductor.compile_fx  # noqa: F401

    def setup(self, model, loss_fn, batch, selections, *, lr, freeze_batchnorm=False, scheme_name="scheme", **kw):
        self.trainer = pe.compile(model, loss_fn, batch, optimizer=pe.optim.SGD(lr=lr, momentum=MOMENTUM),
                                  scheme=Scheme.from_resolved(selections, scheme_name),
                                  freeze_batchnorm=freeze_batchnorm, attention=self.chosen.get("attention", "auto"),
                                  backend=self.chosen.get("backend", "aten"), disable=self._disabled_passes(),
                                  cuda_graphs=self.chosen.get("graphs", "on") == "on",
                                  capture_process=self.chosen.get("capture", "same"),
                                  # set-up measured cold: torch.export runs in every process (a warm compile reads
                                  # the capture cache: python -m bench.compile_time)
                                  capture_cache=False)
        self._entries = _entries(model, self.trainer.trained)

    def _disabled_passes(self) -> set[str]:
        """The optional passes after `upto` in pipeline order (all with `upto=none`; none without the option)."""
        names = optional_pass_names()
        upto = self.chosen.get("upto")
        if upto is None:
            return set()
        return set(names) if upto == "none" else set(names[names.index(upto) + 1:])

    def trained_entries(self) -> int:
        return self._entries

    def persistent_tensors(self) -> list[torch.Tensor]:
        state = [t for st in self.trainer.state.values() for t in st.values()]
        return [*self.trainer.model.parameters(), *self.trainer.model.buffers(), *state]

    def predicted_step_bytes(self) -> int | None:
        return self.trainer.memory_plan().peak_bytes

    def reserved_step_bytes(self) -> int:
        return getattr(self.trainer.program(), "graph_pool_bytes", 0)

    def notes(self) -> list[str]:
        """The backend and the attention kernels the program runs and why (the listing's remarks and notes), one
        line per distinct choice."""
        graph = self.trainer.program().graph
        choices = Counter(note for note in graph.notes.values() if "attention" in note)
        backend = graph.remarks if "backend" in self.chosen else []
        return [*backend, *(f"{count}x {note}" for note, count in choices.items())]

    def step(self, batch):
        return self.trainer.step(batch)


class PeftLoRA(_TorchLoop):
    """LoRA adapters on the attention projections (r=8), trained with the same eager loop and optimizer."""

    name = "peft-lora"
    needs_selections = False

    def import_runtime(self) -> None:
        import peft  # noqa: F401

    def setup(self, model, loss_fn, batch, selections, *, lr, lora, **kw):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # LoRA's A matrices are drawn at random; B starts at 0
        config = LoraConfig(r=lora["r"], lora_alpha=lora.get("alpha", 2 * lora["r"]), lora_dropout=0.0,
                            target_modules=list(lora["target_modules"]), task_type=lora["task_type"])
        self.model = get_peft_model(model, config)
        self.model.eval()
        self.loss_fn = loss_fn
        self.masked = []
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.trained, lr=lr, momentum=MOMENTUM)
        self._entries = sum(p.numel() for p in self.trained)

    def step(self, batch):
        inputs, target = batch
        return self._finish(self.loss_fn(_call(self.model, inputs), target))


class ChildProcess(System):
    """A system whose steps run in a child process (another virtual environment, or a process without torch),
    speaking bench/child.py's protocol: its memory is that process's, from the RSS it had with its runtime loaded.
    The worker process prepares the files the child reads (model, batches) in `work_dir` and starts it."""

    counts_flops = False  # the child's kernels are out of this process's sight

    def _start(self, python: Path, script: str, work: Path, spec: dict[str, Any]) -> None:
        if not python.exists():
            raise RuntimeError(f"{python} is missing: run {self.environment[1]}")
        (work / "spec.json").write_text(json.dumps(spec))
        self._log = work / "child_stderr.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.child = subprocess.Popen([str(python), str(Path(__file__).with_name(script)), str(work / "spec.json")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self._log, "w"),
                                      text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.child.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} child process exited: {self._log.read_text()[-3000:]}")
            if line.startswith("@@"):
                msg = json.loads(line[2:])
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg

    def _ask(self, **msg: Any) -> dict[str, Any]:
        self.child.stdin.write(json.dumps(msg) + "\n")
        self.child.stdin.flush()
        return self._read()

    def _save_batches(self, work: Path, batches: list, arrays: Callable[[Any], dict[str, Any]]) -> None:
        """The workload's batches as work/batches.npz, `<i>/<name>` for the arrays `arrays(batch)` gives."""
        import numpy as np

        self.batches = batches
        np.savez(work / "batches.npz", **{f"{i}/{name}": a for i, b in enumerate(batches)
                                          for name, a in arrays(b).items()})

    def step(self, batch):
        index = next(i for i, b in enumerate(self.batches) if b is batch)
        return self._ask(cmd="step", batch=index)["loss"]

    def pid(self) -> int:
        return self.child.pid

    def baseline_rss_kb(self) -> int | None:
        return self.info["baseline_rss_kb"]

    def trained_entries(self) -> int:
        return self._entries

    def setup_parts(self) -> dict[str, float]:
        return {"export_s": self.export_s, **{k: v for k, v in self.info.items() if k.endswith("_s")}}

    def model_bytes(self) -> int | None:
        return self.info.get("model_bytes")

    def close(self) -> None:
        if getattr(self, "child", None) and self.child.poll() is None:
            try:
                self._ask(cmd="quit")
            except Exception:
                pass
            self.child.wait(timeout=30)


class PockEngineOnnx(ChildProcess):
    """pockengine's compiled step exported as one ONNX model (`trainer.export_onnx`: the same scheme and optimizer as
    the `pockengine` system, partial channels as trained slices) and trained by pockengine.runtime.onnx on
    onnxruntime in a child process that imports no torch (bench/onnx_worker.py), with its I/O binding. Set-up time
    is compile + export + onnxruntime's session; the model file is the .onnx (with external data, if any) and its
    .init.safetensors."""

    name = "pockengine-onnx"
    unsupported_devices = {"cuda": "the ONNX runner is measured on onnxruntime's CPU execution provider"}

    def import_runtime(self) -> None:
        PockEngine().import_runtime()
        import onnxscript  # noqa: F401
        import torch.onnx._internal.exporter._core  # noqa: F401  (the exporter, imported lazily by torch.onnx)

    def setup(self, model, loss_fn, batch, selections, *, lr, workload, work_dir, threads, reuse=False, **kw):
        from pockengine.backend.onnx_export import batch_arrays
        from pockengine.runtime import init_path

        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        path = work / "step.onnx"
        self._entries = _entries(model, selections)
        start = time.perf_counter()
        # The memory pass reuses the timing pass's export (set-up time is taken in the timing pass).
        if not (reuse and path.exists()):
            compiled = PockEngine()
            compiled.setup(model, loss_fn, batch, selections, lr=lr, **kw)
            compiled.trainer.export_onnx(path)
            del compiled
        self.export_s = time.perf_counter() - start
        self._save_batches(work, workload.batches, batch_arrays)
        self._start(Path(sys.executable), "onnx_worker.py", work,
                    {"model": str(path), "lr": lr, "threads": threads, "n_batches": len(workload.batches)})
        self.info["model_bytes"] = sum(f.stat().st_size for f in (path, init_path(path), Path(f"{path}.data"))
                                       if f.exists())


class OrtTraining(ChildProcess):
    """ONNX Runtime on-device training. This process exports the model to ONNX (TorchScript exporter, training
    mode, no constant folding) with the frozen parameters listed; a child process in .venv-ort builds the training
    artifacts (gradient graph, CrossEntropyLoss, SGD) and runs the steps (bench/ort_worker.py).

    ONNX Runtime trains whole tensors only; partially trained parameters are emulated by writing the untrained
    entries back after every optimizer step (same result, the copy counts in ORT's step time). Its SGD optimizer
    has no momentum (the other systems use 0.9), so its update does slightly less work. The model file is what
    training needs: the training and optimizer models and the checkpoint.
    """

    name = "ort"
    environment = (ORT_PYTHON, "bench/setup_ort.sh")
    unsupported_devices = {"cuda": "ONNX Runtime training is installed as its CPU build (onnxruntime-training-cpu, "
                                   "bench/setup_ort.sh)"}

    def setup(self, model, loss_fn, batch, selections, *, lr, workload, work_dir, threads, reuse=False, **kw):
        import numpy as np

        from bench.workloads import LogitsForLoss, causal

        w = workload
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        onnx_path = work / "model.onnx"
        frozen_bn = _freeze_batchnorm(model)
        wrapper = _EvalWrapper(LogitsForLoss(model, w.input_names, causal(w)))
        params = dict(model.named_parameters())
        start = time.perf_counter()
        args = tuple(w.flat_inputs(batch[0]))
        # The memory pass reuses the timing pass's export and artifacts (set-up time is taken in the timing pass).
        reuse = reuse and (work / "artifacts" / "training_model.onnx").exists()
        if not reuse:
            torch.onnx.export(wrapper, args, str(onnx_path), input_names=list(w.input_names), output_names=["logits"],
                              training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                              dynamo=False, opset_version=17)
        self.export_s = time.perf_counter() - start
        self._save_batches(work, w.batches, lambda b: {**dict(zip(w.input_names, (t.numpy() for t in
                                                                                  w.flat_inputs(b[0])))),
                                                       "labels": w.label_fn(b[1]).numpy()})
        masks = {f"{ONNX_PREFIX}{n}": m.numpy() for n, m in gradient_masks(model, selections).items() if m is not None}
        np.savez(work / "masks.npz", **masks)
        self._entries = _entries(model, selections)
        self._start(ORT_PYTHON, "ort_worker.py", work,
                    {"onnx": str(onnx_path), "artifacts": str(work / "artifacts"), "lr": lr, "threads": threads,
                     "reuse_artifacts": reuse, "requires_grad": [f"{ONNX_PREFIX}{n}" for n in selections],
                     "frozen": [f"{ONNX_PREFIX}{n}" for n in params if n not in selections],
                     "input_names": list(w.input_names), "n_batches": len(w.batches)})
        self._notes = list(self.info.get("notes", []))
        if masks:
            self._notes.append("partial channels emulated: untrained entries written back after each step")
        if frozen_bn:
            self._notes.append(f"{frozen_bn} BatchNorm layers exported in their frozen affine form (ORT training "
                               "runs every BatchNormalization on batch statistics)")

    def notes(self) -> list[str]:
        return self._notes + ["SGD without momentum (ONNX Runtime training offers SGD and AdamW only)"]


class ExecuTorchTraining(ChildProcess):
    """ExecuTorch 1.5.1 on-device training (its training extension, `executorch.extension.training`), in
    .venv-executorch (bench/setup_executorch.sh). This process exports the model with its cross-entropy loss by
    torch.export, with `requires_grad` on the trained parameters only (how ExecuTorch chooses what it trains); a
    child process lowers it (bench/executorch_worker.py: `_export_forward_backward`, `to_edge(...).to_executorch()`)
    and trains on ExecuTorch's portable CPU kernels with its SGD optimizer (momentum 0.9, as the others). A Hugging
    Face model runs its eager attention (matmuls and softmax): ExecuTorch has no kernel for the backward of the CPU
    flash attention that sdpa lowers to. The model file is the .pte program (weights inside). Set-up time is export +
    lowering + loading."""

    name = "executorch"
    environment = (EXECUTORCH_PYTHON, "bench/setup_executorch.sh")
    unsupported_devices = {"cuda": "ExecuTorch's training runs on its portable CPU kernels"}
    partial_channels = ("ExecuTorch trains whole tensors, chosen by `requires_grad`; it cannot train a fraction of a "
                        "tensor's channels (masking the gradient would need the optimizer's update, which it keeps "
                        "inside its own SGD)")

    def import_runtime(self) -> None:
        import torch.export  # noqa: F401

    def setup(self, model, loss_fn, batch, selections, *, lr, workload, work_dir, threads, reuse=False, **kw):
        from bench.workloads import LogitsForLoss, causal

        w = workload
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        program = work / "model.pt2"
        self._entries = _entries(model, selections)
        start = time.perf_counter()
        # The memory pass reuses the timing pass's program (set-up time is taken in the timing pass).
        reuse = reuse and (work / "model.pte").exists()
        # Hugging Face's sdpa attention: the joint program calls the CPU flash attention's backward, for which
        # ExecuTorch has no kernel ("Missing out variants"); the eager attention computes the same function
        self._eager_attention = hasattr(model, "set_attn_implementation")
        if self._eager_attention:
            model.set_attn_implementation("eager")
        if not reuse:
            for name, p in model.named_parameters():
                p.requires_grad_(name in selections)
            loss = _CrossEntropyOfLogits(LogitsForLoss(model, w.input_names, causal(w)))
            args = (*w.flat_inputs(batch[0]), w.label_fn(batch[1]))
            torch.export.save(torch.export.export(loss, args, strict=False), str(program))
        self.export_s = time.perf_counter() - start
        self._save_batches(work, w.batches, lambda b: {**dict(zip(w.input_names, (t.numpy() for t in
                                                                                  w.flat_inputs(b[0])))),
                                                       "labels": w.label_fn(b[1]).numpy()})
        self._start(EXECUTORCH_PYTHON, "executorch_worker.py", work,
                    {"program": str(program), "lr": lr, "momentum": MOMENTUM, "reuse": reuse,
                     "input_names": list(w.input_names), "n_batches": len(w.batches)})

    def notes(self) -> list[str]:
        attention = (["Hugging Face's eager attention (matmuls and softmax): ExecuTorch has no kernel for the "
                      "backward of PyTorch's CPU flash attention, which sdpa's program needs"]
                     if self._eager_attention else [])
        return attention + ["one thread: ExecuTorch's CPU kernels (its pip build's portable and optimized kernels; "
                            "training delegates nothing to XNNPACK) ran on the calling thread, its other threads idle "
                            "(the others use 2 threads)"]


class _CrossEntropyOfLogits(nn.Module):
    """The mean cross-entropy of a LogitsForLoss model: the loss as the exported program's only output, which
    ExecuTorch's joint forward-backward program differentiates."""

    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        *inputs, labels = args
        return nn.functional.cross_entropy(self.logits(*inputs), labels)


class _FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm written as x * scale + shift, with the same parameters and buffers (same names)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


def _freeze_batchnorm(model: nn.Module) -> int:
    """Swap every eval-mode BatchNorm of `model` for _FrozenBatchNorm; returns how many."""
    swaps = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.affine]
    for name, m in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _FrozenBatchNorm(m))
    return len(swaps)


class _EvalWrapper(nn.Module):
    """Keeps the model in eval mode (dropout off, BatchNorm on its running statistics) while torch.onnx.export
    asks for training mode, so that the exported graph computes what the other systems compute."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> _EvalWrapper:
        return self

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(*args)


SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (PockEngine, PockEngineOnnx, Eager, TorchCompile,
                                                                OrtTraining, ExecuTorchTraining, PeftLoRA)}
def make_system(spec: str) -> System:
    """The system `spec` names (`parse_system`), its options checked against what the system offers."""
    base, chosen = parse_system(spec)
    if base not in SYSTEMS:
        raise ValueError(f"system {spec!r}: no system {base!r}; the systems are {sorted(SYSTEMS)}")
    cls = SYSTEMS[base]
    for option, value in chosen.items():
        if value not in cls.options.get(option, ()):
            offered = ", ".join(f"{k}={'|'.join(v)}" for k, v in cls.options.items()) or "none"
            raise ValueError(f"system {spec!r}: {base} has no option {option}={value}; its options: {offered}")
    return cls(**chosen)
