"""The protocol of a system's child process (bench/ort_worker.py, bench/onnx_worker.py, bench/executorch_worker.py),
which runs under another Python or without torch: like memory.py it imports nothing (the child finds the
repository on its PYTHONPATH, which bench.systems.ChildProcess sets). The child replies with stdout lines starting with "@@" (JSON) and reads commands, one JSON per stdin
line: {"cmd": "step", "batch": i} -> {"loss": ...}; {"cmd": "quit"} -> {"bye": true}. bench.systems.ChildProcess
is the other end.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable


def reply(**msg) -> None:
    sys.stdout.write("@@" + json.dumps(msg) + "\n")
    sys.stdout.flush()


def serve(step: Callable[[int], float]) -> None:
    """Answer the benchmark's commands until it says quit; `step(i)` trains on batch i and returns the loss."""
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            reply(bye=True)
            return
        if msg["cmd"] == "step":
            reply(loss=float(step(msg["batch"])))


def run(main: Callable[[str], None]) -> None:
    """`main(spec_path)` with sys.argv's spec; an exception is reported to the benchmark (which records the system
    as failed with it) and ends the process."""
    try:
        main(sys.argv[1])
    except Exception as e:
        traceback.print_exc()
        reply(error=f"{type(e).__name__}: {e}")
        os._exit(1)
