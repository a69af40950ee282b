"""Schemes: which parameters a fine-tuning run trains, and how much of each.

A scheme is an ordered list of rules; each rule names modules by glob pattern over module names
(`features.1[4-7]`, `*.attention.self.query`, `*`) and says how the parameters in those modules' subtrees are
trained. Later rules override earlier ones for the parameters they reach. Modes:

- `frozen`:  nothing is trained;
- `bias`:    only parameters named `bias`;
- `full`:    every parameter;
- `partial`: weights with two or more dimensions train a fraction `ratio` of their input channels (dim 1; dim 0 of a
  depthwise convolution, whose weight is one input channel per output channel), the `first` k or the k of largest
  `magnitude`; one-dimensional parameters (biases, norm scales) are trained fully.

Presets: `Scheme.full()`, `bias_only()`, `last(k)` (the last k parametrised layers in forward order, fully trained),
`head()` (the last one). A scheme resolves against a model into `{parameter name: Selection}`; the selected channels
are recorded there, so a run can be reproduced exactly (`Scheme.from_resolved`). A parameter with
`requires_grad=False` is never trained by any scheme: the user froze it.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pockengine.errors import UserInputError

MODES = ("frozen", "bias", "full", "partial")
SELECTS = ("first", "magnitude")


@dataclass(frozen=True)
class Selection:
    """How one parameter is trained: all of it, or the `channels` (sorted indices) along dimension `dim`."""

    kind: str = "full"  # "full" | "partial"
    dim: int = 0
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "full":
            return
        channels = list(self.channels) if isinstance(self.channels, tuple) else None
        if (self.kind != "partial" or not _is_int(self.dim) or self.dim < 0 or not channels
                or not all(_is_int(c) and c >= 0 for c in channels) or channels != sorted(set(channels))):
            raise UserInputError(f"a selection is full, or partial with a dimension 'dim' >= 0 and 'channels', a "
                                 f"non-empty sorted tuple of distinct indices; got {self!r:.200}")

    @property
    def is_prefix(self) -> bool:
        """The channels are 0..k-1, so the trained part is a plain slice (a view) of the parameter."""
        return self.channels == tuple(range(len(self.channels)))

    def mask(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """Boolean mask of the trained entries (None when the whole parameter is trained)."""
        if self.kind == "full":
            return None
        m = torch.zeros(shape[self.dim], dtype=torch.bool)
        m[list(self.channels)] = True
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return m.view(view).expand(shape)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "full":
            return {"kind": "full"}
        return {"kind": "partial", "dim": self.dim, "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        if not isinstance(d, dict) or d.get("kind") not in ("full", "partial"):
            raise UserInputError(f"a selection is {{'kind': 'full'}} or {{'kind': 'partial', 'dim': d, 'channels': "
                                 f"[...]}}, got {d!r:.200}")
        if d["kind"] == "full":
            return cls("full")
        if not isinstance(d.get("channels"), list):
            raise UserInputError(f"a partial selection lists its 'channels', got {d!r:.200}")
        return cls("partial", d.get("dim"), tuple(d["channels"]))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a selection that does not fit parameter `name` of this shape (recorded for another model)."""
        if self.kind == "full":
            return
        if self.dim >= len(shape) or self.channels[-1] >= shape[self.dim]:
            raise UserInputError(f"the selection of {name} (dim {self.dim}, channels up to {self.channels[-1]}) "
                                 f"does not fit its shape {list(shape)}; it was recorded for another model")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    modules: str  # glob over module names; "*" is every module
    mode: str
    ratio: float | None = None  # partial only
    select: str = "first"  # partial only

    def __post_init__(self) -> None:
        if not isinstance(self.modules, str) or not self.modules:
            raise UserInputError(f"a rule's 'modules' is a glob over module names written as a string, such as "
                                 f"'features.1[4-7]' or '*' (quote it in YAML), got {self.modules!r}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise UserInputError(f"unknown mode {self.mode!r} for modules {self.modules!r}; expected one of {MODES}")
        if self.mode == "partial":
            if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0 < self.ratio <= 1:
                raise UserInputError(f"partial training of {self.modules!r} needs a ratio in (0, 1], got {self.ratio}")
            if not isinstance(self.select, str) or self.select not in SELECTS:
                raise UserInputError(f"select must be one of {SELECTS}, got {self.select!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"modules": self.modules, "mode": self.mode}
        if self.mode == "partial":
            d.update(ratio=self.ratio, select=self.select)
        return d


def _ratio(value: Any) -> float:
    """Ratios may be written as numbers or fractions such as "1/4"."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(value)
        return float(Fraction(str(value)))
    except (ValueError, ZeroDivisionError) as e:
        raise UserInputError(f"cannot read ratio {value!r}; write a number such as 0.25 or a fraction such as "
                             "1/4") from e


def parametrised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own trainable parameters (requires_grad) directly, in registration order."""
    return [name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


@dataclass
class Scheme:
    name: str = "custom"
    rules: list[Rule] = field(default_factory=list)
    last_k: int | None = None  # train the last k parametrised layers (in forward order) fully
    resolved: dict[str, Selection] | None = None  # a recorded resolution, replayed as is

    def __post_init__(self) -> None:
        if self.last_k is not None and (not _is_int(self.last_k) or self.last_k < 1):
            raise UserInputError(f"last(k) needs an integer k >= 1 (the number of layers to train), got "
                                 f"{self.last_k!r}")
        if not isinstance(self.rules, list) or not all(isinstance(r, Rule) for r in self.rules):
            raise UserInputError(f"a scheme's rules are a list of pockengine.scheme.Rule, got {self.rules!r:.200}")
        if self.resolved is not None and not all(isinstance(n, str) and isinstance(s, Selection)
                                                 for n, s in self.resolved.items()):
            raise UserInputError("a recorded scheme maps parameter names to pockengine.scheme.Selection")

    # -- presets --------------------------------------------------------------------------------------------
    @classmethod
    def full(cls) -> Scheme:
        """Train every parameter (full fine-tuning)."""
        return cls("full", [Rule("*", "full")])

    @classmethod
    def bias_only(cls) -> Scheme:
        """Train every bias, nothing else."""
        return cls("bias_only", [Rule("*", "bias")])

    @classmethod
    def last(cls, k: int) -> Scheme:
        """Train the last k parametrised layers in forward order, fully."""
        return cls(f"last{k}", [], last_k=k)

    @classmethod
    def head(cls) -> Scheme:
        """Train the last parametrised layer only (the classifier head)."""
        return cls("head", [], last_k=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheme:
        """Read `{"name": ..., "last": k, "rules": [{"modules": glob, "mode": ..., "ratio": ..., "select": ...}]}`."""
        if not isinstance(d, dict):
            raise UserInputError(f"a scheme is a mapping with 'rules' (and optionally 'name', 'last'), got "
                                 f"{type(d).__name__}")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise UserInputError(f"a scheme's name is a string, got {name!r}")
        if "resolved" in d:
            if set(d) - {"name", "resolved"} or not isinstance(d["resolved"], dict):
                raise UserInputError("a recorded scheme is {'name': ..., 'resolved': {parameter: selection}}")
            return cls.from_resolved({k: Selection.from_dict(v) for k, v in d["resolved"].items()}, name)
        unknown = set(d) - {"name", "rules", "last"}
        if unknown:
            raise UserInputError(f"unknown scheme keys {sorted(map(str, unknown))}; a scheme has name, rules and last")
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise UserInputError(f"a scheme's 'rules' is a list of rules, got {type(raw_rules).__name__}")
        rules = []
        for r in raw_rules:
            if not isinstance(r, dict):
                raise UserInputError(f"a rule is a mapping such as {{modules: '*', mode: bias}}, got {r!r}")
            extra = set(r) - {"modules", "mode", "ratio", "select"}
            if extra or "modules" not in r or "mode" not in r:
                raise UserInputError(f"a rule needs 'modules' and 'mode' (and for partial 'ratio', 'select'); "
                                     f"got {r}")
            partial = r["mode"] == "partial"
            if not partial and ("ratio" in r or "select" in r):
                warnings.warn(f"'ratio' and 'select' apply to mode partial only; ignored in rule {r}", UserWarning,
                              stacklevel=2)
            rules.append(Rule(r["modules"], r["mode"], _ratio(r["ratio"]) if partial and "ratio" in r else None,
                              r.get("select", "first") if partial else "first"))
        return cls(name, rules, last_k=d.get("last"))

    @classmethod
    def from_file(cls, path: str | Path) -> Scheme:
        """Read a scheme from a .json or .yaml/.yml file (same layout as from_dict)."""
        path = Path(path)
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise UserInputError(f"scheme files are .json, .yaml or .yml; got {path.name}")
        if not path.is_file():
            raise UserInputError(f"scheme file {path} does not exist")
        import yaml

        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
            raise UserInputError(f"cannot read the scheme file {path}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise UserInputError(f"{path} must hold a mapping with 'rules' (and optionally 'name', 'last')")
        try:
            return cls.from_dict(data)
        except UserInputError as e:
            raise UserInputError(f"scheme file {path}: {e}") from e

    @classmethod
    def from_resolved(cls, selections: dict[str, Selection], name: str = "recorded") -> Scheme:
        return cls(name, resolved=dict(selections))

    def to_dict(self) -> dict[str, Any]:
        if self.resolved is not None:
            return {"name": self.name, "resolved": {k: v.to_dict() for k, v in self.resolved.items()}}
        d: dict[str, Any] = {"name": self.name, "rules": [r.to_dict() for r in self.rules]}
        if self.last_k is not None:
            d["last"] = self.last_k
        return d

    # -- resolution -----------------------------------------------------------------------------------------
    def resolve(self, model: nn.Module, layer_order: list[str] | None = None) -> dict[str, Selection]:
        """`{parameter name: Selection}` for the trained parameters of `model`, in `named_parameters` order.

        `layer_order` lists parametrised module names in forward order (from the captured graph); without it the
        registration order is used.
        """
        every = dict(model.named_parameters())
        params = {n: p for n, p in every.items() if p.requires_grad}  # the user's requires_grad=False is final
        if self.resolved is not None:
            unknown = sorted(set(self.resolved) - set(every))
            if unknown:
                raise UserInputError(f"recorded selections name parameters the model lacks: {unknown[:10]}")
            frozen = sorted(set(self.resolved) - set(params))
            if frozen:
                raise UserInputError(f"recorded selections train parameters that have requires_grad=False here: "
                                     f"{frozen[:10]}; call requires_grad_(True) on them, or record another scheme")
            for n, sel in self.resolved.items():
                sel.check(n, tuple(every[n].shape))
            return {n: self.resolved[n] for n in params if n in self.resolved}
        modules = [name for name, _ in model.named_modules()]
        chosen: dict[str, Selection | None] = {}
        # What the rules would select were nothing frozen: an empty result is then told apart from one the
        # user's requires_grad=False emptied.
        selects_frozen: dict[str, bool] = {}
        if self.last_k is not None:
            trainable = parametrised_layers(model)
            layers = [layer for layer in layer_order if layer in trainable] if layer_order else trainable
            if self.last_k > len(layers):
                frozen_layers = len({n.rpartition(".")[0] for n in every} - set(trainable))
                raise UserInputError(
                    f"last({self.last_k}) asks for more layers than the model's {len(layers)} with a parameter that "
                    "requires grad" + (f" ({frozen_layers} more have only requires_grad=False parameters: the user "
                                       "froze them, and pockengine never trains those)" if frozen_layers else ""))
            for layer in layers[-self.last_k:]:
                for pname in params:
                    if pname.rpartition(".")[0] == layer:
                        chosen[pname] = Selection("full")
        for rule in self.rules:
            matched = [m for m in modules if fnmatch.fnmatchcase(m, rule.modules)]
            if not matched:
                close = difflib.get_close_matches(rule.modules, modules, n=5, cutoff=0.5)
                raise UserInputError(f"scheme rule {rule.modules!r} names no module of the model; closest names: "
                                     f"{close or modules[:5]}")
            prefixes = [m + "." if m else "" for m in matched]
            reached = [pname for pname in every if any(pname.startswith(pre) for pre in prefixes)]
            if rule.mode != "frozen" and reached and not any(pname in params for pname in reached):
                warnings.warn(f"scheme rule {rule.modules!r} ({rule.mode}) reaches only parameters with "
                              f"requires_grad=False ({reached[:5]}), so it trains nothing", UserWarning, stacklevel=2)
            for pname in reached:
                if pname in params:
                    chosen[pname] = _select(rule, pname, params[pname])
                else:
                    selects_frozen[pname] = rule.mode in ("full", "partial") or (
                        rule.mode == "bias" and pname.rpartition(".")[2] == "bias")
        selected = {n: s for n, s in ((n, chosen.get(n)) for n in params) if s is not None}
        frozen = [n for n, selects in selects_frozen.items() if selects]
        if not selected and frozen:
            raise UserInputError(
                f"scheme {self.name!r} trains nothing: every parameter it selects has requires_grad=False "
                f"({len(frozen)}: {frozen[:5]}{' ...' if len(frozen) > 5 else ''}); pockengine never trains a "
                "parameter the user froze. Call requires_grad_(True) on those to train them, or select others")
        return selected  # empty when the rules select no parameter at all: the caller names that case


def _select(rule: Rule, name: str, p: torch.Tensor) -> Selection | None:
    if rule.mode == "frozen":
        return None
    if rule.mode == "bias":
        return Selection("full") if name.rpartition(".")[2] == "bias" else None
    if rule.mode == "full" or p.dim() < 2:
        return Selection("full")
    dim = 1 if p.shape[1] > 1 else 0  # a depthwise kernel has one input channel per output channel
    n = p.shape[dim]
    k = round(rule.ratio * n)
    if k < 1:
        raise UserInputError(f"ratio {rule.ratio} of the {n} channels of {name} selects no channel; use a ratio of "
                             f"at least 1/{n}")
    if k == n:
        return Selection("full")
    if rule.select == "first":
        channels = tuple(range(k))
    else:
        norms = p.detach().transpose(0, dim).reshape(n, -1).norm(dim=1)
        channels = tuple(sorted(torch.topk(norms, k).indices.tolist()))
    return Selection("partial", dim, channels)


def summary(model: nn.Module, selections: dict[str, Selection]) -> str:
    """A table of every parameter: shape, how it is trained, trained and total entries."""
    rows = [("parameter", "shape", "trained", "entries", "of")]
    total = trained = 0
    for name, p in model.named_parameters():
        sel = selections.get(name)
        n = p.numel()
        t = 0 if sel is None else n if sel.kind == "full" else n // p.shape[sel.dim] * len(sel.channels)
        how = "-" if sel is None else "full" if sel.kind == "full" else f"{len(sel.channels)}/{p.shape[sel.dim]} ch"
        rows.append((name, "x".join(map(str, p.shape)), how, str(t), str(n)))
        total, trained = total + n, trained + t
    rows.append(("total", "", f"{100 * trained / max(total, 1):.2f}%", str(trained), str(total)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def gradient_masks(model: nn.Module, selections: dict[str, Selection]) -> dict[str, torch.Tensor | None]:
    """For baselines (eager, torch.compile...): which entries of each trained parameter may change."""
    params = dict(model.named_parameters())
    return {name: sel.mask(params[name].shape) for name, sel in selections.items()}
