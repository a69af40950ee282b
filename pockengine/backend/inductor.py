"""The Inductor backend: pockengine's finished program (pruned forward, sparse backward, in-place optimizer updates,
after every pass) compiled by Inductor, PyTorch's code generator of fused kernels, instead of run op by op.

The program becomes a torch.fx graph of the same ATen calls, one node per op, and goes to `compile_fx` (AOTAutograd
functionalizes it, in inference mode under `torch.no_grad()`, so nothing is differentiated again; the in-place
updates of parameters and optimizer state become writes into those inputs). It is not `torch.compile` of the
model: the graph is the pruned one pockengine built, which torch.compile's own autograd would not produce.

What changes on the way:

- Run-time scalars (learning rate, bias corrections) enter as 0-d float64 tensors: Inductor bakes a Python float
  argument into its code, so a schedule would silently keep the first step's rate. Where the program passes one as
  a `Scalar` argument (`add_(p, g, alpha=neg_lr)`, `addcdiv_(..., value=...)`), the call is spelt with a tensor
  product instead (`add_(p, mul(g, neg_lr))`); any other such use keeps the program on the ATen backend.
- The step program is two regions: up to the loss, then the rest; the loss is checked for NaN/inf between them,
  so a non-finite loss still stops the step before any update.
- pockengine's own ops (`pockengine/kernels/`) are traced as their ATen compositions: the activation bit masks,
  which Inductor fuses with the ops around them, instead of calling the C kernels; the flash attention that drops
  its mask at run time when the batch has no padding, as its masked form (the same result: a traced graph cannot
  branch on a value).
- Programs that draw random numbers stay on the ATen backend (`inductor_refusal`): Inductor's random ops draw from
  its own seeds, not from the trainer's generator, so the seed and the checkpoints could not reproduce the draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import operator
import platform
from typing import Any, Callable, ContextManager

import torch
import torch.fx as fx

from pockengine.backend.torch_codegen import _check_finite, seeded_target
from pockengine.ir.graph import SCALAR, Graph, Node
from pockengine.ir.ops import draws_random, is_mutating
from pockengine.kernels import ATEN_COMPOSITIONS
from pockengine.storage import cache_dir, cached_file

aten = torch.ops.aten

# A run-time scalar passed as one of these `Scalar` arguments is rewritten as a product of tensors:
# op(self, x, alpha=s) -> op(self, x * s); addc{mul,div}(self, a, b, value=s) -> self + (a {*,/} b) * s.
_SCALE_ARGUMENT = {"alpha": frozenset({"add", "add_", "sub", "sub_"}),
                   "value": frozenset({"addcmul", "addcmul_", "addcdiv", "addcdiv_"})}


def _scalar_use(n: Node) -> str | None:
    """How `n` passes a run-time scalar: None (it does not), "tensor" (as a Tensor argument: the 0-d tensor goes
    as it is), the name of a `Scalar` argument `_SCALE_ARGUMENT` rewrites, or "other"."""
    schema = n.target._schema
    values = dict(zip((a.name for a in schema.arguments), n.args)) | n.kwargs
    kinds = {a.name: a.type for a in schema.arguments}
    uses = [name for name, v in values.items() if isinstance(v, Node) and v.role == SCALAR]
    if not uses:
        return None
    if all(isinstance(kinds[name], torch.TensorType) for name in uses):
        return "tensor"
    if len(uses) == 1 and n.target.overloadpacket.__name__ in _SCALE_ARGUMENT.get(uses[0], ()):
        return uses[0]
    return "other"


def inductor_refusal(graph: Graph) -> str | None:
    """Why `graph` must run on the ATen backend, or None when Inductor can compile it."""
    for n in graph.nodes:
        if n.is_input or n.target is operator.getitem:
            continue
        if draws_random(n.target) and seeded_target(n.target, n.args, n.kwargs, n.name) is not None:
            return (f"%{n.name} ({n.op_name}) draws random numbers from the trainer's generator; Inductor's random "
                    "ops draw from their own seeds, which the trainer's seed and checkpoints could not reproduce")
        if _scalar_use(n) == "other":
            return (f"%{n.name} ({n.op_name}) takes a run-time scalar as an argument Inductor would bake into its "
                    "code as a constant (a learning-rate schedule would be ignored)")
    return None


class _Builder:
    """One region of the program as a torch.fx graph of its ATen calls."""

    def __init__(self, inputs: list[Node]) -> None:
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[Node, fx.Node] = {n: self.graph.placeholder(n.name) for n in inputs}

    def value(self, a: Any) -> Any:
        if isinstance(a, Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        if isinstance(a, torch.Tensor):  # a constant tensor argument becomes an attribute of the module
            name = f"_constant{len(self.root._buffers)}"
            self.root.register_buffer(name, a)
            return self.graph.get_attr(name)
        return a

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def add(self, n: Node) -> None:
        use = _scalar_use(n) if n.target is not operator.getitem else None
        if use in _SCALE_ARGUMENT:
            self.env[n] = self._scaled(n, use)
        elif n.target in ATEN_COMPOSITIONS:
            self.env[n] = self._composition(n)
        else:
            self.env[n] = self.call(n.target, *self.value(n.args), **self.value(n.kwargs))

    def _composition(self, n: Node) -> fx.Node:
        """pockengine's own op `n` as the ATen ops of its composition, traced on meta tensors of its inputs' shapes
        and inlined (ATen ops only: a Python function in the graph would keep AOTAutograd from caching it)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        tensors = [a for a in n.args if isinstance(a, Node)]

        def composition(*values: torch.Tensor) -> torch.Tensor:
            given = iter(values)
            return ATEN_COMPOSITIONS[n.target](*[next(given) if isinstance(a, Node) else a for a in n.args])

        traced = make_fx(composition)(*[torch.empty(a.meta.shape, dtype=a.meta.dtype, device="meta")
                                        for a in tensors])
        placeholders = [p for p in traced.graph.nodes if p.op == "placeholder"]
        return self.graph.graph_copy(traced.graph, {p: self.env[a] for p, a in zip(placeholders, tensors)})

    def _scaled(self, n: Node, argument: str) -> fx.Node:
        """`n` with its run-time scalar `Scalar` argument turned into a product with the 0-d tensor."""
        names = [a.name for a in n.target._schema.arguments]
        values = self.value(dict(zip(names, n.args)) | n.kwargs)
        scale = values.pop(argument)
        packet = n.target.overloadpacket.__name__
        if argument == "alpha":
            term = self.call(aten.mul.Tensor, values["other"], scale)
            return self.call(n.target, values["self"], term)
        combine = aten.mul.Tensor if packet.startswith("addcmul") else aten.div.Tensor
        term = self.call(aten.mul.Tensor, self.call(combine, values["tensor1"], values["tensor2"]), scale)
        return self.call(aten.add_.Tensor if is_mutating(n.target) else aten.add.Tensor, values["self"], term)

    def module(self, outputs: list[Node]) -> fx.GraphModule:
        self.graph.output(tuple(self.env[o] for o in outputs))
        return fx.GraphModule(self.root, self.graph)


