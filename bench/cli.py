"""`python -m bench`: the benchmark suite (pockengine and its ONNX runner vs PyTorch eager, torch.compile, ONNX
Runtime training, ExecuTorch training and PEFT LoRA) on the real workloads of bench/workloads.yaml with the schemes of bench/schemes.yaml, on the CPU or, with
`--device cuda`, on a GPU (results in docs/benchmarks/cuda). Run it from the repository root."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench.variants import SYSTEMS

PROG = "python -m bench"
WORKLOADS = ["mobilenetv2", "minilm", "smollm2", "smollm2_long"]
DEVICES = ["cpu", "cuda"]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _systems(value: str) -> list[str]:
    """Comma-separated systems; the commas inside a variant's brackets separate its options."""
    return [v.strip() for v in re.split(r",(?![^\[]*\])", value) if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--workload", default="all", help=f"comma-separated, of {WORKLOADS} (default: all)")
    p.add_argument("--scheme", default=None, help="comma-separated scheme names (default: the workload's list)")
    p.add_argument("--systems", default="all",
                   help=f"comma-separated, of {SYSTEMS} or variants such as 'eager[attn=eager]' and "
                        "'pockengine[attention=math]' (default: all, with the workload's variants)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes for CI (results under .cache/bench/quick)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per system (default: bench/workloads.yaml)")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where every system trains (cuda: pockengine, eager and torch.compile on the GPU)")
    p.add_argument("--out", default=None, help="output folder (default: docs/benchmarks, or .cache/bench/quick; "
                                               "with --device cuda docs/benchmarks/cuda, or .cache/bench/quick-cuda)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m bench [options]`; returns the exit code (2: bad options, or no GPU for --device cuda)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    workloads = WORKLOADS if args.workload == "all" else _list(args.workload)
    systems = SYSTEMS if args.systems == "all" else _systems(args.systems)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"unknown workload {unknown}; workloads {WORKLOADS}", file=sys.stderr)
        return 2
    from bench.systems import make_system

    for spec in systems:
        try:
            make_system(spec)  # a known system, and options it offers
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    if args.steps is not None and args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda":
        from bench.gpu import unavailable_message

        problem = unavailable_message()
        if problem:
            print(problem, file=sys.stderr)
            return 2
    from bench import runner

    results = runner.run(workloads, quick=args.quick, schemes=_list(args.scheme) if args.scheme else None,
                         systems=systems, steps=args.steps, out=Path(args.out) if args.out else None,
                         command=" ".join([PROG, *argv]), device=args.device)
    failed = [(name, key, r.get("error")) for name, w in results["workloads"].items() if name in workloads
              for key, r in w["runs"].items() if r.get("error")]
    for name, key, error in failed:
        print(f"FAILED {name} {key}: {error[:300]}", file=sys.stderr)
    print(f"wrote {Path(args.out) if args.out else 'the report'}: results.json, README.md, bench.png")
    return 0
