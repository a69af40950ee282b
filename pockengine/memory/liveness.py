"""Liveness: when each value of a program dies. The runner frees every value right after its last use."""

from __future__ import annotations

from dataclasses import dataclass

from pockengine.ir.graph import Graph, Node


@dataclass
class Liveness:
    body: list[Node]  # the ops, in execution order
    dying: dict[int, list[Node]]  # op index -> values released right after it (-1: inputs never used)

    @classmethod
    def of(cls, graph: Graph) -> Liveness:
        body = [n for n in graph.nodes if not n.is_input]
        outputs = set(graph.outputs.values())
        last_use: dict[Node, int] = {n: -1 for n in graph.inputs()}
        for i, n in enumerate(body):
            last_use.setdefault(n, i)
            for a in n.inputs:
                last_use[a] = i
        dying: dict[int, list[Node]] = {}
        for n, i in last_use.items():
            if n not in outputs:
                dying.setdefault(i, []).append(n)
        return cls(body, dying)
