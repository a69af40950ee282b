"""Benchmark workloads: real pretrained models on real data, built from bench/workloads.yaml and bench/schemes.yaml.

Every process of a run (one per system and scheme) calls `build(name, quick)` and gets bit-identical weights and
batches, so the systems start from the same point and see the same batch sequence.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.utils._pytree import tree_map

import pockengine as pe
from pockengine.scheme import Scheme, Selection

CONFIG_DIR = Path(os.environ.get("POCKENGINE_BENCH_CONFIG") or Path(__file__).resolve().parent)


def load_config(config_dir: Path = CONFIG_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """(workloads.yaml, schemes.yaml) as dicts."""
    workloads = yaml.safe_load((config_dir / "workloads.yaml").read_text())
    schemes = yaml.safe_load((config_dir / "schemes.yaml").read_text())
    return workloads, schemes


def workload_config(name: str, quick: bool, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The settings of workload `name` (defaults, then the workload, then its `quick` overrides)."""
    workloads, _ = load_config(config_dir)
    if name not in workloads["workloads"]:
        raise KeyError(f"unknown workload {name!r}; bench/workloads.yaml has {sorted(workloads['workloads'])}")
    cfg = dict(workloads.get("defaults", {}))
    spec = dict(workloads["workloads"][name])
    quick_over = spec.pop("quick", {}) or {}
    cfg.update(spec)
    if quick:
        cfg.update(quick_over)
    cfg["name"] = name
    cfg["quick"] = quick
    return cfg


def scheme_for(workload: str, scheme: str, quick: bool, config_dir: Path = CONFIG_DIR) -> Scheme:
    """The pockengine.Scheme named `scheme` of `workload` in bench/schemes.yaml."""
    _, schemes = load_config(config_dir)
    try:
        spec = dict(schemes[workload][scheme])
    except KeyError:
        raise KeyError(f"bench/schemes.yaml has no scheme {scheme!r} for {workload!r}") from None
    preset = spec.pop("preset", None)
    quick_rules = spec.pop("quick_rules", None)
    if preset == "full":
        return Scheme("full", Scheme.full().rules)
    if preset == "bias_only":
        return Scheme("bias_only", Scheme.bias_only().rules)
    if preset is not None:
        raise ValueError(f"unknown preset {preset!r} in scheme {scheme!r} of {workload!r}")
    if quick and quick_rules is not None:
        spec["rules"] = quick_rules
    spec["name"] = scheme
    return Scheme.from_dict(spec)


@dataclass
class Workload:
    name: str
    cfg: dict[str, Any]
    model: nn.Module
    loss_fn: Callable
    batches: list[tuple[Any, torch.Tensor]]  # (inputs, target); inputs a tuple or a dict of tensors
    unit: str  # "samples" | "tokens"
    items_per_step: int
    lr: float
    freeze_batchnorm: bool
    input_names: list[str]  # positional order of the model inputs (for ONNX export)
    label_fn: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)  # target -> ORT's 1-D labels

    def batch(self, i: int) -> tuple[Any, torch.Tensor]:
        return self.batches[i % len(self.batches)]

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)

    def flat_inputs(self, inputs: Any) -> list[torch.Tensor]:
        return [inputs[k] for k in self.input_names] if isinstance(inputs, dict) else list(inputs)


class LogitsForLoss(nn.Module):
    """Wraps a model for ONNX export: positional tensor inputs in, 2-D logits out (rows = predictions), so that
    ONNX Runtime's CrossEntropyLoss over 1-D labels computes the same loss as the benchmark's loss_fn."""

    def __init__(self, model: nn.Module, input_names: list[str], causal: bool):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.causal = causal

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.input_names == ["pixels"]:
            out = self.model(*args)
        else:
            out = self.model(**dict(zip(self.input_names, args)))
        logits = out.logits if hasattr(out, "logits") else out
        if self.causal:
            logits = logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def _mobilenet(cfg: dict[str, Any]) -> Workload:
    from pockengine.data import batches, load_mnist, mnist_for_imagenet_model
    from pockengine.models import mobilenet_v2

    model = mobilenet_v2(pretrained=True, num_classes=10)
    if cfg.get("layers"):  # --quick: the first pretrained blocks only, under a new (seeded) head
        model.features = model.features[: cfg["layers"]]
        width = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        model.classifier[1] = nn.Linear(width, 10)
        nn.init.normal_(model.classifier[1].weight, 0, 0.01, generator=torch.Generator().manual_seed(0))
        nn.init.zeros_(model.classifier[1].bias)
    images, labels = load_mnist("train")
    stream = batches(images, labels, cfg["batch"], seed=0)
    data = []
    for _ in range(cfg["batches"]):
        x, y = next(stream)
        data.append(((mnist_for_imagenet_model(x, cfg["image_size"]).contiguous(),), y))
    return Workload(cfg["name"], cfg, model, pe.losses.cross_entropy(), data, "samples", cfg["batch"], cfg["lr"],
                    True, ["pixels"])