class _Region:
    """Consecutive ops of the program compiled by Inductor: reads `inputs`, returns `outputs`."""

    def __init__(self, ops: list[Node], inputs: list[Node], outputs: list[Node], examples: dict[Node, Any]):
        from torch._inductor import standalone_compile  # imported on first use: Inductor is slow to import

        self.inputs, self.outputs = inputs, outputs
        builder = _Builder(inputs)
        for n in ops:
            builder.add(n)
        self.module = builder.module(outputs)
        # An inference graph (AOTAutograd derives no backward), specialized to the examples' shapes and strides;
        # standalone_compile gives Inductor the shape environment its FX graph cache and AOTAutograd's need. The
        # module is built for this compile only: Inductor may change it in place where torch lets it (2.12 and later)
        # instead of copying it first.
        donate = ({"donate_graph_module": True}
                  if "donate_graph_module" in inspect.signature(standalone_compile).parameters else {})
        with torch.no_grad():
            self.fn: Callable[..., list] = standalone_compile(self.module, [examples[n] for n in inputs],
                                                              dynamic_shapes="from_example_inputs", **donate)


def scalar_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A run-time scalar as the Inductor program takes it: on the program's device, where a CUDA graph can read a
    new value from it at every replay (from host memory Inductor would pass the value into its kernels' launch
    arguments, fixed at capture)."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def known_vector_isa() -> ContextManager:
    """Inductor's C++ code generation first checks, once per process, that the compiler builds and the process
    loads code for each vector instruction set the CPU reports (AVX2, AVX-512), compiling and loading a test library
    in a child process per set: about a second each on a loaded machine, most of a warm compile. The answer depends
    on the CPU, the compiler and torch only, so it is cached on disk; when every set passed, the compile runs with
    Inductor told so (`cpp.vec_isa_ok`), which picks the same set the check would. Elsewhere (other architectures,
    the option set by the user, a set that failed) Inductor checks as usual."""
    from torch._inductor import config, cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64") or config.cpp.vec_isa_ok is not None:
        return contextlib.nullcontext()
    flags = cpu_vec_isa.x86_isa_checker()
    reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    key = hashlib.sha256(json.dumps([torch.__version__, flags, str(config.cpp.cxx)]).encode()).hexdigest()

    def probe(tmp: Any) -> None:
        with open(tmp, "w") as f:
            json.dump({"reported": [str(i) for i in reported],
                       "loadable": [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]}, f)

    try:
        entry = json.loads(cached_file(cache_dir() / "inductor" / f"vec-isa-{key}.json", probe,
                                       "Inductor vector ISA check").read_text())
        all_pass = entry["loadable"] == entry["reported"] == [str(i) for i in reported]
    except (ValueError, KeyError, TypeError):  # not an entry of this format: Inductor checks as usual
        all_pass = False
    return config.patch({"cpp.vec_isa_ok": True}) if all_pass else contextlib.nullcontext()


