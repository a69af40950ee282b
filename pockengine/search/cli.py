"""`pockengine analyze` and `pockengine search` (docs/search.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pockengine.arguments import integer, number
from pockengine.errors import UserInputError
from pockengine.search.analysis import analyze
from pockengine.search.report import SearchReport
from pockengine.search.search import mb, parse_memory, search
from pockengine.search.task import Task
from pockengine.storage import cache_dir


def task_from_args(args: argparse.Namespace) -> Task:
    """The Task that --model and --data name, loaded as `pockengine finetune` loads them."""
    from pockengine.finetune import FinetuneConfig, prepare

    return prepare(FinetuneConfig(model=args.model, data=args.data, out=args.out, batch_size=args.batch_size,
                                  image_size=args.size, max_eval_examples=args.eval_size, seed=args.seed,
                                  max_examples=args.max_examples)).task


def _rates(text: str) -> tuple[float, ...]:
    rates = tuple(number(above=0)(r) for r in text.split(",") if r.strip())
    if not rates:
        raise argparse.ArgumentTypeError("write one or more rates separated by commas, e.g. 1e-3,1e-2")
    return rates


def _memory(text: str) -> int:
    try:
        return parse_memory(text)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v2", help="as pockengine finetune's --model: a built-in "
                   "(mobilenet_v2, minilm, smollm2), a Hugging Face folder or module:function")
    p.add_argument("--data", default="mnist", help="as pockengine finetune's --data: a built-in (mnist, "
                   "rotten_tomatoes, chatterbot), an image folder, a CSV/JSONL file")
    p.add_argument("--size", type=integer(1), default=None, help="image side of image models (default: the "
                   "model's; 64 for mobilenet_v2)")
    p.add_argument("--max-examples", type=integer(1), default=None, help="a seeded subset of the data")
    p.add_argument("--batch-size", type=integer(1), default=8)
    p.add_argument("--eval-size", type=integer(1), default=512, help="held-out examples for the metric")
    p.add_argument("--cache", default="", help="analysis cache folder (default: the pockengine cache's analysis/)")
    p.add_argument("--quick", action="store_true",
                   help="fewer candidates (k at powers of two, the last 20 weights, ratios 1/4 and 1), fewer steps "
                        "(40) and two learning rates: minutes instead of an hour on MobileNetV2, noisier gains")
    p.add_argument("--steps", type=integer(1), default=None, help="steps per candidate (default 100, quick 40)")
    p.add_argument("--warmup-steps", type=integer(0), default=None,
                   help="steps of the classifier alone before the candidates, which start from it (default 200, "
                        "quick 100; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-grid", type=_rates, default=None,
                   help="learning rates tried for the biases of every block and for each weight candidate, "
                        "comma-separated (default 1e-4,1e-3,1e-2; quick 1e-4,1e-3)")
    p.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace) -> tuple[Task, Path]:
    if args.threads:
        torch.set_num_threads(args.threads)
    return task_from_args(args), Path(args.cache) if args.cache else cache_dir() / "analysis"


def run_analyze(args: argparse.Namespace) -> int:
    task, cache = _setup(args)
    a = analyze(task, cache, quick=args.quick, steps=args.steps, seed=args.seed, lr_grid=args.lr_grid,
                warmup_steps=args.warmup_steps, progress=not args.no_progress)
    print(f"{'candidate':40s} {'lr':>7s} {a.metric:>9s} {'gain':>8s} {'memory':>10s} {'ms/step':>8s} {'MFLOP':>8s}")
    for row in a.rows():
        print(f"{row['candidate']:40s} {row['lr']:7.0e} {row['metric']:9.4f} {row['gain']:+8.4f} "
              f"{mb(row['memory']):>10s} {row['step_ms']:8.1f} {row['flops'] / 1e6:8.1f}")
    print(f"weight rows: cost over the weight baseline (biases of every block), each at its best rate of the grid. "
          f"{a.trained} runs trained, the rest read from {cache}; {a.seconds:.0f} s ({a.cpu_seconds:.0f} s CPU)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.memory_budget is None and args.time_budget is None:
        raise UserInputError("pockengine search needs --memory-budget (such as 4MB), --time-budget (ms per step), "
                             "or both")
    task, cache = _setup(args)
    start = time.perf_counter()
    a = analyze(task, cache, quick=args.quick, steps=args.steps, seed=args.seed, lr_grid=args.lr_grid,
                warmup_steps=args.warmup_steps, progress=not args.no_progress)
    result = search(task, a, memory_budget=args.memory_budget, time_budget_ms=args.time_budget)
    report = SearchReport(a, result)
    files = report.write(args.out)
    print(report.summary())
    print(f"scheme: {files['scheme']} (pockengine train --scheme {files['scheme']}); report: {files['report']}; "
          f"{time.perf_counter() - start:.0f} s in all")
    return 0


def _resumable(command):
    """Ctrl-C ends the command with a line, not a traceback: every finished candidate is in the cache already."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt:
            print("\npockengine: interrupted; the candidates analysed so far are cached, and the same command "
                  "resumes after them", file=sys.stderr)
            return 130

    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="fine-tune each candidate alone and measure its gain and cost (cached)")
    _common(p)
    p.set_defaults(out="")
    p.set_defaults(run=_resumable(run_analyze))
    p = sub.add_parser("search", help="the scheme with the largest gain under a memory and/or time budget")
    _common(p)
    p.add_argument("--memory-budget", type=_memory, default=None,
                   help="step memory (planned peak + optimizer state): 4MB, 512KB (powers of 1024)")
    p.add_argument("--time-budget", type=number(above=0), default=None, help="milliseconds per step")
    p.add_argument("--out", default="search-out", help="folder for scheme.yaml, report.md and the plots")
    p.set_defaults(run=_resumable(run_search))
