"""What the contribution analysis tries: the model's layers and blocks, read from its structure, and the schemes of
the candidates (biases of the last k blocks; one weight at a channel ratio on top of the biases).

Layers are the modules that own trainable parameters, in the order the captured forward pass first uses them (the
order `Scheme.last(k)` counts in). The last one is the classifier, trained fully by every candidate. A layer's
block is its module name up to its first numeric component (`features.3.conv.0.0` -> `features.3`,
`bert.encoder.layer.5.attention.self.query` -> `bert.encoder.layer.5`); a name without one is a block of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from pockengine.capture import capture, normalize_batch
from pockengine.errors import UserInputError
from pockengine.scheme import Rule, Scheme, parametrised_layers
from pockengine.search.task import Task

RATIOS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))  # ratio 0 (not trained) is every layer's default
QUICK_RATIOS = (Fraction(1, 4), Fraction(1))


def block_of(layer: str) -> str:
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return layer


@dataclass(frozen=True)
class Structure:
    layers: tuple[str, ...]  # parametrised layers in forward order
    classifier: str  # the last layer: trained fully by every candidate and every searched scheme
    blocks: tuple[str, ...]  # blocks in forward order, the classifier's left out
    weights: tuple[str, ...]  # layers with a trainable weight of two or more dimensions, forward order, no classifier
    channels: tuple[int, ...]  # of each weight, along the dimension a partial rule selects (scheme.py)

    @classmethod
    def of(cls, task: Task) -> Structure:
        from pockengine.trainer import _layer_order  # the order Scheme.last(k) counts in

        model = task.build_model()
        trainable = set(parametrised_layers(model))
        if not trainable:
            raise UserInputError(f"task {task.name!r}: the model has no parameter that requires grad; nothing can be "
                                 "fine-tuned")
        cap = capture(model, task.loss_fn, normalize_batch(task.example_batch))
        layers = tuple(layer for layer in _layer_order(cap) if layer in trainable)
        classifier = layers[-1]
        blocks = tuple(dict.fromkeys(block_of(layer) for layer in layers[:-1] if block_of(layer) != classifier))
        modules = dict(model.named_modules())
        weights, channels = [], []
        for layer in layers[:-1]:
            matrices = [p for p in modules[layer].parameters(recurse=False) if p.requires_grad and p.dim() >= 2]
            if matrices:
                weights.append(layer)
                # As a partial rule counts them: input channels, or the output channels of a depthwise kernel.
                channels.append(min(p.shape[1] if p.shape[1] > 1 else p.shape[0] for p in matrices))
        return cls(layers, classifier, blocks, tuple(weights), tuple(channels))

    def ratios(self, layer: str, ratios: tuple[Fraction, ...]) -> list[Fraction]:
        """The ratios that train a distinct, non-zero number of `layer`'s channels (the smallest ratio of each)."""
        n = self.channels[self.weights.index(layer)]
        counts: dict[int, Fraction] = {}
        for r in ratios:
            counts.setdefault(round(r * n), r)  # round() as the scheme resolves a ratio
        return [r for count, r in counts.items() if count >= 1]


@dataclass(frozen=True)
class Candidate:
    """One scheme the analysis trains alone: the biases of the last `k` blocks, and `layer`'s weight at `ratio` of
    its channels (`layer` None: biases only). The classifier is always trained fully."""

    k: int
    layer: str | None = None
    ratio: Fraction = Fraction(0)

    @property
    def kind(self) -> str:
        return "bias" if self.layer is None else "weight"

    @property
    def label(self) -> str:
        return f"bias k={self.k}" if self.layer is None else f"{self.layer} @ {self.ratio}"

    def scheme(self, structure: Structure) -> Scheme:
        ratios = {} if self.layer is None else {self.layer: self.ratio}
        return build_scheme(structure, self.k, ratios, name=self.label)


def build_scheme(structure: Structure, k: int, ratios: dict[str, Fraction], name: str = "searched") -> Scheme:
    """Biases of the last `k` blocks, each layer of `ratios` at its ratio (0: not at all), the classifier fully."""
    if not 0 <= k <= len(structure.blocks):
        raise UserInputError(f"k={k}: the model has {len(structure.blocks)} blocks besides its classifier")
    rules = [Rule(block, "bias") for block in structure.blocks[len(structure.blocks) - k:]]
    for layer, ratio in ratios.items():
        if ratio == 1:
            rules.append(Rule(layer, "full"))
        elif ratio > 0:
            rules.append(Rule(layer, "partial", float(ratio)))
    rules.append(Rule(structure.classifier, "full"))  # last, so no bias rule over its block overrides it
    return Scheme(name, rules)


def quick_ks(blocks: int) -> list[int]:
    """0, powers of two and the deepest k: the bias curve's shape at a few points."""
    ks = {0, blocks}
    ks.update(k for k in (2 ** i for i in range(blocks.bit_length())) if k <= blocks)
    return sorted(ks)


def candidates(structure: Structure, quick: bool, quick_layers: int = 20) -> tuple[list[Candidate], list[Candidate]]:
    """The bias candidates (k = 0 .. every block) and the weight candidates (each weight at each ratio, on top of
    the biases of every analysed block). `quick`: k at powers of two only, the last `quick_layers` weights only
    (nearest the classifier: cheapest to reach, largest gains in few steps), ratios 1/4 and 1."""
    blocks = len(structure.blocks)
    ks = quick_ks(blocks) if quick else list(range(blocks + 1))
    layers = structure.weights[-quick_layers:] if quick else structure.weights
    ratios = QUICK_RATIOS if quick else RATIOS
    return [Candidate(k) for k in ks], [Candidate(blocks, layer, r) for layer in layers
                                        for r in structure.ratios(layer, ratios)]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameter and buffer names, shapes, dtypes and values: the cache is per weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def batch_signature(batch: Any) -> list:
    """Shapes and dtypes of the example batch (another batch shape is another analysis)."""
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten(normalize_batch(batch))
    return [[list(t.shape), str(t.dtype)] if isinstance(t, torch.Tensor) else repr(t) for t in leaves]
