"""Checkpoints: weights, optimizer and generator state as safetensors, the rest as JSON. Never pickle.

    ckpt/                              the checkpoint folder, holding only these files:
      model.safetensors                parameters and buffers, by state-dict name
      optimizer.safetensors            optimizer state, as `<parameter>::<state name>`
      generator.safetensors            the random generator's state
      trainer.json                     optimizer config, scheme and its resolution, step count, options, seed
      pockengine-manifest.json         SHA-256 and size of each file above, written last
    .ckpt.<pid>.<random>.saving/       beside it: a save in progress, or one a crash interrupted
    .ckpt.<pid>.<random>.previous/     beside it: the checkpoint a save is replacing

A save writes the new checkpoint into a `.saving` sibling and flushes every file and the folder to disk; then it
renames the existing checkpoint to a `.previous` sibling, renames the new one into place (the commit), flushes the
parent, and deletes the previous one. A crash between the two renames leaves no folder at the path but a complete
`.previous`, which the next load or save renames back. So a load finds the last committed checkpoint after a crash
at any instant, and removes what killed saves left. Every file is read and checked, then verified against the
manifest: bytes changed after the save (truncation, zeroed blocks) are refused naming the file, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pockengine.errors import CheckpointError, UserInputError
from pockengine.optim import Optimizer, from_config
from pockengine.options import Options
from pockengine.scheme import Scheme, Selection
from pockengine.storage import MANIFEST, fsync_dir, manifest_problems, write_manifest, writer_alive

if TYPE_CHECKING:
    from pockengine.trainer import Trainer

FORMAT = "pockengine-checkpoint"
VERSION = 2  # 2: the options as one dict, the generator state, a manifest of checksums
FILES = ("model.safetensors", "optimizer.safetensors", "generator.safetensors", "trainer.json", MANIFEST)
_SAVING, _PREVIOUS = "saving", "previous"

# Called with the name of each step of a save once it is done; the crash-safety test kills the saving process
# there (tests/test_bad_checkpoints.py), one step after the other.
after_save_step: Callable[[str], None] = lambda step: None


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # parameters and buffers by state-dict name
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # parameter name -> state name -> tensor
    meta: dict[str, Any]  # optimizer config, scheme, step count, options
    generator_state: torch.Tensor | None = None  # the random generator's state (torch.Generator.get_state)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() drops tied duplicates; safetensors refuses shared storage, so store copies.
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def _sibling(folder: Path, kind: str) -> Path:
    return folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex}.{kind}")


def _siblings(folder: Path, kind: str) -> list[Path]:
    """`kind` siblings of `folder` with the pid of the process that made them, newest first."""
    prefix = f".{folder.name}."
    found = [p for p in folder.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(f".{kind}")
             and p.name[len(prefix):].count(".") == 2]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _recover(folder: Path) -> None:
    """Put the last committed checkpoint back at `folder` after a crash mid-swap, and delete what killed saves left
    (the siblings of processes that are gone)."""
    if not folder.exists():
        for previous in _siblings(folder, _PREVIOUS):
            if not writer_alive(previous) and not manifest_problems(previous):
                os.rename(previous, folder)
                fsync_dir(folder.parent)
                break
    # An unfinished save is never needed again; a previous checkpoint only while nothing replaced it.
    leftovers = _siblings(folder, _SAVING) + (_siblings(folder, _PREVIOUS) if folder.is_dir() else [])
    for leftover in leftovers:
        if not writer_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def check_save_target(folder: Path) -> None:
    """A save may create `folder`, or replace a checkpoint holding only pockengine's files; nothing else."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder; trainer.save writes a folder and never "
                              "replaces other files: save to another path")
    entries = sorted(p.name for p in folder.iterdir())
    foreign = [name for name in entries if name not in FILES]
    if foreign:
        what = ("is not a pockengine checkpoint" if "trainer.json" not in entries else
                "holds files that pockengine did not write")
        raise CheckpointError(f"{folder} exists and {what} ({foreign[:5]}); trainer.save never replaces other "
                              "files: move them out, or save to a new or empty folder")


