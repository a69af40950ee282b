"""The compile options, in one frozen object: `compile(**options)`, `Trainer`, checkpoints and the CLI share it.

Each option is validated once, here, with an error that names the allowed values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pockengine.autodiff.rules.attention import KERNELS as ATTENTION_KERNELS
from pockengine.backend.choice import BACKENDS
from pockengine.errors import UserInputError
from pockengine.passes.activation_masks import MODES as MASK_MODES

MEMORY_FORMATS = ("auto", "channels_last", "preserve")
ON_NONFINITE = ("raise", "skip")
CAPTURE_PROCESSES = ("same", "fork")


def _check_from_environment() -> bool:
    return os.environ.get("POCKENGINE_CHECK", "") not in ("", "0")


def _backend_from_environment() -> str:
    # Lets a whole test suite run on another backend (POCKENGINE_BACKEND=inductor pytest tests/test_model_parity.py).
    return os.environ.get("POCKENGINE_BACKEND") or "aten"


def _capture_cache_from_environment() -> bool:
    return os.environ.get("POCKENGINE_CAPTURE_CACHE", "1").strip() != "0"


@dataclass(frozen=True)
class Options:
    """How a training step is compiled and run.

    freeze_batchnorm: put BatchNorm layers in eval mode (frozen statistics, the usual fine-tuning setting);
        otherwise every module keeps its mode.
    on_nonfinite: "raise" (NonFiniteLossError, nothing changed) or "skip" (the step is skipped, returns nan).
    seed: seeds the trainer's generator, which every random op of the program draws from (dropout, drop-path).
    activation_masks: how ReLU-like layers remember where they passed the gradient when their output is not saved
        for anything else: "bits" (1 bit per element) or "off" (the fp32 activation).
    memory_format: "auto" runs models with 2-d convolutions in channels-last layout (their 4-d weights are
        converted in place, values unchanged), "channels_last" forces it, "preserve" keeps the model's layout.
    frozen_chunks: the frozen layers before the earliest trained one run in this many micro-batches ("auto": on
        the CPU as many as it takes for them not to set the step's peak memory, on a GPU 1; 1: whole batch).
    attention: the kernels of scaled dot-product attention: "auto" times the math form and the fused flash kernels
        on each shape and runs math only where it is clearly faster (it keeps the probabilities for the backward
        pass), "math" or "flash" forces one (flash falls back to math where it cannot run; the listing says why).
    backend: what runs the finished program: "aten" (pockengine's generated ATen calls, one op at a time),
        "inductor" (the same program compiled by Inductor into fused kernels: the first compile of a shape takes
        seconds to minutes, a warm one reads Inductor's cache), or "auto" (both compiled and timed on this machine,
        the faster kept; the choice is cached on disk). Programs that draw random numbers run on "aten" (the
        listing says why). Default: the POCKENGINE_BACKEND environment variable, else "aten". See
        pockengine/backend/choice.py.
    cuda_graphs: on a GPU, a program on the Inductor backend is captured as CUDA graphs once and replayed at every
        step (a launch per region instead of one per kernel; its intermediates keep a reserved memory pool:
        MobileNetV2 on an H200, 0.18-0.23x eager's step time for 1.0-2.7x its step memory, docs/benchmarks/cuda);
        False launches its kernels one by one. Default: True. No effect on the CPU or on the "aten" backend. See
        pockengine/backend/cuda_graphs.py.
    disable: names of passes of `pockengine.pipeline.PASSES` to leave out (debugging, measuring one pass).
    check: check the graph's invariants after every pass (`Graph.lint`); default: the POCKENGINE_CHECK
        environment variable (set, and not 0).
    capture_process: "same" (torch.export runs in this process) or "fork" (in a forked child that sends back
        pockengine's IR: the export's garbage never fragments this process's heap, ~12 MB less resident memory for
        MobileNetV2; where it cannot, in this process: see pockengine/capture/child.py).
    capture_cache: keep each capture (pockengine's IR of the model and loss, without the weights) in the cache
        folder (`$POCKENGINE_CACHE/capture`, at most 256 MB, least recently used entries removed), keyed by the
        model's code and structure, the loss, the batch's shapes and the versions; a compile of the same model in
        another process reads it instead of running torch.export and importing its tracer (MobileNetV2 on 2 cores: the
        compile takes 0.9 CPU-s instead of 2.4; docs/benchmarks/compile-time). Checksummed: a damaged
        or stale entry is captured again. Default: on, unless the POCKENGINE_CAPTURE_CACHE environment variable is
        0. What is not cached (custom autograd.Functions, ...): pockengine/capture/cache.py.
    """

    freeze_batchnorm: bool = False
    on_nonfinite: str = "raise"
    seed: int = 0
    activation_masks: str = "bits"
    memory_format: str = "auto"
    frozen_chunks: int | str = "auto"
    attention: str = "auto"
    backend: str = field(default_factory=_backend_from_environment)
    cuda_graphs: bool = True
    disable: frozenset[str] = frozenset()
    check: bool = field(default_factory=_check_from_environment)
    capture_process: str = "same"
    capture_cache: bool = field(default_factory=_capture_cache_from_environment)

    def __post_init__(self) -> None:
        from pockengine.pipeline import optional_pass_names

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise UserInputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        one_of("on_nonfinite", ON_NONFINITE)
        one_of("activation_masks", MASK_MODES)
        one_of("memory_format", MEMORY_FORMATS)
        one_of("attention", ATTENTION_KERNELS)
        one_of("backend", BACKENDS)
        one_of("capture_process", CAPTURE_PROCESSES)
        chunks = self.frozen_chunks
        if not (chunks == "auto" or isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1):
            raise UserInputError(f"frozen_chunks must be 'auto' or an integer >= 1, got {chunks!r}")
        for name in ("freeze_batchnorm", "check", "capture_cache", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 64:
            raise UserInputError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.disable, str):
            raise UserInputError(f"disable takes a set of pass names, got the string {self.disable!r}; write "
                                 f"disable={{{self.disable!r}}}")
        disable = frozenset(self.disable)
        valid = optional_pass_names()
        unknown = sorted(disable - set(valid))
        if unknown:
            raise UserInputError(f"disable: no pass can be switched off under the name(s) {unknown}; the passes "
                                 f"are {list(valid)} (see pockengine.pipeline.PASSES)")
        object.__setattr__(self, "disable", disable)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> Options:
        """Options from keyword arguments or a checkpoint's JSON dict; an unknown name is an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UserInputError(f"unknown option(s) {unknown}; the options are {names}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; `Options.from_dict` reads it back."""
        values = dataclasses.asdict(self)
        values["disable"] = sorted(self.disable)
        return values
