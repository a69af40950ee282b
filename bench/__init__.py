"""The benchmark: step time, throughput, peak training memory, set-up time and FLOPs of pockengine (and its ONNX
runner) against PyTorch eager, torch.compile, ONNX Runtime on-device training, ExecuTorch training and PEFT LoRA, on
real models and data.

Run from the repository root: `python -m bench [options]` (`python -m bench --help`). It is not part of the
installed pockengine package: it reads its configuration from this folder (workloads.yaml, schemes.yaml), ONNX
Runtime's environment from the repository's .venv-ort (setup_ort.sh) and writes docs/benchmarks/.

Modules: cli (the command line), workloads (models, data, schemes), systems (one class per system; ort_worker,
onnx_worker and executorch_worker are the child processes of the systems that train outside the worker, child their
protocol), worker (one process per system and scheme), runner (the timing and memory passes), memory (resident memory of a process),
gpu (the CUDA benchmark's fences and allocator figures); the report: figures (numbers and tables), plot, text
(introduction, notes, method) and report (writes README.md and bench.png). Tests: bench/tests/.
"""
