"""The messages of captures that fail: what failed, where in the model, and the way out."""

from __future__ import annotations

import linecache
import os
import sysconfig
import traceback
import types
from pathlib import Path

import torch
from torch import nn

from pockengine.errors import CaptureError

aten = torch.ops.aten


def parameter_mutation_error(parameter: str, module: str, write: torch.fx.Node) -> CaptureError:
    """The model writes `write`'s value into `parameter` during forward (`module`: where, '' for the model's own
    forward). An embedding's `max_norm` is the usual cause and has its own way out; RWKV's rescaling is the other
    one known."""
    where = f"in module {module!r}" if module else "in its forward"
    why = ("pockengine changes parameters only in the optimizer step, so a program repeating the write at every step "
           "would differ from eager PyTorch")
    if getattr(write.target, "overloadpacket", None) in (aten.embedding_renorm, aten.embedding_renorm_):
        return CaptureError(
            f"nn.Embedding(max_norm=...) (or F.embedding with max_norm) renormalizes its weight {parameter!r} in "
            f"place during forward ({where}: aten.embedding_renorm_); {why}. Set max_norm=None on the embedding "
            f"before compiling (`model.get_submodule({module!r}).max_norm = None`); where the bound matters, "
            "renormalize the rows between steps instead, under torch.no_grad(): "
            "torch.embedding_renorm_(weight, ids, max_norm, norm_type).")
    return CaptureError(
        f"the model writes into its parameter {parameter!r} {where}; {why}. Make the change outside the forward "
        "pass (RWKV rescales its weights on the first forward pass of each mode: run the model once in that mode "
        "before compiling).")


_OURS = (Path(torch.__file__).resolve().parent, Path(__file__).resolve().parents[1])  # torch's and pockengine's frames
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
_HINT = ("pockengine needs a model whose forward (and loss_fn) torch.export can trace: no data-dependent Python "
         "control flow on tensor values and no calls that leave PyTorch (.item(), numpy).")


def export_failure(error: BaseException, model: nn.Module) -> CaptureError:
    """torch.export failed on `model` with its loss (and eager PyTorch did not): the error naming the model's own
    line that failed, its module and class, where the traceback shows them (torch's own message names the innermost
    frame outside torch, which while capturing may be one of pockengine's tracing hooks)."""
    message = "\n".join(line for line in str(error).splitlines() if not _names_our_file(line))[:2000]
    call = _failing_call(error, model)
    return CaptureError(f"torch.export could not capture the model with its loss{call}:\n{type(error).__name__}: "
                        f"{message}\n{_HINT}")


def _names_our_file(line: str) -> bool:
    return "Caused by:" in line and f"{_OURS[1].name}{os.sep}" in line


def _frames(error: BaseException) -> list[types.FrameType]:
    """The frames of `error`'s traceback, outermost first; of the exception it was raised from or during when its
    own traceback stays in torch (torch re-raises what it caught)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
        if any(_is_model_code(f) for f in frames):
            return frames
        error = error.__cause__ or error.__context__
    return []


def _is_model_code(frame: types.FrameType) -> bool:
    """A frame of the model's code or its library's (transformers'), not of torch, pockengine or Python's own."""
    name = frame.f_code.co_filename
    if name.startswith("<"):
        return False  # generated code (torch.fx's), a frozen module
    path = Path(name).resolve()
    if any(path.is_relative_to(p) for p in _OURS):
        return False
    return not path.is_relative_to(_STDLIB) or bool({"site-packages", "dist-packages"} & set(path.parts))


def _failing_call(error: BaseException, model: nn.Module) -> str:
    """' in module 'path' (Class.method), at file:line: `source`' for the innermost frame of model code in the
    traceback and the innermost module of `model` at or above it; '' when the traceback has no model code (torch
    failed after tracing, or in its own checks)."""
    frames = _frames(error)
    calls = [i for i, f in enumerate(frames) if _is_model_code(f)]
    if not calls:
        return ""
    frame = frames[calls[-1]]
    code = frame.f_code
    source = linecache.getline(code.co_filename, frame.f_lineno).strip()
    at = f"at {_short(code.co_filename)}:{frame.f_lineno} (in {code.co_name})" + (f": `{source}`" if source else "")
    names = {id(m): name for name, m in model.named_modules()}
    for f in reversed(frames[:calls[-1] + 1]):
        owner = f.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = f"module '{names[id(owner)]}'" if names[id(owner)] else "the model's forward"
            return f" in {where} ({type(owner).__qualname__}.{f.f_code.co_name}), {at}"
    return f" {at}"


def _short(filename: str) -> str:
    """A library's file from its package folder (transformers/models/...), any other as it is."""
    parts = Path(filename).parts
    for folder in ("site-packages", "dist-packages"):
        if folder in parts:
            return str(Path(*parts[len(parts) - parts[::-1].index(folder):]))
    return filename
