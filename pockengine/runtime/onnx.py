"""Train with an exported pockengine step on onnxruntime alone: numpy, onnxruntime and safetensors, no torch.

    python -m pockengine.runtime.onnx train step.onnx --data batches.npz --steps 100 --lr 0.01 \\
        --checkpoint run/ckpt.safetensors --weights-out run/weights.safetensors

`step.onnx` is written by `Trainer.export_onnx` or `pockengine export --format onnx` (with `step.init.safetensors`
beside it: the initial trained parameters, optimizer state and statistics). In Python:

    trainer = OnnxTrainer("step.onnx")             # or OnnxTrainer("step.onnx", checkpoint="ckpt.safetensors")
    loss = trainer.step({"input0": images, "target": labels}, lr=0.01)
    trainer.save("ckpt.safetensors")               # atomic: a crash leaves the previous checkpoint
    trainer.write_weights("weights.safetensors")   # model.load_state_dict(load_file(...), strict=False) in PyTorch

The trained values live in onnxruntime's own buffers between steps, two sets of them: a step reads one set and
writes the other (I/O binding), then they swap. Nothing is copied, and no output is bound to an input buffer, which
onnxruntime does not allow for (a node may write an output before another has read the input it replaces). A step
whose loss is NaN or infinite is not swapped in: the weights stay as they were (`NonFiniteLossError`).

`--data` takes a `.npz` or `.safetensors` file with one array per batch input of the model, named as the model's
inputs (`input0`..., a dict input's keys, `target`; `python -m pockengine.runtime.onnx inputs step.onnx` lists
them), each with the examples along its first dimension: they are cut into consecutive batches of the model's
batch size (a last, smaller batch is left out: the model's shapes are fixed), in order, epoch after epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file, save_file

from pockengine.errors import NonFiniteLossError, UserInputError
from pockengine.runtime import FROZEN_PREFIX, METADATA_KEY, init_path


class OnnxTrainer:
    """Runs an exported training step (or gradient program) on onnxruntime."""

    def __init__(self, model_path: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int = 0, spin: bool = False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # onnxruntime's threads busy-wait for the next op by default. Where the cores are shared (a phone's, a
        # loaded machine's) the waiting threads take the cores the working ones need: a full MobileNetV2 step took
        # 1.7x as long with them on 2 cores beside other processes, a bias-only one 0.9x (docs/deploy.md).
        # `spin=True` turns it back on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # Run the nodes in the model's order, which is pockengine's (its memory plan frees each value at its last
        # use): onnxruntime's default order starts branches early and keeps their values alive, and its memory
        # pattern reserves one block for everything the first step allocated (docs/deploy.md).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise UserInputError(f"{model_path} is not a pockengine step (no '{METADATA_KEY}' metadata); export one "
                                 "with Trainer.export_onnx or `pockengine export --format onnx`")
        self.meta = json.loads(meta)
        self.batch = {b["name"]: b for b in self.meta["batch"]}
        self.carried = self.meta["carried"]
        self.checks = self.meta.get("checks", [])  # the model's checks of its batch (absent from older exports)
        self._check_outputs = {c["output"] for c in self.checks}
        init = load_file(str(init_path(model_path)))
        self.frozen = {k.removeprefix(FROZEN_PREFIX): v for k, v in init.items() if k.startswith(FROZEN_PREFIX)}
        values = init
        self.steps_done = int(self.meta["steps_done"])
        if checkpoint is not None:
            values = load_file(str(checkpoint))
            with open(checkpoint, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            self.steps_done = int(header.get("__metadata__", {}).get("steps_done", 0))
        missing = [c["input"] for c in self.carried if c["input"] not in values]
        if missing:
            raise UserInputError(f"{checkpoint or init_path(model_path)} lacks {missing}: it belongs to another step")
        names = [c["input"] for c in self.carried]
        self._current = {n: ort.OrtValue.ortvalue_from_numpy(np.require(values[n], requirements="C")) for n in names}
        self._spare = {n: ort.OrtValue.ortvalue_from_numpy(np.empty_like(values[n])) for n in names}
        self.lr = (self.meta["optimizer"] or {}).get("lr")

    @property
    def kind(self) -> str:
        """`step` (updates the trained values) or `gradients` (returns them)."""
        return self.meta["kind"]

    def _bind(self, batch: dict[str, np.ndarray]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, spec in self.batch.items():
            if name not in batch:
                raise UserInputError(f"the batch has no {name!r}; the model's batch inputs are {list(self.batch)}")
            value = np.ascontiguousarray(batch[name], dtype=spec["dtype"])
            if list(value.shape) != spec["shape"]:
                raise UserInputError(f"batch input {name!r} has shape {list(value.shape)}, the model was exported "
                                     f"for {spec['shape']}: export it for this shape (shapes are fixed)")
            binding.bind_cpu_input(name, value)
        for c in self.carried:
            binding.bind_ortvalue_input(c["input"], self._current[c["input"]])
        binding.bind_output("loss")
        for check in self.checks:
            binding.bind_output(check["output"])
        return binding

    def _checked(self, binding: ort.IOBinding) -> None:
        """Raise if the batch failed one of the model's checks (bound right after the loss, by `_bind`)."""
        for check, passed in zip(self.checks, binding.get_outputs()[1:1 + len(self.checks)]):
            if not bool(passed.numpy()):
                raise UserInputError(f"the batch fails a check of the model: {check['message']}. The step's "
                                     "results were dropped, the weights are unchanged.")

    def step(self, batch: dict[str, np.ndarray], lr: float | None = None) -> float:
        """One training step on `batch` (arrays by input name); returns the loss."""
        if self.kind != "step":
            raise UserInputError("this model is a gradient program; export the step (gradients=False) to train")
        binding = self._bind(batch)
        lr = self.lr if lr is None else lr
        if self.meta["scalars"]:
            if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr >= 0):
                raise UserInputError(f"the learning rate must be a finite number >= 0, got {lr!r}")
            binding.bind_cpu_input("lr", np.array(lr, dtype=np.float64))
            binding.bind_cpu_input("step", np.array(self.steps_done + 1, dtype=np.int64))
        for c in self.carried:
            binding.bind_ortvalue_output(c["output"], self._spare[c["input"]])
        self.session.run_with_iobinding(binding)
        self._checked(binding)
        loss = float(binding.get_outputs()[0].numpy())
        if not np.isfinite(loss):
            raise NonFiniteLossError(f"the loss is {loss}; the step's results were dropped, the weights are "
                                     "unchanged. Lower the learning rate or check the batch for NaN/inf.")
        self._current, self._spare = self._spare, self._current
        self.steps_done += 1
        return loss

    def gradients(self, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and the gradient of every trained parameter (full shape), from a gradient program."""
        if self.kind != "gradients":
            raise UserInputError("this model is a training step; export it with gradients=True for gradients")
        binding = self._bind(batch)
        names = [n for n in self.meta["outputs"] if n != "loss" and n not in self._check_outputs]
        for name in names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        self._checked(binding)
        outputs = binding.get_outputs()  # the loss, the checks (`_bind`), then the gradients
        loss, grads = outputs[0].numpy(), [v.numpy() for v in outputs[1 + len(self.checks):]]
        return float(loss), {n.removeprefix("grad:"): g for n, g in zip(names, grads)}

    def values(self) -> dict[str, np.ndarray]:
        """The current trained parameters, optimizer state and statistics, by input name (copies)."""
        return {name: v.numpy().copy() for name, v in self._current.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint the trained values and the step count to one safetensors file, atomically."""
        values = {name: v.numpy() for name, v in self._current.items()}
        _atomic_save(values, Path(path), {"steps_done": str(self.steps_done)})

    def weights(self) -> dict[str, np.ndarray]:
        """The trained parameters at their full shapes and the updated statistics, named as in the PyTorch model
        (`model.load_state_dict(weights, strict=False)`)."""
        out = {}
        for c in self.carried:
            if c["role"] == "state":
                continue
            value = self._current[c["input"]].numpy()
            if "partial" in c:
                whole = self.frozen[c["tensor"]].copy()
                index = [slice(None)] * whole.ndim
                index[c["partial"]["dim"]] = np.asarray(c["partial"]["channels"])
                whole[tuple(index)] = value
                value = whole
            out[c["tensor"]] = value
        return out

    def write_weights(self, path: str | os.PathLike) -> None:
        """Write `weights()` to a safetensors file, atomically."""
        _atomic_save(self.weights(), Path(path), {"steps_done": str(self.steps_done)})


_UMASK = os.umask(0)
os.umask(_UMASK)
_USUAL_FILE_MODE = 0o666 & ~_UMASK  # mkstemp's file is 0600; the weights are the user's file like any other


def _atomic_save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Write under a temporary name in the same folder, flush it to disk, rename it into place, sync the folder: a
    reader sees the old file or the new one, never part of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".saving", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, temp, metadata=metadata)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temp, _USUAL_FILE_MODE)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_batches(path: str | os.PathLike, batch: dict[str, dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """The batches of a `.npz` or `.safetensors` file holding one array per batch input (examples along the first
    dimension), cut to the model's batch size."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    elif path.suffix == ".safetensors":
        arrays = load_file(str(path))
    else:
        raise UserInputError(f"--data {path}: expected a .npz or .safetensors file of arrays named as the model's "
                             f"batch inputs {list(batch)}")
    missing = [name for name in batch if name not in arrays]
    if missing:
        raise UserInputError(f"--data {path} has no array {missing}; it has {sorted(arrays)}, the model's batch "
                             f"inputs are {list(batch)}")
    sizes = {name: arrays[name].shape[0] for name in batch}
    if len(set(sizes.values())) != 1:
        raise UserInputError(f"--data {path}: the arrays hold different numbers of examples {sizes}")
    n = next(iter(sizes.values()))
    per = {name: spec["shape"][0] for name, spec in batch.items()}
    size = next(iter(per.values()))
    for name, spec in batch.items():
        if list(arrays[name].shape[1:]) != spec["shape"][1:]:
            raise UserInputError(f"--data {path}: {name!r} has examples of shape {list(arrays[name].shape[1:])}, "
                                 f"the model takes {spec['shape'][1:]}")
    if n < size:
        raise UserInputError(f"--data {path} has {n} examples, fewer than one batch of {size}")
    return [{name: arrays[name][i:i + size] for name in batch} for i in range(0, n - size + 1, size)]


def _cycle(batches: list, steps: int) -> Iterator:
    for i in range(steps):
        yield batches[i % len(batches)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pockengine.runtime.onnx",
                                     description="Train with an exported pockengine step on onnxruntime alone.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train for --steps steps on --data")
    train.add_argument("model", help="the exported step (.onnx), with its .init.safetensors beside it")
    train.add_argument("--data", required=True, help=".npz or .safetensors: one array per batch input, "
                                                     "examples along the first dimension")
    train.add_argument("--steps", type=int, default=None, help="number of steps (default: one epoch)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the exported optimizer's)")
    train.add_argument("--checkpoint", default=None, help="safetensors file written at the end and every "
                                                          "--checkpoint-every steps; with --resume, read first")
    train.add_argument("--checkpoint-every", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    train.add_argument("--weights-out", default=None, help="write the trained weights (safetensors) for PyTorch")
    train.add_argument("--threads", type=int, default=0, help="onnxruntime's intra-op threads (0: its default)")
    train.add_argument("--spin", action="store_true", help="let onnxruntime's idle threads busy-wait for the "
                                                           "next op (its default) instead of blocking")
    inputs = commands.add_parser("inputs", help="list the model's batch inputs and what it carries")
    inputs.add_argument("model")
    args = parser.parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _inputs(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _inputs(args: argparse.Namespace) -> int:
    trainer = OnnxTrainer(args.model)
    for spec in trainer.meta["batch"]:
        print(f"batch  {spec['name']:<24} {spec['dtype']}{spec['shape']}")
    for c in trainer.carried:
        print(f"{c['role']:<6} {c['tensor']}{'  (partial)' if 'partial' in c else ''}")
    return 0


def _train(args: argparse.Namespace) -> int:
    resume = args.resume and args.checkpoint and Path(args.checkpoint).exists()
    trainer = OnnxTrainer(args.model, checkpoint=args.checkpoint if resume else None, threads=args.threads,
                          spin=args.spin)
    batches = read_batches(args.data, trainer.batch)
    steps = len(batches) if args.steps is None else args.steps
    start = trainer.steps_done - int(trainer.meta["steps_done"])
    for i, batch in enumerate(_cycle(batches, steps)):
        if i < start:
            continue  # resumed: these steps are done
        loss = trainer.step(batch, args.lr)
        print(json.dumps({"step": trainer.steps_done, "loss": loss}), flush=True)
        if args.checkpoint and args.checkpoint_every and trainer.steps_done % args.checkpoint_every == 0:
            trainer.save(args.checkpoint)
    if args.checkpoint:
        trainer.save(args.checkpoint)
    if args.weights_out:
        trainer.write_weights(args.weights_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
