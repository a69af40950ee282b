"""The benchmark's `pockengine-onnx` system in its child process: trains with the exported pockengine step on
onnxruntime alone (pockengine.runtime.onnx), run by the benchmark's Python but without torch, so that the process's
memory is the runner's: numpy, onnxruntime, safetensors and the runner, nothing else (checked before the steps).

Reads a spec written by bench.systems.PockEngineOnnx (the exported step, the learning rate, the threads) and the
batches beside it (batches.npz, `<i>/<input name>`), then answers bench/child.py's protocol.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench import child, memory  # import-free modules: the repository is on this interpreter's PYTHONPATH


def main(spec_path: str) -> None:
    import numpy as np

    from pockengine.runtime.onnx import OnnxTrainer

    baseline = memory.rss_kb()
    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    trainer = OnnxTrainer(spec["model"], threads=spec["threads"])
    session_s = time.perf_counter() - start
    with np.load(Path(spec_path).with_name("batches.npz")) as data:
        batches = [{name: data[f"{i}/{name}"] for name in trainer.batch} for i in range(spec["n_batches"])]
    if "torch" in sys.modules:
        raise RuntimeError("the ONNX runner's process imported torch; its memory would not be the runner's alone")
    child.reply(ready=True, baseline_rss_kb=baseline, session_s=session_s)
    child.serve(lambda i: trainer.step(batches[i], spec["lr"]))


if __name__ == "__main__":
    child.run(main)
