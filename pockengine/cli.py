"""Command line (`pockengine ...`, or `python -m pockengine ...`): `pockengine finetune` fine-tunes your model on
your data; `pockengine report RUN` redraws a run's plots; `pockengine train` fine-tunes the real MobileNetV2 on real
MNIST images with a compiled step. The benchmark suite is not part of the package: `python -m bench` from a clone of
the repository."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import pockengine as pe
from pockengine.arguments import integer, number
from pockengine.checkpoint import check_save_target
from pockengine.finetune import parse_scheme, peak_rss_bytes


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64]).argmax(-1) for i in range(0, len(x), 64)])
    model.train(was_training)
    return (pred == y).float().mean().item()


def train(args: argparse.Namespace) -> int:
    from pockengine.data import batches, load_mnist, mnist_for_imagenet_model
    from pockengine.models import mobilenet_v2

    # Everything the user wrote is checked before minutes go into loading and compiling.
    scheme = parse_scheme(args.scheme)
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
                  f"peak RSS {peak_rss_bytes() / 2 ** 20:7.1f} MB")
        try:
            bx, y = next(stream)
        except StopIteration:
            stream = batches(images, labels, args.batch_size, seed=args.seed + step)
            bx, y = next(stream)
        x = mnist_for_imagenet_model(bx, args.size)
    median = sorted(step_times)[len(step_times) // 2]
    print(f"median step {median * 1000:.1f} ms ({args.batch_size / median:.1f} images/s), "
          f"peak RSS {peak_rss_bytes() / 2 ** 20:.1f} MB")
    print(f"validation accuracy after {args.steps} steps: {_accuracy(model, val_x, val_y):.3f}")
    if args.save:
        trainer.save(args.save)
        print(f"saved checkpoint to {args.save}")
    return 0

FINETUNE_HELP = """Fine-tune a model on your data with compiled sparse training steps, in a run folder (--out) that
holds the checkpoint, the metrics log, the plots and the fine-tuned model.

examples:
  pockengine finetune --model mobilenet_v2 --data photos/ --scheme last:6 --steps 300 --out runs/photos
  pockengine finetune --model ./my-bert --data reviews.csv --scheme bias_only --epochs 2 --eval-every 50
  pockengine finetune --model smollm2 --data chats.jsonl --scheme last:4 --seq-len 96 --out runs/chat
  pockengine finetune --model mymodels:small_cnn --data digits/ --image-size 32
  pockengine finetune --config run.yaml --lr 3e-4       # the YAML's keys are the flags' names; flags override it
  pockengine finetune --out runs/photos --resume        # continue an interrupted run (the same result)

