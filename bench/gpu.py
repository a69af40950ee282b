"""The benchmark on a CUDA device: exact fp32 for every system, step times fenced by synchronization, step memory
from the caching allocator, and the GPU's description for the report.

On the CPU a step's memory is read from the resident set of a process run alone (memory.py). On a GPU the caching
allocator counts the bytes of every live tensor of its own process, so the timing processes themselves measure it:
`begin_memory` after the set-up's first step, `end_memory` after the last round of steps (figures in
results.json, arithmetic in report.training_mb and report.step_mb).
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch

UNAVAILABLE = ("--device cuda: torch.cuda.is_available() is False (torch {torch}, built for CUDA {cuda}); run on a "
               "machine with an NVIDIA GPU and a CUDA build of torch, or leave --device out for the CPU benchmark")


def unavailable_message() -> str | None:
    """Why the CUDA benchmark cannot run here, or None when it can."""
    if torch.cuda.is_available():
        return None
    return UNAVAILABLE.format(torch=torch.__version__, cuda=torch.version.cuda)


def strict_fp32() -> None:
    """No TensorFloat-32: cuDNN convolutions default to it and cuBLAS matrix multiplies do not, so without this a
    1x1 convolution would round differently in eager (cuDNN) and in pockengine (addmm), and "fp32" would not be."""
    # The legacy flags: torch 2.11 and 2.13 both honour them, and setting only some of the newer per-operator
    # fp32_precision flags makes the legacy getters, which libraries still read, raise.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def synchronize(device: str) -> None:
    """Wait for the kernels queued on `device` (nothing to wait for on the CPU), so a step's time is its work."""
    if device == "cuda":
        torch.cuda.synchronize()


def begin_memory() -> dict[str, int]:
    """The peak of allocated bytes so far (set-up included), then a fresh peak from the bytes allocated now."""
    torch.cuda.synchronize()
    setup_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_setup_peak_bytes": setup_peak, "cuda_before_bytes": torch.cuda.memory_allocated()}


def end_memory() -> dict[str, int]:
    """The peak of allocated bytes since `begin_memory`."""
    torch.cuda.synchronize()
    return {"cuda_peak_bytes": torch.cuda.max_memory_allocated()}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_info() -> dict[str, Any]:
    """What the report says about the GPU: name, memory, CUDA and cuDNN versions of torch, the driver."""
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gb": round(props.total_memory / 2 ** 30, 1),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": _driver()}
