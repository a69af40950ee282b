"""`pockengine bench`: the benchmark suite (pockengine vs PyTorch eager, torch.compile, ONNX Runtime training and
PEFT LoRA) on the real workloads of bench/workloads.yaml with the schemes of bench/schemes.yaml, on the CPU or, with
`--device cuda`, on a GPU (results in docs/benchmarks/cuda)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WORKLOADS = ["mobilenetv2", "minilm", "smollm2"]
DEVICES = ["cpu", "cuda"]
SYSTEMS = ["pockengine", "eager", "torch.compile", "ort", "peft-lora"]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def bench(args: argparse.Namespace) -> int:
    from pockengine.bench import runner

    workloads = WORKLOADS if args.workload in (None, "all") else _list(args.workload)
    systems = SYSTEMS if args.systems in (None, "all") else _list(args.systems)
    unknown = [w for w in workloads if w not in WORKLOADS] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown workload or system {unknown}; workloads {WORKLOADS}, systems {SYSTEMS}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda":
        from pockengine.bench.gpu import unavailable_message

        problem = unavailable_message()
        if problem:
            print(problem, file=sys.stderr)
            return 2
    argv = args.argv if args.argv is not None else sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    command = " ".join(["pockengine", "bench"] + list(argv))
    results = runner.run(workloads, quick=args.quick, schemes=_list(args.scheme) if args.scheme else None,
                         systems=systems, steps=args.steps, out=Path(args.out) if args.out else None,
                         command=command, device=args.device)
    failed = [(name, key, r.get("error")) for name, w in results["workloads"].items() if name in workloads
              for key, r in w["runs"].items() if r.get("error")]
    for name, key, error in failed:
        print(f"FAILED {name} {key}: {error[:300]}", file=sys.stderr)
    print(f"wrote {Path(args.out) if args.out else 'the report'}: results.json, README.md, bench.png")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on a `pockengine` argparse subparsers object."""
    b = subparsers.add_parser("bench", help="benchmark pockengine against PyTorch eager, torch.compile, ONNX Runtime "
                                            "training and PEFT LoRA", description=__doc__)
    b.add_argument("--workload", default="all", help=f"comma-separated, of {WORKLOADS} (default: all)")
    b.add_argument("--scheme", default=None, help="comma-separated scheme names (default: the workload's list)")
    b.add_argument("--systems", default="all", help=f"comma-separated, of {SYSTEMS} (default: all)")
    b.add_argument("--quick", action="store_true", help="smoke-test sizes for CI (results under .cache/bench/quick)")
    b.add_argument("--steps", type=int, default=None, help="measured steps per system (default: bench/workloads.yaml)")
    b.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where every system trains (cuda: pockengine, eager and torch.compile on the GPU)")
    b.add_argument("--out", default=None, help="output folder (default: docs/benchmarks, or .cache/bench/quick; "
                                               "with --device cuda docs/benchmarks/cuda, or .cache/bench/quick-cuda)")
    b.set_defaults(run=bench, argv=None)
    return b


def main(argv: list[str] | None = None) -> int:
    """`python -m pockengine.bench.cli [options]`, the same as `pockengine bench [options]`."""
    parser = argparse.ArgumentParser(prog="pockengine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["bench"] + argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
