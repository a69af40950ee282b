"""`pockengine bench`: step time, throughput, peak training memory, set-up time and FLOPs of pockengine against
PyTorch eager, torch.compile, ONNX Runtime on-device training and PEFT LoRA, on real models and data.

Configuration: bench/workloads.yaml, bench/schemes.yaml; ONNX Runtime's environment: bench/setup_ort.sh.
Results: docs/benchmarks/ (results.json, README.md, bench.png). Modules: workloads (models, data, schemes),
systems (one class per system), worker (one process per system and scheme), memory, runner, report, cli.
"""
