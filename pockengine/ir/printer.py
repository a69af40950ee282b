"""A readable listing of a program: inputs, then one block per section, each line an op with its result type."""

from __future__ import annotations

from typing import Any

from pockengine.ir.graph import SECTIONS, Graph, Node, TensorMeta


def _fmt_arg(a: Any) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return f"{a:g}"
    return str(a).removeprefix("torch.")


def _fmt_meta(meta: Any) -> str:
    if isinstance(meta, TensorMeta):
        return str(meta)
    if isinstance(meta, tuple):
        return "(" + ", ".join(_fmt_meta(m) for m in meta) + ")"
    return ""


def format_node(n: Node, note: str | None = None) -> str:
    args = [_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()]
    line = f"%{n.name} = {n.op_name}({', '.join(args)})"
    comment = "; ".join(c for c in (n.module, note) if c)
    return f"  {line:<96} {_fmt_meta(n.meta)}{f'  # {comment}' if comment else ''}"


def format_graph(graph: Graph) -> str:
    counts = {s: len(graph.section(s)) for s in SECTIONS}
    lines = ["program: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " ops"]
    lines.append("inputs:")
    for n in graph.inputs():
        where = f"  # {n.module}" if n.module else ""
        lines.append(f"  %{n.name:<40} {n.role:<7} {_fmt_meta(n.meta)}{where}")
    for s in SECTIONS:
        nodes = graph.section(s)
        if nodes:
            lines.append(f"{s}:")
            lines.extend(format_node(n, graph.notes.get(n)) for n in nodes)
    lines.append("outputs:")
    lines.extend(f"  {k} = %{v.name}" for k, v in graph.outputs.items())
    return "\n".join(lines)