data (--data): an image folder with one sub-folder per class; a .csv or .jsonl with the columns text and label (a
class name or an integer index); a .jsonl of {"prompt": ..., "response": ...} or {"messages": [{"role": ...,
"content": ...}, ...]} (the model learns the last reply); or a built-in: mnist, rotten_tomatoes, chatterbot.
Images are resized to the model's input size and normalised with ImageNet's (or the folder's image processor's)
mean and std; texts are padded or truncated to --seq-len tokens. A bad file is refused naming the file and line."""


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    from pockengine.data.sources import BUILTIN_DATA
    from pockengine.models.loading import BUILTIN_MODELS

    f = sub.add_parser("finetune", help="fine-tune your model on your data (image folder, CSV/JSONL, chats)",
                       description=FINETUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None here: a flag that is not given leaves the YAML's value or the run's recorded one.
    f.add_argument("--config", metavar="RUN.yaml", help="a YAML file of settings, keyed like the flags (model, "
                   "data, steps, memory-budget or memory_budget, ...; paths relative to the current folder); flags on the command "
                   "line override it")
    f.add_argument("--model", help="a built-in (" + ", ".join(BUILTIN_MODELS) + "), a local Hugging Face folder with "
                   "config.json (the head, AutoModelFor..., follows from the data; a classifier gets a new head for "
                   "the data's classes unless its own id2label names them), or module:function returning a "
                   "torch.nn.Module for images")
    f.add_argument("--data", help="a built-in (" + ", ".join(BUILTIN_DATA) + "), an image folder with one "
                   "sub-folder per class, a .csv/.jsonl of text and label, or a .jsonl of prompt/response pairs or "
                   "chat messages")
    f.add_argument("--out", help="the run folder (new, or with --resume the run to continue); default "
                   "runs/MODEL-DATA")
    f.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last checkpoint (only --steps/--epochs, --eval-every, "
                   "--checkpoint-every and --threads may change)")
    f.add_argument("--scheme", help="what to train: full (default), bias_only, head, last:K (the last K layers), a "
                   "scheme file (.yaml/.json, docs/schemes.md), or auto (analysis and search under the budgets)")
    f.add_argument("--memory-budget", metavar="SIZE", help="most step memory (the compiler's planned peak above the "
                   "weights plus the optimizer state), e.g. 4MB or 512KB (powers of 1024); auto searches under it, "
                   "another scheme that needs more is refused")
    f.add_argument("--time-budget", metavar="MS", help="most milliseconds per step, e.g. 30 or 30ms; the summary "
                   "says when the median step was slower")
    f.add_argument("--quick", action="store_true", default=None, help="with --scheme auto: the analysis's quick "
                   "mode (fewer candidates and steps: minutes instead of an hour on MobileNetV2, noisier gains; "
                   "docs/search.md)")
    length = f.add_mutually_exclusive_group()
    length.add_argument("--steps", type=integer(1), help="training steps (default 100)")
    length.add_argument("--epochs", type=number(above=0), help="passes over the training split (may be fractional)")
    f.add_argument("--batch-size", type=integer(1), help="examples per step (default 8); the last, smaller batch "
                   "of each epoch is left out (one compiled shape)")
    f.add_argument("--lr", type=number(at_least=0), help="learning rate (default 1e-4)")
    f.add_argument("--optimizer", choices=["adamw", "sgd"], help="adamw (default) or sgd (momentum 0.9)")
    f.add_argument("--eval-every", type=integer(0), help="evaluate on the held-out split every N steps (default 0: "
                   "before and after training only)")
    f.add_argument("--checkpoint-every", type=integer(1), help="write the checkpoint every N steps (default 50; "
                   "also at the end and on Ctrl-C)")
    f.add_argument("--eval-fraction", type=number(at_least=0, below=1), help="share of the data held out for "
                   "validation, chosen by --seed (default 0.1): --eval-every, the analysis and the search read it")
    f.add_argument("--test-fraction", type=number(at_least=0, below=1), help="share of the data held out as a test "
                   "split (default 0: none), evaluated only before and after training, for the summary and "
                   "`pockengine report`; no choice reads it")
    f.add_argument("--test-data", help="a test set of its own instead of --test-fraction, read as --data is (a "
                   "built-in such as mnist-test, MNIST's 10,000 test images; a folder; a file)")
    f.add_argument("--text-column", help="the text column of a CSV/TSV (or field of a JSONL) text data set "
                   "(default: text)")
    f.add_argument("--label-column", help="its label column or field (default: label)")
    f.add_argument("--seq-len", type=integer(1), help="tokens per example (default: the longest example, at most "
                   "128); longer texts are truncated, said once")
    f.add_argument("--image-size", type=integer(1), help="image side in pixels (default: the model's; 64 for "
                   "mobilenet_v2; the images' own for module:function)")
    f.add_argument("--seed", type=integer(0), help="seeds the split, the batch order, new heads and dropout "
                   "(default 0)")
    f.add_argument("--max-examples", type=integer(2), help="use a seeded subset of this many examples")
    f.add_argument("--max-eval-examples", type=integer(1), help="evaluate on at most this many held-out examples")
    f.add_argument("--threads", type=integer(0), help="torch threads (0: PyTorch's default)")
    f.set_defaults(run=finetune_command)


def _settings(args: argparse.Namespace) -> dict:
    """The FinetuneConfig fields the command line (and YAML) set, budgets parsed."""
    from pockengine.finetune import FinetuneConfig, parse_milliseconds
    from pockengine.search import parse_memory

    names = {field.name for field in dataclasses.fields(FinetuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "memory_budget" in given:
        given["memory_budget"] = parse_memory(given["memory_budget"])
    if "time_budget" in given:
        given["time_budget"] = parse_milliseconds(given["time_budget"])
    return given


def finetune_command(args: argparse.Namespace) -> int:
    from pockengine.finetune import FinetuneConfig, finetune, resume_config

    given = _settings(args)
    if args.resume:
        if not args.out:
            raise pe.UserInputError("--resume needs --out, the run folder to continue")
        config = resume_config(args.out, given)
    else:
        missing = [flag for flag in ("model", "data") if flag not in given]
        if missing:
            raise pe.UserInputError(f"pockengine finetune needs {' and '.join('--' + m for m in missing)} (or "
                                    "--config with them); see pockengine finetune --help")
        given.setdefault("out", str(Path("runs") / f"{Path(given['model']).name.replace(':', '.')}-"
                                                   f"{Path(given['data']).stem}"))
        config = FinetuneConfig.from_dict(given)
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # The data's notes (images resized, texts truncated) read as one line each, not as a Python warning.
        if str(message).startswith("pockengine:"):
            print(message, file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            finetune(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        return 130
    return 0


def report_command(args: argparse.Namespace) -> int:
    from pockengine.finetune import SUMMARY_FILE, compare_summaries, draw_plots, format_summary

    summaries = {}
    for folder in args.folders:
        for path in draw_plots(folder):
            print(f"drew {path}")
        summary = Path(folder) / SUMMARY_FILE
        if summary.is_file():
            summaries[folder] = json.loads(summary.read_text())
            print(format_summary(summaries[folder]))
    if len(args.folders) > 1:
        unfinished = [f for f in args.folders if f not in summaries]
        if unfinished:
            raise pe.UserInputError(f"cannot compare: {', '.join(unfinished)} has no {SUMMARY_FILE} (the run has not "
                                    "finished; continue it with `pockengine finetune --out RUN --resume`)")
        print(compare_summaries(summaries))
    return 0


def _with_yaml_config(argv: list[str]) -> list[str]:
    """`finetune --config run.yaml ...`: the YAML's settings as flags, before the command line's (which win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    if argv[:1] != ["finetune"] or not known.config:
        return argv
    import yaml

    path = Path(known.config)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise pe.UserInputError(f"--config {path}: cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(values, dict):
        raise pe.UserInputError(f"--config {path}: a run file is a YAML mapping of settings (model: ..., data: ...)")
    flags = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if flag in ("--config", "--help"):
            raise pe.UserInputError(f"--config {path}: {key!r} cannot be set in a run file")
        if value is True:
            flags.append(flag)
        elif isinstance(value, str) and value.startswith("~"):  # a shell expands ~/photos on the command line
            flags += [flag, os.path.expanduser(value)]
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return [argv[0], *flags, *argv[1:]]


BENCH_MOVED = ("pockengine bench: the benchmark is not part of the installed package (it reads its configuration "
               "and writes its reports inside the repository); from a clone of the repository run `python -m bench "
               "[options]` at its root (`python -m bench --help`; docs/benchmarks/README.md)")


def export_command(args: argparse.Namespace) -> int:
    """The compiled step of a `pockengine finetune` run (at its last checkpoint) as an ONNX model, with
    `--batches K` of the run's next training batches beside it (`<out>.data.npz`) for the onnxruntime runner."""
    import numpy as np

    from pockengine.backend.onnx_export import batch_arrays
    from pockengine.finetune import CHECKPOINT_DIR, prepare, resume_config

    run_dir = Path(args.folder)
    if not (run_dir / CHECKPOINT_DIR).exists():
        raise pe.UserInputError(f"{run_dir} has no {CHECKPOINT_DIR}/: export a run of `pockengine finetune` (its "
                                "--out folder) once it has written a checkpoint")
    run = prepare(resume_config(run_dir, {}))
    model, task = run.loaded.model, run.task
    if args.eval_mode:
        model.eval()  # dropout off: an exported step cannot draw the trainer's random numbers
    trainer = pe.load(run_dir / CHECKPOINT_DIR, model, task.loss_fn, task.example_batch)
    out = trainer.export_onnx(args.out, gradients=args.gradients)
    print(f"wrote {out} and {out.with_name(out.stem + '.init.safetensors').name} (step {trainer.steps_done}, "
          f"scheme {trainer.scheme.name})")
    if args.batches:
        arrays = [batch_arrays(run.batches.at(trainer.steps_done + i)) for i in range(args.batches)]
        data = out.with_name(out.stem + ".data.npz")
        np.savez(data, **{k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]})
        print(f"wrote {data}: {args.batches} batches of the run's training data")
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="the compiled training step of a finetune run as an ONNX model (onnxruntime)",
                       description="Write the compiled, pruned training step of a `pockengine finetune` run, at its "
                       "last checkpoint, as one ONNX model; `python -m pockengine.runtime.onnx train` trains with it "
                       "on onnxruntime alone (docs/deploy.md).")
    e.add_argument("folder", metavar="RUN", help="the run folder (`pockengine finetune --out`)")
    e.add_argument("--format", choices=["onnx"], default="onnx")
    e.add_argument("--out", required=True, help="the .onnx file to write (its .init.safetensors goes beside it)")
    e.add_argument("--gradients", action="store_true", help="export the gradient program instead of the step")
    e.add_argument("--eval-mode", action="store_true",
                   help="put the model in eval mode first (dropout off; needed where the model has dropout)")
    e.add_argument("--batches", type=integer(0), default=0,
                   help="also write this many of the run's next training batches to <out>.data.npz")
    e.set_defaults(run=export_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pockengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune the real MobileNetV2 (ImageNet weights) on MNIST")
    t.add_argument("--steps", type=integer(1), default=100)
    t.add_argument("--batch-size", type=integer(1), default=8)
    t.add_argument("--size", type=integer(1), default=64, help="input resolution")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: with momentum 0.9")
    t.add_argument("--lr", type=number(at_least=0), default=1e-4)
    t.add_argument("--scheme", default="full",
                   help="what to train: full, bias_only, head, last:K, or a scheme file (.yaml/.json)")
    t.add_argument("--seed", type=integer(0), default=0)
    t.add_argument("--threads", type=integer(0), default=0, help="torch threads (0: PyTorch's default)")
    t.add_argument("--eval-size", type=integer(1), default=512)
    t.add_argument("--log-every", type=integer(1), default=20)
    t.add_argument("--show-program", action="store_true", help="print the compiled training program")
    t.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="leave this compiler pass out (repeatable; see pockengine.pipeline.PASSES)")
    t.add_argument("--save", default="", help="write a checkpoint folder here at the end")
    t.set_defaults(run=train)
    _finetune_parser(sub)
    _export_parser(sub)
    r = sub.add_parser("report", help="redraw fine-tuning runs' plots (loss, held-out metric), print their summaries, "
                       "and compare several side by side",
                       description="Redraw RUN/plots/loss.png and metric.png from RUN/metrics.jsonl, and print the "
                       "run's summary; given several runs, also a table comparing them (each divided by the first).")
    r.add_argument("folders", nargs="+", metavar="RUN", help="run folders of `pockengine finetune` (their --out)")
    r.set_defaults(run=report_command)
    from pockengine.search.cli import add_commands as add_search_commands
    add_search_commands(sub)  # analyze, search
    sub.add_parser("bench", help="moved: run `python -m bench` from a clone of the repository")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # whatever its options, the answer is where the benchmark went
        print(BENCH_MOVED, file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(_with_yaml_config(argv))
        return args.run(args)
    except pe.PockEngineError as e:
        print(f"pockengine: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
