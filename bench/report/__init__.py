"""The benchmark's report, rewritten in full from results.json on every run (so rerunning regenerates all):
README.md (text.py's prose around tables.py's tables) and bench.png (plot.py).

`python -m bench.report DIR` redraws DIR/README.md and DIR/bench.png from DIR/results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.plot import plot
from bench.report.tables import headline
from bench.report.text import introduction, method, workload_section


def write(results: dict[str, Any], out: Path) -> None:
    """README.md and bench.png of `results` (a results.json's contents) in the folder `out`."""
    out = Path(out)
    parts = ["# pockengine benchmarks", "", *introduction(results), "", headline(results), "",
             "![step time and memory per system and scheme](bench.png)", ""]
    for name, w in results["workloads"].items():
        parts += workload_section(name, w, results.get("command", {}).get(name, f"python -m bench --workload {name}"))
    parts.append(method(results))
    (out / "README.md").write_text("\n".join(parts))
    plot(results, out / "bench.png")
