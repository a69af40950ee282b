"""Tiny, fast Tasks for the analysis and search tests: a small conv net, pretrained on one synthetic task and
fine-tuned on another (new classifier), both learnable."""

from __future__ import annotations

import functools

import torch
from torch import nn

import pockengine as pe
from pockengine.search import Task

CLASSES, SIZE, BATCH = 4, 8, 8


def _data(n: int, seed: int, task_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class of a task is a fixed random template (a colour and a pattern); a sample is its template plus noise."""
    fixed = torch.Generator().manual_seed(task_seed)
    templates = torch.randn(CLASSES, 3, 1, 1, generator=fixed) + torch.randn(CLASSES, 3, SIZE, SIZE, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 3, SIZE, SIZE, generator=g), y


def _architecture() -> nn.Sequential:
    def block(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 8, 3), block(8, 16, 3, 2), block(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))


@functools.cache
def _pretrained() -> dict[str, torch.Tensor]:
    """Weights trained eagerly on a source task (its own templates), once per test session."""
    torch.manual_seed(0)
    model = _architecture()
    x, y = _data(1024, 0, task_seed=99)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_convnet() -> nn.Module:
    """The pretrained conv net with a new classifier; the same weights every call."""
    model = _architecture()
    model.load_state_dict(_pretrained())
    head = model[5]
    gen = torch.Generator().manual_seed(7)
    nn.init.normal_(head.weight, 0, 0.1, generator=gen)
    nn.init.zeros_(head.bias)
    return model


def tiny_task(name: str = "tiny") -> Task:
    train_x, train_y = _data(512, 1, task_seed=1234)
    val_x, val_y = _data(256, 2, task_seed=1234)

    def train_batches(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(train_y), generator=g)
            for i in range(0, len(order) - BATCH + 1, BATCH):
                idx = order[i:i + BATCH]
                yield (train_x[idx],), train_y[idx]

    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            acc = (model(val_x).argmax(-1) == val_y).float().mean().item()
        model.train(was)
        return acc

    return Task(name, tiny_convnet, pe.losses.cross_entropy(), ((train_x[:BATCH],), train_y[:BATCH]), train_batches,
                evaluate, "accuracy")
