"""Checkpoints: a folder with the weights and optimizer state as safetensors and the rest as JSON. Never pickle.

A checkpoint is written into a temporary sibling folder and swapped in with renames (pockengine.storage), so a
crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pockengine.errors import UserInputError
from pockengine.storage import atomic_dir

if TYPE_CHECKING:
    from pockengine.trainer import Trainer

FORMAT = "pockengine-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # parameters and buffers by state-dict name
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # parameter name -> state name -> tensor
    meta: dict[str, Any]  # optimizer config, scheme, step count


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() drops tied duplicates; safetensors refuses shared storage, so store copies.
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def save_trainer(trainer: Trainer, path: str | os.PathLike) -> None:
    with atomic_dir(path, replace=True) as tmp:
        save_file(_model_tensors(trainer.model), str(tmp / "model.safetensors"))
        state = {f"{p}::{s}": t.contiguous() for p, states in trainer.state.items() for s, t in states.items()}
        save_file(state, str(tmp / "optimizer.safetensors"))
        meta = {"format": FORMAT, "version": VERSION, "optimizer": trainer.optimizer.config(),
                "scheme": trainer.scheme.to_dict(), "steps_done": trainer.steps_done,
                "freeze_batchnorm": trainer.freeze_batchnorm, "on_nonfinite": trainer.on_nonfinite,
                "activation_masks": trainer.activation_masks, "memory_format": trainer.memory_format,
                "frozen_chunks": trainer.frozen_chunks,
                # The resolved selection (channels chosen by magnitude included), so a resumed run trains exactly
                # the same entries whatever the weights have become.
                "selections": {name: sel.to_dict() for name, sel in trainer.trained.items()}}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    folder = Path(path)
    meta_file = folder / "trainer.json"
    if not meta_file.is_file():
        raise UserInputError(f"{folder} is not a pockengine checkpoint (no trainer.json); write one with "
                             "trainer.save(path)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserInputError(f"{folder} holds format {meta.get('format')} v{meta.get('version')}; this pockengine "
                             f"reads {FORMAT} v{VERSION}")
    weights = load_file(str(folder / "model.safetensors"))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / "optimizer.safetensors")).items():
        param, _, name = key.partition("::")
        state.setdefault(param, {})[name] = t
    return Checkpoint(weights, state, meta)


def load(path: str | os.PathLike, model: nn.Module | None = None, loss_fn: Callable | None = None,
         example_batch: Any = None) -> Trainer | Checkpoint:
    """Read a checkpoint written by `Trainer.save`.

    With only `path`, returns the `Checkpoint` (weights, optimizer state, metadata). With a `model` of the same
    architecture, a `loss_fn` and an `example_batch`, loads the weights into the model and returns a Trainer that
    resumes where the saved one stopped (same optimizer, state, scheme and step count).
    """
    from pockengine.optim import from_config
    from pockengine.scheme import Scheme, Selection
    from pockengine.trainer import Trainer

    ckpt = read_checkpoint(path)
    if model is None:
        return ckpt
    if loss_fn is None or example_batch is None:
        raise UserInputError("to resume training, pass model, loss_fn and example_batch to pockengine.load")
    expected = {k: tuple(v.shape) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    got = {k: tuple(v.shape) for k, v in ckpt.weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        reshaped = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise UserInputError(f"the checkpoint does not fit this model: missing {missing[:10]}, unexpected "
                             f"{unexpected[:10]}, other shapes {reshaped[:10]}; pass a model of the architecture "
                             "that was trained")
    model.load_state_dict(ckpt.weights, strict=False)  # strict would also ask for tied aliases
    meta = ckpt.meta
    selections = {name: Selection.from_dict(d) for name, d in meta["selections"].items()}
    trainer = Trainer(model, loss_fn, example_batch, from_config(meta["optimizer"]),
                      Scheme.from_resolved(selections, meta["scheme"].get("name", "recorded")),
                      freeze_batchnorm=meta["freeze_batchnorm"], on_nonfinite=meta["on_nonfinite"],
                      activation_masks=meta["activation_masks"], memory_format=meta["memory_format"],
                      frozen_chunks=meta.get("frozen_chunks", "auto"))
    for param, states in trainer.state.items():
        for name, t in states.items():
            t.copy_(ckpt.optimizer_state[param][name])
    trainer.steps_done = meta["steps_done"]
    return trainer
