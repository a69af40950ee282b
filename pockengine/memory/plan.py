"""The static memory plan of a compiled program: predicted peak and what it is made of.

The program is walked in execution order on meta tensors (shapes, dtypes and strides, no data), so the plan knows
which ops allocate and which return views or update in place (by storage identity), and it frees each value where
the runner does (`Liveness`); pockengine's own ops that allocate while they run say how much
(`pockengine.kernels.WORKSPACE`). What it predicts is storage allocated during a step, the quantity
`LiveStorageTracker` measures; the tensors that live across steps (weights, buffers, optimizer state, the batch)
are reported beside it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from pockengine.ir.graph import BATCH, BUFFER, CONST, PARAM, STATE, Graph, Node, TensorMeta
from pockengine.kernels import WORKSPACE
from pockengine.memory.liveness import Liveness

aten = torch.ops.aten
MB = 2 ** 20


def _meta_dropout(x: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _meta_convolution(x: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
    """The CPU kernels return channels-last results when the input or the weight is channels-last; the meta
    kernel always returns NCHW, and views of the result (a 1x1 convolution's matrix) would look like copies."""
    out = aten.convolution.default(x, weight, *args)
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) or _channels_last(weight) else out


_META_OVERRIDES = {aten.native_dropout.default: _meta_dropout, aten.convolution.default: _meta_convolution}
_STATIC_ROLES = {PARAM: "weights", BUFFER: "buffers", STATE: "optimizer state", BATCH: "batch", CONST: "constants"}


@dataclass
class MemoryPlan:
    peak_bytes: int  # storage allocated during the step, at its high-water mark
    peak_node: Node | None
    at_peak: dict[str, int]  # what the live step storage at the peak is: activations, gradients, workspace
    resident: dict[str, int]  # tensors living across steps, by role
    saved_bytes: int  # activations (and masks) still held when the backward pass starts
    live_during: dict[Node, int] = field(repr=False, default_factory=dict)  # step bytes live while each op runs

    def table(self) -> str:
        rows = [("step peak (allocated during the step)", self.peak_bytes)]
        rows += [(f"  at the peak: {k}", v) for k, v in self.at_peak.items()]
        rows += [("saved for the backward pass", self.saved_bytes)]
        rows += [(f"resident: {k}", v) for k, v in self.resident.items()]
        where = f" (at %{self.peak_node.name}, {self.peak_node.section}, '{self.peak_node.module}')" \
            if self.peak_node is not None else ""
        lines = [f"{name:<44} {value / MB:10.2f} MB" for name, value in rows]
        return "\n".join(lines) + f"\npeak reached{where}"


def _category(node: Node, gradients: set[Node]) -> str:
    if node.section in ("forward", "loss"):
        return "activations"
    if node in gradients:
        return "gradients"
    return "workspace"


def plan_memory(graph: Graph, input_strides: dict[Node, tuple[int, ...]] | None = None) -> MemoryPlan:
    """Simulate `graph` as the runner executes it. `input_strides` gives the layout of inputs that are not
    contiguous (channels-last weights), so views and copies are predicted as they happen."""
    input_strides = input_strides or {}
    live = Liveness.of(graph)
    # Parameter gradients: what the update section (or the program's outputs) takes from the backward section.
    gradients = {i for n in live.body if n.section == "update" for i in n.inputs if i.section == "backward"}
    gradients |= {n for n in graph.outputs.values() if n.section == "backward"}
    value: dict[Node, Any] = {}
    storage_of: dict[Node, list[int]] = {}
    holders: dict[int, int] = {}  # storage -> number of live nodes referencing it
    size: dict[int, int] = {}
    owner: dict[int, Node] = {}
    resident: dict[str, int] = {}
    static: set[int] = set()
    pinned: list[torch.Tensor] = []  # input tensors stay alive, so no new storage can take their identity

    def meta(x: Any) -> Any:
        return value[x] if isinstance(x, Node) else torch.device("meta") if isinstance(x, torch.device) else x

    for n in graph.inputs():
        if isinstance(n.meta, TensorMeta):
            stride = input_strides.get(n)
            value[n] = (torch.empty_strided(n.meta.shape, stride, dtype=n.meta.dtype, device="meta") if stride
                        else torch.empty(n.meta.shape, dtype=n.meta.dtype, device="meta"))
            pinned.append(value[n])
            key = value[n].untyped_storage()._cdata
            static.add(key)
            role = _STATIC_ROLES.get(n.role, n.role)
            resident[role] = resident.get(role, 0) + n.meta.nbytes
        else:
            value[n] = 1.0  # a run-time scalar

    step_bytes = peak = 0
    peak_node: Node | None = None
    at_peak: dict[str, int] = {}
    saved = 0
    live_during: dict[Node, int] = {}
    first_backward = next((i for i, n in enumerate(live.body) if n.section in ("backward", "update")), None)

    def release(n: Node) -> None:
        nonlocal step_bytes
        for key in storage_of.pop(n, []):
            holders[key] -= 1
            if holders[key] == 0:
                del holders[key]
                step_bytes -= size.pop(key)
                owner.pop(key)

    for i, n in enumerate(live.body):
        if i == first_backward:
            saved = step_bytes
        args, kwargs = tree_map(meta, (n.args, n.kwargs))
        if n.target is operator.getitem:
            out = args[0][args[1]]
        else:
            out = _META_OVERRIDES.get(n.target, n.target)(*args, **kwargs)
        value[n] = out
        keys = []
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in static:
                continue
            if key not in holders:
                holders[key] = 0
                size[key] = t.untyped_storage().nbytes()
                owner[key] = n
                step_bytes += size[key]
            holders[key] += 1
            keys.append(key)
        storage_of[n] = keys
        scratch = WORKSPACE[n.target](*args, **kwargs) if n.target in WORKSPACE else 0  # freed as the op returns
        live_during[n] = step_bytes + scratch
        if step_bytes + scratch > peak:
            peak, peak_node = step_bytes + scratch, n
            at_peak = {"workspace": scratch} if scratch else {}
            for key, producer in owner.items():
                cat = _category(producer, gradients)
                at_peak[cat] = at_peak.get(cat, 0) + size[key]
        for dead in live.dying.get(i, []):
            release(dead)
            value.pop(dead, None)
    return MemoryPlan(peak, peak_node, at_peak, resident, saved, live_during)
