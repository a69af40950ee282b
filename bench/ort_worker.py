"""ONNX Runtime on-device training worker, run by .venv-ort's Python (onnxruntime-training-cpu 1.19.2, onnx 1.16.2).

Reads a spec written by bench.systems.OrtTraining (the exported ONNX model, trained and frozen parameter
names, batches, channel masks), builds the training artifacts, then answers JSON lines on stdin:
{"cmd": "step", "batch": i} -> {"loss": ...}; {"cmd": "quit"} (bench/child.py's protocol). This file imports
neither torch nor pockengine itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import child, memory  # import-free modules: the repository is on this interpreter's PYTHONPATH


def generate(spec: dict, out: Path, notes: list[str]) -> None:
    """Training artifacts (training/eval/optimizer models, checkpoint) from the exported model."""
    import onnx
    from onnxruntime.training import artifacts

    model = onnx.load(spec["onnx"])
    notes_ln = False
    names = {i.name for i in model.graph.initializer}
    missing = [n for n in spec["requires_grad"] if n not in names]
    if missing:
        raise RuntimeError(f"trained parameters not found among the ONNX initializers: {missing[:5]}")
    frozen = [n for n in spec["frozen"] if n in names]
    for node in model.graph.node:
        # torch.onnx writes LayerNormalization with its output only; ORT's gradient of it reads the optional Mean
        # and InvStdDev outputs (as its own exporter writes them), so name them.
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "_mean", node.output[0] + "_inv_std"])
            notes_ln = True
    out.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=spec["requires_grad"], frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=str(out))
    del model
    if notes_ln:
        notes.append("LayerNormalization nodes given their optional Mean/InvStdDev outputs, which ORT's gradient needs")


def main(spec_path: str) -> None:
    import numpy as np
    import onnx  # noqa: F401  (runtime libraries load before the baseline RSS is read)
    import onnxruntime as ort
    from onnxruntime.training import artifacts  # noqa: F401
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    baseline = memory.rss_kb()
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["artifacts"])
    notes: list[str] = []
    t0 = time.perf_counter()
    if not spec.get("reuse_artifacts"):
        generate(spec, out, notes)
    artifacts_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu",
                    session_options=options)
    optimizer = Optimizer(str(out / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(spec["lr"])
    module.train()
    session_s = time.perf_counter() - t0
    data = np.load(Path(spec_path).with_name("batches.npz"))
    batches = [[data[f"{i}/{n}"] for n in spec["input_names"]] + [data[f"{i}/labels"]]
               for i in range(spec["n_batches"])]
    masks = dict(np.load(Path(spec_path).with_name("masks.npz")))
    keep = {n: (~m, state.parameters[n].data.copy()) for n, m in masks.items()}  # untrained entries, as loaded
    model_bytes = sum((out / f).stat().st_size for f in ("training_model.onnx", "optimizer_model.onnx", "checkpoint"))

    def step(i: int) -> float:
        loss = module(*batches[i])
        optimizer.step()
        module.lazy_reset_grad()
        for name, (frozen_entries, original) in keep.items():
            param = state.parameters[name]
            value = param.data
            np.copyto(value, original, where=frozen_entries)
            param.data = value
        return loss

    child.reply(ready=True, baseline_rss_kb=baseline, artifacts_s=artifacts_s, session_s=session_s, notes=notes,
                model_bytes=model_bytes)
    child.serve(step)


if __name__ == "__main__":
    child.run(main)
