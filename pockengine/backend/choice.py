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


def cache_key(graph: Graph, examples: list[Any], device: torch.device) -> tuple[str, dict[str, Any]]:
    """The key of a program's backend choice, and what it is made of (recorded in the entry for a reader)."""
    fields = {
        "torch": torch.__version__, "pockengine": _pockengine_version(), "python": platform.python_version(),
        "machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": str(device) + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    }
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


def _seconds_per_call(program: Any, args: list[Any]) -> float:
    program(*args)  # warm-up: first-call allocations, lazy initialization
    times: list[float] = []
    while len(times) < 3 or (sum(times) < MEASURE_SECONDS and len(times) < 50):
        start = time.perf_counter()
        program(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(programs: dict[str, Any], graph: Graph, inputs: list[Node], examples: list[Any]) -> dict[str, float]:
    written = written_inputs(graph)
    seconds = {}
    with torch.no_grad():
        for name, program in programs.items():
            args = [v.clone() if n in written else v for n, v in zip(inputs, examples)]
            seconds[name] = _seconds_per_call(program, args)
    return seconds


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
           examples: list[Any], setting: str, device: torch.device) -> tuple[Any, Choice]:
    """The program compiled on the backend `setting` asks for ("aten", "inductor", "auto"; see the module's
    docstring), and the choice made. `examples` are values of `inputs` the program can run on (not written)."""
    aten_program = CompiledProgram(graph, inputs, check_finite, generator=generator)
    if setting == "aten":
        return aten_program, Choice("aten", "backend: aten (backend='aten')")
    refusal = inductor_refusal(graph)
    if refusal is not None:
        return aten_program, Choice("aten", f"backend: aten (Inductor cannot run this program: {refusal})")
    if setting == "inductor":
        try:
            program = InductorProgram(graph, inputs, check_finite, examples)
        except Exception as e:
            raise CompilerError(f"Inductor could not compile the program ({type(e).__name__}: {e}); compile with "
                                "backend='aten' (or 'auto', which falls back to it)") from e
        return program, Choice("inductor", "backend: inductor (backend='inductor')")
    key, fields = cache_key(graph, examples, device)
    path = cache_dir() / "backend" / f"{key}.json"
    compiled: dict[str, Any] = {}
    failure: dict[str, str] = {}

    def measure(tmp: os.PathLike) -> None:
        try:
            compiled["inductor"] = InductorProgram(graph, inputs, check_finite, examples)
        except Exception as e:  # an op Inductor cannot lower: recorded, so the next compile does not try again
            failure["inductor"] = f"{type(e).__name__}: {str(e)[:300]}"
        seconds = {"aten": float("inf"), "inductor": float("inf")}
        try:
            seconds.update(_measure({"aten": aten_program, **compiled}, graph, inputs, examples))
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
    reason = (_describe(entry["seconds"], entry["backend"], how) if entry.get("inductor_error") is None else
              f"backend: aten (auto, {how}: Inductor could not compile it: {entry['inductor_error']})")
    choice = Choice(entry["backend"], reason, entry["seconds"])
    if choice.backend == "aten":
        return aten_program, choice
    return compiled.get("inductor") or InductorProgram(graph, inputs, check_finite, examples), choice