def save_trainer(trainer: Trainer, path: str | os.PathLike) -> None:
    folder = Path(path)
    tmp = previous = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _recover(folder)
        check_save_target(folder)
        tmp = _sibling(folder, _SAVING)
        tmp.mkdir()
        after_save_step("created")
        save_file(_model_tensors(trainer.model), str(tmp / "model.safetensors"))
        after_save_step("model")
        state = {f"{p}::{s}": t.contiguous() for p, states in trainer.state.items() for s, t in states.items()}
        save_file(state, str(tmp / "optimizer.safetensors"))
        after_save_step("optimizer")
        save_file({"state": trainer.generator.get_state()}, str(tmp / "generator.safetensors"))
        after_save_step("generator")
        meta = {"format": FORMAT, "version": VERSION, "optimizer": trainer.optimizer.config(),
                "scheme": trainer.scheme.to_dict(), "steps_done": trainer.steps_done,
                "options": trainer.options.to_dict(),
                # The resolved selection (channels chosen by magnitude included), so a resumed run trains exactly
                # the same entries whatever the weights have become.
                "selections": {name: sel.to_dict() for name, sel in trainer.trained.items()}}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        after_save_step("trainer.json")
        write_manifest(tmp)  # flushes every file and the folder
        after_save_step("manifest")
        if folder.exists():
            previous = _sibling(folder, _PREVIOUS)
            os.rename(folder, previous)
            after_save_step("moved aside")
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        after_save_step("committed")
        if previous is not None:
            shutil.rmtree(previous)
            after_save_step("removed previous")
    except OSError as e:
        if previous is not None and previous.exists() and not folder.exists():
            os.rename(previous, folder)  # the swap failed half-way: the previous checkpoint goes back
        raise CheckpointError(f"cannot write the checkpoint {folder}: {type(e).__name__}: {e}; check that the "
                              "folder is writable and the disk has space (the previous checkpoint is intact)") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "optimizer": dict, "scheme": dict, "steps_done": int, "options": dict, "selections": dict}


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} ({type(e).__name__}: {e}); the checkpoint is damaged") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds a {type(meta).__name__}, not a mapping; the checkpoint is damaged")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{file} holds format {meta.get('format')} v{meta.get('version')}; this pockengine "
                              f"reads {FORMAT} v{VERSION}")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if key not in meta or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{file}: '{key}' is missing or not a {getattr(kind, '__name__', kind)} "
                                  f"(got {value!r:.80}); the checkpoint is damaged or was edited")
    if meta["steps_done"] < 0:
        raise CheckpointError(f"{file}: steps_done is {meta['steps_done']}; the checkpoint is damaged or was edited")
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {type(e).__name__}: {e}; the checkpoint is damaged") from e


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    """`path`, once it holds a checkpoint (recovered first if a crash interrupted a save there)."""
    folder = Path(path)
    try:
        interrupted = " (a save into it was interrupted before it completed)" if (
            folder.parent.is_dir() and _siblings(folder, _SAVING)) else ""
        if os.access(folder.parent, os.W_OK):
            _recover(folder)
        if not folder.exists():
            raise CheckpointError(f"no checkpoint at {folder}: it does not exist{interrupted}; write one with "
                                  "trainer.save(path)")
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is a file, not a checkpoint folder; write one with trainer.save(path)")
        if not (folder / "trainer.json").exists():
            raise CheckpointError(f"{folder} is not a pockengine checkpoint (no trainer.json); write one with "
                                  "trainer.save(path)")
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint folder {folder}: {type(e).__name__}: {e}") from e
    return folder


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Every file parsed and checked (errors saying what is wrong), then verified against the manifest (what still
    parses may be changed bytes, such as zeroed weights): only what was written is returned."""
    folder = _checkpoint_folder(path)
    problems = manifest_problems(folder)
    damaged = f"the checkpoint {folder} is damaged and cannot be trusted: {'; '.join(problems[:5])}"
    try:
        ckpt = _parse(folder)
    except CheckpointError as e:
        if problems:  # the specific error may show in a file other than the damaged one
            raise CheckpointError(f"{e}. And {damaged}") from e
        raise
    if problems:
        raise CheckpointError(f"{damaged}. Restore it from a copy, or train again and save")
    return ckpt


def _parse(folder: Path) -> Checkpoint:
    meta = _read_meta(folder / "trainer.json")
    weights = _load_tensors(folder / "model.safetensors")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _load_tensors(folder / "optimizer.safetensors").items():
        param, _, name = key.partition("::")
        state.setdefault(param, {})[name] = t
    try:
        state_names = from_config(meta["optimizer"]).state_names
    except UserInputError as e:
        raise CheckpointError(f"{folder / 'trainer.json'} records an unusable optimizer: {e}") from e
    for param in meta["selections"]:
        missing = [name for name in state_names if name not in state.get(param, {})]
        if missing:
            raise CheckpointError(f"{folder / 'optimizer.safetensors'} has no optimizer state {missing} for {param}, "
                                  "which the checkpoint trains; it is damaged or was written for another scheme")
    generator = _load_tensors(folder / "generator.safetensors").get("state")
    if generator is None or generator.dtype != torch.uint8:
        raise CheckpointError(f"{folder / 'generator.safetensors'} holds no generator state; the checkpoint is "
                              "damaged")
    return Checkpoint(weights, state, meta, generator)


def recorded_setup(path: str | os.PathLike, model: nn.Module) -> tuple[Checkpoint, Optimizer, Scheme, Options]:
    """Read the checkpoint at `path`, check that it fits `model` (the architecture that was trained), load its
    weights into the model, and return it with the optimizer, scheme and options it records (`pockengine.load`
    builds the Trainer from them, then `restore_state`)."""
    ckpt = read_checkpoint(path)
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    got = {k: (tuple(v.shape), v.dtype) for k, v in ckpt.weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        differ = sorted(f"{k}: {got[k][1]} {list(got[k][0])} saved, {expected[k][1]} {list(expected[k][0])} here"
                        for k in set(got) & set(expected) if got[k] != expected[k])
        raise CheckpointError(f"the checkpoint {path} does not fit this model: missing {missing[:10]}, unexpected "
                              f"{unexpected[:10]}, other shapes or dtypes {differ[:10]}; pass a model of the "
                              "architecture that was trained")
    meta = ckpt.meta
    try:
        selections = {name: Selection.from_dict(d) for name, d in meta["selections"].items()}
        optimizer = from_config(meta["optimizer"])
        options = Options.from_dict(meta["options"])
    except UserInputError as e:
        raise CheckpointError(f"the checkpoint {path} records an unusable trainer in trainer.json: {e}") from e
    model.load_state_dict(ckpt.weights, strict=False)  # strict would also ask for tied aliases
    scheme = Scheme.from_resolved(selections, meta["scheme"].get("name", "recorded"))
    return ckpt, optimizer, scheme, options


def restore_state(trainer: Trainer, ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Put the recorded optimizer state, random generator state and step count into a Trainer built from
    `recorded_setup`."""
    for param, states in trainer.state.items():
        for name, t in states.items():
            saved = ckpt.optimizer_state.get(param, {}).get(name)
            if saved is None or saved.shape != t.shape:
                found = "none" if saved is None else f"shape {list(saved.shape)}"
                raise CheckpointError(f"the checkpoint {path} has no usable optimizer state '{name}' for {param} "
                                      f"(expected shape {list(t.shape)}, found {found}); it is damaged or was "
                                      "written for another scheme")
            t.copy_(saved)
    try:
        trainer.generator.set_state(ckpt.generator_state)
    except RuntimeError:  # saved on another kind of device (a CPU state cannot seed a CUDA generator)
        warnings.warn(f"pockengine: the random generator state in {path} was saved on another kind of device than "
                      f"{trainer.device}; the generator is seeded with the recorded seed {trainer.options.seed} "
                      "instead, so random draws (dropout, drop-path) differ from the uninterrupted run", RuntimeWarning, stacklevel=3)
    trainer.steps_done = ckpt.meta["steps_done"]
