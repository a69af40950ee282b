"""The whole process's memory for training: what the trainer holds, by kind, and the resident set around it.

`Trainer.memory_report()` counts the tensors the trainer can reach, each storage once (by the address of its data)
in the first kind it belongs to, in this order: trained weights (parameters with any trained entry), frozen weights
and buffers, optimizer state, program constants (channel indices, BatchNorm scales folded at compile time; a
constant that is a copy of a frozen weight is reported as kept twice), and what compiling keeps alive beside the
programs (the compiler residue: the kept captures, the programs' graphs, the example batch). Python objects
(graphs' nodes, generated code) are sized with `sys.getsizeof` over what they reach, stopping at shared objects
(modules, types, functions, ATen operators, nn.Modules), and tensors met on the way are counted by storage.

The planned step buffers come from the memory plan (`pockengine.memory.plan`): storage a step allocates and frees
again. The runtime overhead is measured, not estimated: the resident set now, minus the resident set of the runtime
libraries, minus every line above. It is the allocator's free but resident memory, the code pages of the libraries
that the kernels touched, oneDNN's caches, the interpreter's own growth, and whatever else the process allocated.
"""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils import _pytree as pytree

from pockengine.backend.torch_codegen import CompiledProgram
from pockengine.memory.plan import plan_memory

if TYPE_CHECKING:
    from pockengine.trainer import Trainer

MB = 2 ** 20

# Objects shared with the rest of the process: the walk of a graph's Python objects stops there.
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.MethodWrapperType, types.WrapperDescriptorType, torch.nn.Module, torch.Generator, torch.dtype,
           torch.device, OpOverload, OpOverloadPacket)


