"""`python -m bench.report [DIR]`: redraw DIR/README.md and DIR/bench.png from DIR/results.json (default DIR:
docs/benchmarks)."""

import json
import sys
from pathlib import Path

from bench.report import write

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
write(json.loads((folder / "results.json").read_text()), folder)
