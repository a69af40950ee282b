"""Built-in tasks: the real MobileNetV2 (ImageNet weights) on real MNIST images, as `pockengine train` runs it."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pockengine.errors import UserInputError
from pockengine.losses import cross_entropy
from pockengine.search.task import Batch, Task

MODELS = ("mobilenet_v2",)
DATA = ("mnist",)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
    """Held-out accuracy in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return (pred == y).float().mean().item()


def mnist_task(size: int = 64, batch_size: int = 8, eval_size: int = 512) -> Task:
    """MobileNetV2 -> MNIST at `size` x `size` pixels: training batches from the training split (full batches
    only, so every step has the example batch's shape), accuracy on the first `eval_size` validation images."""
    from pockengine.data import batches, load_mnist, mnist_for_imagenet_model
    from pockengine.models import mobilenet_v2

    images, labels = load_mnist("train")
    val_images, val_labels = load_mnist("val")
    val_x = mnist_for_imagenet_model(val_images[:eval_size], size)
    val_y = val_labels[:eval_size]

    def train_batches(seed: int) -> Iterator[Batch]:
        epoch = 0
        while True:
            for x, y in batches(images, labels, batch_size, seed=seed + epoch):
                if len(y) == batch_size:
                    yield (mnist_for_imagenet_model(x, size),), y
            epoch += 1

    return Task(name=f"mobilenet_v2-mnist-{size}px-batch{batch_size}-eval{eval_size}",
                build_model=lambda: mobilenet_v2(pretrained=True, num_classes=10),
                loss_fn=cross_entropy(), example_batch=next(train_batches(0)), train_batches=train_batches,
                evaluate=lambda model: accuracy(model, val_x, val_y), metric="accuracy")


def builtin_task(model: str, data: str, *, size: int = 64, batch_size: int = 8, eval_size: int = 512) -> Task:
    """The Task of a built-in model on a built-in data set."""
    if (model, data) != ("mobilenet_v2", "mnist"):
        raise UserInputError(f"no built-in task for --model {model} --data {data}; built in: --model mobilenet_v2 "
                             "--data mnist")
    return mnist_task(size, batch_size, eval_size)