def rss_bytes() -> int | None:
    """The resident set of this process (Linux: /proc/self/status), None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage; None for tensors without data (meta, fake)."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return None
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


class StorageCounter:
    """Counts tensor storage once: a storage belongs to the first kind that claims it."""

    def __init__(self) -> None:
        self._claimed: set[int] = set()

    def unclaimed(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors whose storage no kind has claimed yet."""
        return [t for t in tensors if (key := _storage_key(t)) is not None and key[0] not in self._claimed]

    def claim(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the storages of `tensors` not claimed before (now claimed)."""
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if key is not None and key[0] not in self._claimed:
                self._claimed.add(key[0])
                total += key[1]
        return total


def python_bytes(roots: Iterable[object], seen: set[int]) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the Python objects reachable from `roots` (not in `seen`, which the walk extends, so an object is
    counted once over several calls), and the tensors met (their storage is counted apart)."""
    stack = list(roots)
    total = 0
    tensors: list[torch.Tensor] = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            continue
        if isinstance(obj, _SHARED):
            continue
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total, tensors


@dataclass(frozen=True)
class MemoryReport:
    """The memory of training in this process, by kind (bytes). `print(report)` shows it as a table."""

    trained_weights: int  # parameters with any trained entry (whole tensors)
    frozen_weights: int  # parameters nothing trains, and buffers
    frozen_kept_twice: int  # program constants that copy a frozen weight (a folded copy beside the original)
    optimizer_state: int
    program_constants: int  # tensors fixed at compile time the steps read (channel indices, folded scales)
    generated_code: int  # the programs' source and code objects: what runs a step
    step_buffers: int  # the largest planned step peak (storage allocated and freed by a step)
    compiler_residue: int  # what compiling keeps alive that no step reads: sum of `residue`
    residue: tuple[tuple[str, int], ...] = field(default=())  # its parts, one line each (the kept graphs)
    process_rss: int | None = None  # the resident set when the report was made
    baseline_rss: int | None = None  # the resident set of the runtime libraries (before the trainer's tensors)

    @property
    def predicted(self) -> int:
        """The predicted training memory above the runtime libraries: every counted line, the step's peak
        included (the runtime overhead, which only a measurement gives, excluded)."""
        return (self.trained_weights + self.frozen_weights + self.optimizer_state + self.program_constants
                + self.generated_code + self.step_buffers + self.compiler_residue)

    @property
    def runtime_overhead(self) -> int | None:
        """The measured resident set above the runtime libraries minus every counted line (negative when the step
        buffers are not resident now)."""
        if self.process_rss is None or self.baseline_rss is None:
            return None
        return self.process_rss - self.baseline_rss - self.predicted

    def lines(self) -> list[tuple[str, int | None]]:
        twice = (f" (kept twice: {self.frozen_kept_twice / MB:.2f} MB of program constants copy them)"
                 if self.frozen_kept_twice else " (none kept twice)")
        rows: list[tuple[str, int | None]] = [
            ("trained weights", self.trained_weights),
            ("frozen weights and buffers" + twice, self.frozen_weights),
            ("optimizer state", self.optimizer_state),
            ("program constants", self.program_constants),
            ("generated code", self.generated_code),
            ("planned step buffers (peak)", self.step_buffers),
            ("compiler residue", self.compiler_residue),
        ]
        rows += [(f"  {name}", value) for name, value in self.residue]
        rows += [("runtime overhead (measured RSS minus the lines above)", self.runtime_overhead),
                 ("predicted training memory above the runtime libraries", self.predicted)]
        if self.process_rss is not None and self.baseline_rss is not None:
            rows.append(("measured: RSS now minus the runtime libraries' RSS", self.process_rss - self.baseline_rss))
        return rows

    def __str__(self) -> str:
        width = max(len(name) for name, _ in self.lines())
        return "\n".join(f"{name:<{width}} {_size(value)}" for name, value in self.lines())


def _size(value: int | None) -> str:
    if value is None:
        return "not measured"
    return f"{value / MB:9.2f} MB" if abs(value) >= MB // 10 else f"{value / 1024:9.1f} KB"


def _batch_shapes(key: tuple) -> str:
    return str([list(leaf[0]) if leaf and leaf[0] != "value" else leaf[1] for leaf in key])


def memory_report(trainer: Trainer, baseline_rss: int | None) -> MemoryReport:
    """The report of `trainer` (see the module's docstring); `baseline_rss`: the runtime libraries' resident set."""
    counter = StorageCounter()
    seen: set[int] = set()
    params = dict(trainer.model.named_parameters())
    trained = counter.claim(params[name] for name in trainer.trained)
    frozen_params = [p for name, p in params.items() if name not in trainer.trained]
    frozen = counter.claim([*frozen_params, *trainer.model.buffers()])
    state = counter.claim(t for s in trainer.state.values() for t in s.values())
    weight_forms = {(tuple(p.shape), p.dtype) for p in frozen_params if p.dim() >= 2}
    constants = counter.unclaimed(t for built in trainer._programs.values() for t in built.static.values())
    kept_twice = StorageCounter().claim(t for t in constants if (tuple(t.shape), t.dtype) in weight_forms)
    program_constants = counter.claim(constants)

    code = 0
    for built in trainer._programs.values():
        program = built.program
        parts = [program.source, program.fn.__code__] if isinstance(program, CompiledProgram) else [
            getattr(program, "regions", [])]
        size, tensors = python_bytes(parts, seen)
        code += size + counter.claim(tensors)

    residue: list[tuple[str, int]] = []
    for (shapes, _modes), cap in trainer._captures.items():
        size, tensors = python_bytes([cap], seen)
        residue.append((f"capture, batch {_batch_shapes(shapes)}: {len(cap.graph.nodes)} nodes (kept to compile "
                        "the other program of its shape)", size + counter.claim(tensors)))
    for (updates, shapes), built in trainer._programs.items():
        size, tensors = python_bytes([built.program.graph], seen)
        readers = ("listing, memory plan, ONNX export" if isinstance(built.program, CompiledProgram) else
                   "the Inductor runner reads its outputs")
        residue.append((f"{'step' if updates else 'gradient'} program's graph, batch {_batch_shapes(shapes)}: "
                        f"{len(built.program.graph.nodes)} nodes ({readers})", size + counter.claim(tensors)))
    residue.append(("example batch (the default of program() and memory_plan())",
                    counter.claim(t for t in pytree.tree_leaves(trainer._example) if isinstance(t, torch.Tensor))))

    step = max((plan_memory(built.program.graph, {n: t.stride() for n, t in built.static.items()}).peak_bytes
                for built in trainer._programs.values()), default=0)
    on_cpu = trainer.device.type == "cpu"
    return MemoryReport(trained, frozen, kept_twice, state, program_constants, code, step,
                        sum(size for _, size in residue), tuple(residue), rss_bytes() if on_cpu else None,
                        baseline_rss if on_cpu else None)
