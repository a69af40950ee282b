"""The benchmark's `executorch` system in its child process, run by .venv-executorch's Python (torch 2.13.0,
executorch 1.5.1; bench/setup_executorch.sh).

Reads a spec written by bench.systems.ExecuTorchTraining: the model with its loss, exported by torch.export in the
benchmark's process (model.pt2, the trained parameters marked by `requires_grad`), and the batches beside it
(batches.npz: `<i>/<input name>` and `<i>/labels`). Lowers it as ExecuTorch's training example does
(`_export_forward_backward`, `to_edge(...).to_executorch()`), loads the program with
`_load_for_executorch_for_training_from_buffer` and trains with `get_sgd_optimizer`, then answers bench/child.py's
protocol.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import child, memory  # import-free modules: the repository is on this interpreter's PYTHONPATH


def lower(program: Path, out: Path) -> None:
    """The joint forward-backward program of the exported model, as an ExecuTorch program file."""
    import torch
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    ep = torch.export.load(str(program))
    joint = _export_forward_backward(ep)
    edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    out.write_bytes(edge.to_executorch().buffer)


def main(spec_path: str) -> None:
    import numpy as np
    import torch
    from executorch.exir import to_edge  # noqa: F401  (runtime libraries load before the baseline RSS is read)
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    torch.set_num_threads(1)  # ExecuTorch's portable kernels run on the calling thread; torch only lowers
    baseline = memory.rss_kb()
    spec = json.loads(Path(spec_path).read_text())
    pte = Path(spec_path).with_name("model.pte")
    start = time.perf_counter()
    if not (spec["reuse"] and pte.exists()):
        lower(Path(spec["program"]), pte)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    buffer = pte.read_bytes()
    module = _load_for_executorch_for_training_from_buffer(buffer)
    load_s = time.perf_counter() - start
    with np.load(Path(spec_path).with_name("batches.npz")) as data:
        batches = [[torch.from_numpy(data[f"{i}/{n}"]) for n in [*spec["input_names"], "labels"]]
                   for i in range(spec["n_batches"])]
    optimizer = []  # made at the first step: the program's parameters are known after one forward_backward

    def step(i: int) -> float:
        loss = module.forward_backward("forward", batches[i])[0]
        if not optimizer:
            optimizer.append(get_sgd_optimizer(module.named_parameters(), spec["lr"], spec["momentum"]))
        optimizer[0].step(module.named_gradients())
        return float(loss)

    child.reply(ready=True, baseline_rss_kb=baseline, lower_s=lower_s, load_s=load_s, model_bytes=pte.stat().st_size)
    child.serve(step)


if __name__ == "__main__":
    child.run(main)