def _long_reviews(tokenizer: Any, n: int, seq_len: int) -> tuple[list[str], list[int]]:
    """The first n IMDB reviews (alternating labels) that fill seq_len tokens: no padding, every token counts."""
    from pockengine.data import load_movie_reviews

    texts, labels = load_movie_reviews("imdb")
    picked: dict[int, list[str]] = {0: [], 1: []}
    for text, label in zip(texts, labels):
        if len(picked[label]) < (n + 1) // 2 and len(tokenizer(text)["input_ids"]) >= seq_len:
            picked[label].append(text)
        if all(len(v) >= (n + 1) // 2 for v in picked.values()):
            break
    out_t, out_l = [], []
    for i in range(n):
        label = i % 2
        out_t.append(picked[label][i // 2])
        out_l.append(label)
    return out_t, out_l


def _packed_reviews(tokenizer: Any, n: int, seq_len: int) -> list[list[int]]:
    """n rows of seq_len tokens: IMDB reviews in file order, each followed by the end-of-text token, concatenated and
    cut into rows (packing, as language models are trained on long text; few reviews fill 1024 tokens alone)."""
    from pockengine.data import load_movie_reviews

    stream: list[int] = []
    for text in load_movie_reviews("imdb")[0]:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= n * seq_len:
            return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    raise ValueError(f"the IMDB reviews hold {len(stream)} tokens, fewer than {n} rows of {seq_len}")


def _minilm(cfg: dict[str, Any]) -> Workload:
    from pockengine.data import tokenize_batch
    from pockengine.models import minilm_classifier

    model, tokenizer = minilm_classifier(num_labels=2)
    if cfg.get("layers"):
        model.bert.encoder.layer = model.bert.encoder.layer[: cfg["layers"]]
        model.config.num_hidden_layers = cfg["layers"]
    n, b = cfg["batches"] * cfg["batch"], cfg["batch"]
    texts, labels = _long_reviews(tokenizer, n, cfg["seq_len"])
    data = []
    for i in range(cfg["batches"]):
        enc = tokenize_batch(tokenizer, texts[i * b:(i + 1) * b], cfg["seq_len"])
        data.append((enc, torch.tensor(labels[i * b:(i + 1) * b])))
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in data[0][0]]
    return Workload(cfg["name"], cfg, model, pe.losses.cross_entropy(), data, "samples", b, cfg["lr"], False, names)


def _smollm2(cfg: dict[str, Any]) -> Workload:
    from pockengine.models import smollm2

    model, tokenizer = smollm2(max_layers=cfg.get("layers"))
    n, b, t = cfg["batches"] * cfg["batch"], cfg["batch"], cfg["seq_len"]
    if cfg.get("packed"):
        rows = _packed_reviews(tokenizer, n, t)
    else:
        rows = [tokenizer(s)["input_ids"][:t] for s in _long_reviews(tokenizer, n, t)[0]]
    data = []
    for i in range(cfg["batches"]):
        ids = torch.tensor(rows[i * b:(i + 1) * b])
        # An explicit all-ones mask (no padding: every row is full) for every system; without one,
        # transformers looks for packed sequences with torch.diff, which ONNX export does not support.
        data.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()))
    return Workload(cfg["name"], cfg, model, pe.losses.causal_lm(), data, "tokens", b * t, cfg["lr"], False,
                    ["input_ids", "attention_mask"], label_fn=lambda target: target[:, 1:].reshape(-1))


_BUILDERS = {"mobilenet_v2": _mobilenet, "minilm": _minilm, "smollm2": _smollm2}


def build(name: str, quick: bool = False, config_dir: Path = CONFIG_DIR, device: str = "cpu") -> Workload:
    """Model (eval mode: dropout off, BatchNorm statistics frozen), loss and batches of workload `name`, on
    `device` (built on the CPU and moved, so that every device starts from the same weights and batches)."""
    cfg = workload_config(name, quick, config_dir)
    torch.manual_seed(0)
    w = _BUILDERS[cfg["model"]](cfg)
    w.model.eval()
    if device != "cpu":
        w.model.to(device)
        w.batches = [tree_map(lambda t: t.to(device), b) for b in w.batches]
    return w


def causal(w: Workload) -> bool:
    return w.cfg["model"] == "smollm2"


def resolve(w: Workload, scheme: Scheme) -> dict[str, Selection]:
    """The scheme's trained set on this model, resolved as pe.compile resolves it (forward layer order for last-k)."""
    order = None
    if scheme.last_k is not None:
        from pockengine.capture import capture
        from pockengine.trainer import _layer_order

        order = _layer_order(capture(copy.deepcopy(w.model), w.loss_fn, w.batch(0)))
    return scheme.resolve(w.model, order)
