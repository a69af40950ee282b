"""Which backend runs a program: the generated ATen calls (`torch_codegen`), Inductor (`inductor`), or the faster
of the two on this machine (`backend="auto"`).

`auto` compiles the program both ways and times each on the program's own inputs: the example batch, the
trainer's frozen tensors, and copies of every input the program writes (trained parameters, optimizer state,
BatchNorm statistics), so measuring trains nothing. Inductor must be 5% faster to be chosen: its compile is the
dearer one to repeat, and measurements that close are noise on a loaded machine. The choice and both times are
cached on disk (`cache_dir()/backend/<key>.json`, checksummed by `pockengine.storage`), keyed by the program's
listing (its ops, shapes and dtypes), its inputs' strides, the machine (CPU model, threads, device) and the library
versions; an entry that fails its checksum, is unreadable, or was written for another key is measured again, never
trusted. Inductor's compiled code has its own cache (Inductor's FX graph cache and AOTAutograd's, on by default),
so a warm second compile of the same program skips both the measurement and Inductor's code generation.

On a GPU the Inductor program is replayed as CUDA graphs where `cuda_graphs` is on (pockengine/backend/
cuda_graphs.py); `auto` times it that way. On a GPU every timed call is fenced by a synchronization.

The listing (`print(trainer.program().graph)`) and `trainer.summary()` say which backend runs and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from pockengine.backend.cuda_graphs import CudaGraphProgram
from pockengine.backend.inductor import InductorProgram, inductor_refusal
from pockengine.backend.torch_codegen import CompiledProgram
from pockengine.errors import CompilerError, NonFiniteLossError
from pockengine.ir.graph import Graph, Node
from pockengine.ir.ops import is_mutating, is_view
from pockengine.storage import cache_dir, cached_file

BACKENDS = ("aten", "inductor", "auto")
CACHE_FORMAT = 1
INDUCTOR_MARGIN = 0.95  # Inductor runs when its step takes at most this fraction of the ATen backend's
MEASURE_SECONDS = 0.3  # per backend: calls are repeated until this much time is spent (at least 3, at most 50)


@dataclass(frozen=True)
class Choice:
    """The backend a program runs on, and why (a line of the listing)."""

    backend: str  # "aten" or "inductor"
    reason: str
    seconds: dict[str, float] | None = None  # measured step times by backend, when measured


def _pockengine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pockengine")
    except PackageNotFoundError:
        return "source"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _program_text(graph: Graph) -> str:
    """The program's ops, shapes and dtypes, without the listing's notes (they carry times measured at compile
    time, such as the attention kernels')."""
    def arg(a: Any) -> str:
        if isinstance(a, Node):
            return f"%{a.name}"
        if isinstance(a, torch.Tensor):
            return f"tensor({a.dtype}, {list(a.shape)})"
        if isinstance(a, (list, tuple)):
            return f"[{', '.join(arg(x) for x in a)}]"
        return repr(a)

    lines = [f"%{n.name} = {n.role}" if n.is_input else
             f"%{n.name} = {n.op_name}({arg(list(n.args))}, {arg([f'{k}={arg(v)}' for k, v in n.kwargs.items()])})"
             f" {n.meta}" for n in graph.nodes]
    lines += [f"{k} = %{v.name}" for k, v in graph.outputs.items()]
    return "\n".join(lines)


def cache_key(graph: Graph, examples: list[Any], device: torch.device, cuda_graphs: bool = False
              ) -> tuple[str, dict[str, Any]]:
    """The key of a program's backend choice, and what it is made of (recorded in the entry for a reader)."""
    fields = {
        "torch": torch.__version__, "pockengine": _pockengine_version(), "python": platform.python_version(),
        "machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": str(device) + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    }
    if device.type == "cuda":
        fields["cuda_graphs"] = cuda_graphs
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(_program_text(graph).encode())
    digest.update(repr([(tuple(v.stride()), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else type(v)
                        for v in examples]).encode())
    return digest.hexdigest(), fields


def written_inputs(graph: Graph) -> set[Node]:
    """The inputs the program writes in place (directly or through views of them)."""
    written: set[Node] = set()
    for n in graph.nodes:
        if n.is_input or not is_mutating(n.target):
            continue
        for arg, value in zip(n.target._schema.arguments, n.args):
            while isinstance(value, Node) and not value.is_input and is_view(value.target):
                value = value.args[0]
            if isinstance(value, Node) and value.is_input and arg.alias_info is not None and arg.alias_info.is_write:
                written.add(value)
    return written


def _seconds_per_call(program: Any, args: list[Any], device: torch.device) -> float:
    def call() -> None:
        program(*args)
        if device.type == "cuda":  # a GPU runs the call's kernels after it returns
            torch.cuda.synchronize(device)

    call()  # warm-up: first-call allocations, lazy initialization
    times: list[float] = []
    while len(times) < 3 or (sum(times) < MEASURE_SECONDS and len(times) < 50):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _scratch(graph: Graph, inputs: list[Node], examples: list[Any]) -> list[Any]:
    """`examples` with a copy of every input the program writes: calls on them train nothing."""
    written = written_inputs(graph)
    return [v.clone() if n in written else v for n, v in zip(inputs, examples)]


def _measure(calls: dict[str, tuple[Any, list[Any]]], device: torch.device) -> dict[str, float]:
    """Seconds per call of each program on its arguments, by backend."""
    with torch.no_grad():
        return {name: _seconds_per_call(program, args, device) for name, (program, args) in calls.items()}


def _inductor(graph: Graph, inputs: list[Node], check_finite: Node | None, examples: list[Any],
              device: torch.device, cuda_graphs: bool) -> InductorProgram | CudaGraphProgram:
    """The program compiled by Inductor, on a GPU replayed as CUDA graphs captured on `examples` (unless
    `cuda_graphs` is False)."""
    program = InductorProgram(graph, inputs, check_finite, examples, device)
    if device.type == "cuda" and cuda_graphs:
        return CudaGraphProgram(program, examples, written_inputs(graph))
    return program


def _named(backend: str, program: Any) -> str:
    return f"{backend}, CUDA graphs" if isinstance(program, CudaGraphProgram) else backend


def _read_entry(path: os.PathLike, key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(open(path).read())
        if (entry.get("format") == CACHE_FORMAT and entry.get("key") == key and entry.get("backend") in
                ("aten", "inductor") and all(isinstance(entry["seconds"][b], float) for b in ("aten", "inductor"))):
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _describe(seconds: dict[str, float], backend: str, how: str) -> str:
    times = ", ".join(f"{b} {seconds[b] * 1e3:.3g} ms" for b in ("aten", "inductor") if seconds[b] != float("inf"))
    return f"backend: {backend} (auto, {how}: {times + ' per call' if times else 'no finite loss to time'})"


def select(graph: Graph, inputs: list[Node], check_finite: Node | None, generator: torch.Generator | None,
           examples: list[Any], setting: str, device: torch.device, cuda_graphs: bool = False
           ) -> tuple[Any, Choice]:
    """The program compiled on the backend `setting` asks for ("aten", "inductor", "auto"; see the module's
    docstring), and the choice made. `examples` are values of `inputs` the program can run on (not written): the
    trainer's bound tensors, which CUDA graphs keep the addresses of. `cuda_graphs`: on a GPU, replay the Inductor
    program as CUDA graphs."""
    aten_program = CompiledProgram(graph, inputs, check_finite, generator=generator)
    if setting == "aten":
        return aten_program, Choice("aten", "backend: aten (backend='aten')")
    refusal = inductor_refusal(graph)
    if refusal is not None:
        return aten_program, Choice("aten", f"backend: aten (Inductor cannot run this program: {refusal})")
    if setting == "inductor":
        try:
            program = _inductor(graph, inputs, check_finite, examples, device, cuda_graphs)
        except Exception as e:
            raise CompilerError(f"Inductor could not compile the program ({type(e).__name__}: {e}); compile with "
                                "backend='aten' (or 'auto', which falls back to it)") from e
        return program, Choice("inductor", f"backend: {_named('inductor', program)} (backend='inductor')")
    key, fields = cache_key(graph, examples, device, cuda_graphs)
    path = cache_dir() / "backend" / f"{key}.json"
    compiled: dict[str, Any] = {}
    failure: dict[str, str] = {}

    def measure(tmp: os.PathLike) -> None:
        calls = {"aten": (aten_program, _scratch(graph, inputs, examples))}
        try:
            # Captured on copies of the inputs it writes (a CUDA graph keeps the addresses it was captured with),
            # so the timing trains nothing; the program that runs is captured again on the trainer's tensors.
            scratch = _scratch(graph, inputs, examples)
            compiled["inductor"] = _inductor(graph, inputs, check_finite, scratch, device, cuda_graphs)
            calls["inductor"] = (compiled["inductor"], scratch)
        except Exception as e:  # an op Inductor cannot lower: recorded, so the next compile does not try again
            failure["inductor"] = f"{type(e).__name__}: {str(e)[:300]}"
        seconds = {"aten": float("inf"), "inductor": float("inf")}
        try:
            seconds.update(_measure(calls, device))
        except NonFiniteLossError:  # the example batch gives no finite loss: nothing to compare, keep ATen
            pass
        backend = "inductor" if seconds["inductor"] <= INDUCTOR_MARGIN * seconds["aten"] else "aten"
        with open(tmp, "w") as f:
            json.dump({"format": CACHE_FORMAT, "key": key, "fields": fields, "backend": backend, "seconds": seconds,
                       "inductor_error": failure.get("inductor"),
                       "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1)

    entry = _read_entry(cached_file(path, measure, "backend choice"), key)
    if entry is None:  # checksum right but content not an entry for this key (another format, a collision)
        warnings.warn(f"pockengine: the cached backend choice {path} is not one for this program; measuring again",
                      RuntimeWarning, stacklevel=2)
        os.unlink(path)
        entry = _read_entry(cached_file(path, measure, "backend choice"), key)
        assert entry is not None, "a backend choice just written must read back"
    how = "measured now" if compiled or failure else f"measured {entry['measured']}, cached"
    if entry.get("inductor_error") is not None:
        return aten_program, Choice("aten", f"backend: aten (auto, {how}: Inductor could not compile it: "
                                            f"{entry['inductor_error']})", entry["seconds"])
    if entry["backend"] == "aten":
        return aten_program, Choice("aten", _describe(entry["seconds"], "aten", how), entry["seconds"])
    measured = compiled.pop("inductor", None)
    if isinstance(measured, CudaGraphProgram):
        program: Any = CudaGraphProgram(measured.program, examples, written_inputs(graph))
    else:
        program = measured or _inductor(graph, inputs, check_finite, examples, device, cuda_graphs)
    return program, Choice("inductor", _describe(entry["seconds"], _named("inductor", program), how),
                           entry["seconds"])
