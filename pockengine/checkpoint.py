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
VERSION = 2  # 2: the options as one dict


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # parameters and buffers by state-dict name
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # parameter name -> state name -> tensor
    meta: dict[str, Any]  # optimizer config, scheme, step count, options


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
                "options": trainer.options.to_dict(),
                # The resolved selection (channels chosen by magnitude included), so a resumed run trains exactly
                # the same entries whatever the weights have become.
                "selections": {name: sel.to_dict() for name, sel in trainer.trained.items()}}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The weights, optimizer state and metadata of a checkpoint, without a model."""
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


def load(path: str | os.PathLike, model: nn.Module, loss_fn: Callable, example_batch: Any) -> Trainer:
    """Resume training from a checkpoint written by `Trainer.save`: loads the weights into `model` (of the
    architecture that was trained) and returns a Trainer that continues where the saved one stopped (same
    optimizer, state, scheme, options and step count). `read_checkpoint(path)` reads a checkpoint without a model.
    """
    from pockengine.optim import from_config
    from pockengine.options import Options
    from pockengine.scheme import Scheme, Selection
    from pockengine.trainer import Trainer

    ckpt = read_checkpoint(path)
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
                      Options.from_dict(meta["options"]))
    for param, states in trainer.state.items():
        for name, t in states.items():
            t.copy_(ckpt.optimizer_state[param][name])
    trainer.steps_done = meta["steps_done"]
    return trainer
