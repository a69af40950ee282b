"""Command line (`pockengine ...`, or `python -m pockengine ...`): `pockengine train` fine-tunes the real MobileNetV2
on real MNIST images with a compiled step. The benchmark suite is not part of the package: `python -m bench` from a
clone of the repository."""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import pockengine as pe
from pockengine.checkpoint import check_save_target


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64]).argmax(-1) for i in range(0, len(x), 64)])
    model.train(was_training)
    return (pred == y).float().mean().item()


PRESETS = {"full": pe.Scheme.full, "bias_only": pe.Scheme.bias_only, "head": pe.Scheme.head}


def _scheme(spec: str) -> pe.Scheme:
    """`full`, `bias_only`, `head`, `last:K`, or a .yaml/.json scheme file."""
    if spec in PRESETS:
        return PRESETS[spec]()
    if spec.startswith("last:"):
        k = spec.removeprefix("last:").strip()
        if not k.lstrip("+-").isdigit():
            raise pe.UserInputError(f"--scheme {spec}: write last:K with an integer K, e.g. last:4")
        if int(k) < 1:
            raise pe.UserInputError(f"--scheme {spec}: K is the number of last layers to train, at least 1 "
                                    "(last:1 trains the classifier only)")
        return pe.Scheme.last(int(k))
    if Path(spec).suffix not in (".yaml", ".yml", ".json"):
        raise pe.UserInputError(f"--scheme {spec!r} is neither a preset ({', '.join(PRESETS)}, last:K) nor a scheme "
                                "file (.yaml, .yml or .json)")
    return pe.Scheme.from_file(spec)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def train(args: argparse.Namespace) -> int:
    from pockengine.data import batches, load_mnist, mnist_for_imagenet_model
    from pockengine.models import mobilenet_v2

    # Everything the user wrote is checked before minutes go into loading and compiling.
    scheme = _scheme(args.scheme)
    if args.save:
        check_save_target(Path(args.save))
    optimizer = (pe.optim.AdamW(lr=args.lr) if args.optimizer == "adamw"
                 else pe.optim.SGD(lr=args.lr, momentum=0.9))
    options = pe.Options(freeze_batchnorm=True, seed=args.seed, disable=frozenset(args.disable))
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = load_mnist("train")
    val_images, val_labels = load_mnist("val")
    val_x = mnist_for_imagenet_model(val_images[:args.eval_size], args.size)
    val_y = val_labels[:args.eval_size]
    model = mobilenet_v2(pretrained=True, num_classes=10)
    loss_fn = pe.losses.cross_entropy()

    stream = batches(images, labels, args.batch_size, seed=args.seed)
    first_x, first_y = next(stream)
    example = ((mnist_for_imagenet_model(first_x, args.size),), first_y)
    start = time.perf_counter()
    trainer = pe.Trainer(model, loss_fn, example, optimizer, scheme, options)
    print(f"compiled MobileNetV2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(trainer.trained)} trained tensors, scheme {trainer.scheme.name}) in "
          f"{time.perf_counter() - start:.1f} s; predicted step peak "
          f"{trainer.memory_plan().peak_bytes / 2 ** 20:.1f} MB above the weights")
    if args.show_program:
        print(trainer.program().graph)
    print(f"validation accuracy before: {_accuracy(model, val_x, val_y):.3f} ({len(val_y)} images)")

    step_times = []
    x, y = example[0][0], example[1]
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        loss = trainer.step(((x,), y))
        step_times.append(time.perf_counter() - t)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss:.4f}  step {step_times[-1] * 1000:7.1f} ms  "
                  f"peak RSS {_peak_rss_mb():7.1f} MB")
        try:
            bx, y = next(stream)
        except StopIteration:
            stream = batches(images, labels, args.batch_size, seed=args.seed + step)
            bx, y = next(stream)
        x = mnist_for_imagenet_model(bx, args.size)
    median = sorted(step_times)[len(step_times) // 2]
    print(f"median step {median * 1000:.1f} ms ({args.batch_size / median:.1f} images/s), "
          f"peak RSS {_peak_rss_mb():.1f} MB")
    print(f"validation accuracy after {args.steps} steps: {_accuracy(model, val_x, val_y):.3f}")
    if args.save:
        trainer.save(args.save)
        print(f"saved checkpoint to {args.save}")
    return 0


BENCH_MOVED = ("pockengine bench: the benchmark is not part of the installed package (it reads its configuration "
               "and writes its reports inside the repository); from a clone of the repository run `python -m bench "
               "[options]` at its root (`python -m bench --help`; docs/benchmarks/README.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pockengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune the real MobileNetV2 (ImageNet weights) on MNIST")
    t.add_argument("--steps", type=_at_least(1), default=100)
    t.add_argument("--batch-size", type=_at_least(1), default=8)
    t.add_argument("--size", type=_at_least(1), default=64, help="input resolution")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: with momentum 0.9")
    t.add_argument("--lr", type=_learning_rate, default=1e-4)
    t.add_argument("--scheme", default="full",
                   help="what to train: full, bias_only, head, last:K, or a scheme file (.yaml/.json)")
    t.add_argument("--seed", type=_at_least(0), default=0)
    t.add_argument("--threads", type=_at_least(0), default=0, help="torch threads (0: PyTorch's default)")
    t.add_argument("--eval-size", type=_at_least(1), default=512)
    t.add_argument("--log-every", type=_at_least(1), default=20)
    t.add_argument("--show-program", action="store_true", help="print the compiled training program")
    t.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="leave this compiler pass out (repeatable; see pockengine.pipeline.PASSES)")
    t.add_argument("--save", default="", help="write a checkpoint folder here at the end")
    t.set_defaults(run=train)
    from pockengine.search.cli import add_commands as add_search_commands
    add_search_commands(sub)  # analyze, search
    sub.add_parser("bench", help="moved: run `python -m bench` from a clone of the repository")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # whatever its options, the answer is where the benchmark went
        print(BENCH_MOVED, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except pe.PockEngineError as e:
        print(f"pockengine: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