class InductorProgram:
    """An executable program compiled by Inductor, called like `CompiledProgram`: one value per input node (in
    `inputs` order). `examples` are values of the inputs (the trainer's bound tensors and the example batch) that
    Inductor specializes the code to (shapes, strides, dtypes); run-time scalars may be floats. `device`: where the
    program runs (its run-time scalars are put there)."""

    def __init__(self, graph: Graph, inputs: list[Node], check_finite: Node | None, examples: list[Any],
                 device: torch.device = torch.device("cpu")):
        if (reason := inductor_refusal(graph)) is not None:
            raise ValueError(f"the program cannot run on Inductor: {reason}")
        self.graph = graph
        self.inputs = inputs
        self.output_names = list(graph.outputs)
        self.device = device
        self._scalars = [i for i, n in enumerate(inputs) if n.role == SCALAR]
        values = dict(zip(inputs, self._with_scalar_tensors(list(examples))))
        ops = [n for n in graph.nodes if not n.is_input]
        split = ops.index(check_finite) + 1 if check_finite is not None else len(ops)
        first = set(ops[:split])
        # A region returns tensors, not tuples: the results of an op of several outputs in the first region
        # (the fused head and loss: the loss and its gradients) are taken there, however late the program reads them.
        head = ops[:split] + [n for n in ops[split:] if n.target is operator.getitem and n.args[0] in first]
        tail = [n for n in ops[split:] if n not in set(head)]
        self.check_finite = check_finite
        self.regions: list[_Region] = []
        wanted = list(dict.fromkeys(graph.outputs.values()))
        for part, later in ((head, tail), (tail, [])):
            if part:
                self._compile_region(part, later, inputs, values, wanted, check_finite)

    def _compile_region(self, ops: list[Node], later: list[Node], inputs: list[Node], values: dict[Node, Any],
                        wanted: list[Node], check_finite: Node | None) -> None:
        """Compile `ops` as one region: it reads program inputs and earlier regions' results (from `values`) and
        returns what `later` ops, the program's outputs (`wanted`) and the loss check read."""
        needed = {i for n in ops for i in n.inputs}
        region_inputs = [n for n in values if n in needed]
        later_reads = {i for n in later for i in n.inputs} | set(wanted) | ({check_finite} - {None})
        region_outputs = [n for n in ops if n in later_reads]
        with known_vector_isa():
            region = _Region(ops, region_inputs, region_outputs, values)
        self.regions.append(region)
        if later:  # the next region is specialized to these values' strides: run this one (it writes no input)
            with torch.no_grad():
                values.update(zip(region_outputs, region.fn(*[values[n] for n in region_inputs])))

    def _with_scalar_tensors(self, values: list[Any]) -> list[Any]:
        for i in self._scalars:
            if not isinstance(values[i], torch.Tensor):
                values[i] = scalar_tensor(values[i], self.device)
        return values

    def run_regions(self, values: list[Any], check: bool = True) -> dict[Node, Any]:
        """Every region in order on `values` (one per input; run-time scalars as tensors), with the loss check
        between the first and the second unless `check` is False; returns every value the regions returned."""
        env: dict[Node, Any] = dict(zip(self.inputs, values))
        for region in self.regions:
            env.update(zip(region.outputs, region.fn(*[env[n] for n in region.inputs])))
            if check and region is self.regions[0] and self.check_finite is not None:
                _check_finite(env[self.check_finite])
        return env

    def __call__(self, *values: Any) -> tuple:
        env = self.run_regions(self._with_scalar_tensors(list(values)))
        return tuple(env[n] for n in self.graph.outputs.values())

