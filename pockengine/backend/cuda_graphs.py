"""CUDA graphs for the Inductor backend on a GPU: each region of the program captured once, replayed every step.

Why: on a GPU a step is launch-bound. MobileNetV2's is about 1,300 kernels, each issued by a Python call, and takes
longer than eager PyTorch's for a few GFLOPs of work (docs/benchmarks/cuda). Inductor fuses them into fewer
kernels; a CUDA graph then launches all of a region's kernels with one call.

What a graph needs, and how it gets it:

- Fixed addresses. The trainer binds the same parameter, buffer, optimizer-state and constant tensors to every call,
  so the graph reads and writes them where they are. The batch and the run-time scalars (learning rate, bias
  corrections) change every step: they are copied into buffers the graph reads (`copy_`, `fill_`, queued before
  the replay). An input bound to another tensor than the captured one (a parameter replaced rather than written in
  place) is seen at the next call and the regions are captured again.
- No host synchronization inside. The loss check between the two regions reads the loss after the first graph's
  replay and before the second (the updates) is launched, as without graphs: a non-finite loss changes nothing.
- Its own memory. A capture's intermediates live in a private pool of the caching allocator, reserved as long as
  the program lives; both regions share one pool (replayed in the order captured). `graph_pool_bytes` is what the
  pool reserved.
- A warm-up before capture (Triton's autotuning, cuBLAS's workspace, lazy initialization run only outside a
  capture): the regions run twice on a side stream on copies of the inputs they write, so compiling trains nothing.
- Outputs. A graph's output tensors are overwritten by its next replay: the program returns copies.

Programs that draw random numbers never get here: Inductor refuses them (`inductor_refusal`).
"""

from __future__ import annotations

from typing import Any

import torch

from pockengine.backend.inductor import InductorProgram
from pockengine.backend.torch_codegen import _check_finite
from pockengine.ir.graph import BATCH, SCALAR, Node


class CudaGraphProgram:
    """`program`'s regions as CUDA graphs, called like it: one value per input node (in `inputs` order).
    `examples` are the values to capture with (the trainer's bound tensors, whose addresses the graphs keep, and
    an example batch); `written` are the inputs the program writes in place (copied for the warm-up)."""

    def __init__(self, program: InductorProgram, examples: list[Any], written: set[Node]):
        self.program = program
        self.graph, self.inputs, self.output_names = program.graph, program.inputs, program.output_names
        self.regions = program.regions
        values = program._with_scalar_tensors(list(examples))
        # Inputs that change every step: the batch and the run-time scalars. A batch leaf that is not a tensor is a
        # constant of the program (another value compiles another program) and is passed as it is.
        self._per_step = [i for i, (n, v) in enumerate(zip(self.inputs, values))
                          if n.role in (BATCH, SCALAR) and isinstance(v, torch.Tensor)]
        self._buffers = {i: values[i].clone() for i in self._per_step}
        self._warm_up([v.clone() if n in written else v for n, v in zip(self.inputs, values)])
        self._capture(values)

    def _warm_up(self, values: list[Any]) -> None:
        stream = torch.cuda.Stream(self.program.device)
        stream.wait_stream(torch.cuda.current_stream(self.program.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.program.run_regions(values, check=False)
        torch.cuda.current_stream(self.program.device).wait_stream(stream)

    def _capture(self, values: list[Any]) -> None:
        args = [self._buffers.get(i, v) for i, v in enumerate(values)]
        self._addresses = [(i, v.data_ptr()) for i, v in enumerate(args)
                           if i not in self._buffers and isinstance(v, torch.Tensor)]
        env: dict[Node, Any] = dict(zip(self.inputs, args))
        self.graphs: list[torch.cuda.CUDAGraph] = []
        pool = None
        torch.cuda.synchronize(self.program.device)
        # A capture begins by releasing the allocator's cached blocks: released first, they cannot make the pool's
        # reservation look smaller than it is.
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.program.device)
        with torch.no_grad():
            for region in self.regions:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    env.update(zip(region.outputs, region.fn(*[env[n] for n in region.inputs])))
                pool = graph.pool()
                self.graphs.append(graph)
        self.graph_pool_bytes = torch.cuda.memory_reserved(self.program.device) - reserved
        check = self.program.check_finite
        self._loss = env[check] if check is not None else None
        self._outputs = [env[n] for n in self.graph.outputs.values()]

    def __call__(self, *values: Any) -> tuple:
        if any(values[i].data_ptr() != address for i, address in self._addresses):
            self._capture(self.program._with_scalar_tensors(list(values)))
        for i in self._per_step:
            value = values[i]
            if isinstance(value, torch.Tensor):
                self._buffers[i].copy_(value)
            else:
                self._buffers[i].fill_(value)
        self.graphs[0].replay()
        if self._loss is not None:
            _check_finite(self._loss)
        for graph in self.graphs[1:]:
            graph.replay()
        return tuple(o.clone() for o in self._outputs)
