"""The compiler's pipeline: one ordered list of named passes, each `run(graph, ctx)`, from the captured program to
the finished one.

`PASSES` is the only place the order is written. Each entry says when it applies (`enabled(ctx)`: the layout
pass only for channels-last programs...) and whether it can be switched off: every graph optimization can, by name
(`compile(..., disable={"matmul"})`); autodiff and the output stage cannot, the program would not train. After
every pass the pipeline removes dead code (a pass may leave replaced nodes behind) and, with `check` on
(`compile(..., check=True)` or POCKENGINE_CHECK=1, as the tests run), checks the graph's invariants
(`Graph.lint`). A pass that fails is named in the error, with the passes that ran before it; `run(..., until=name)`
stops after a pass, for looking at the program there (`Trainer.program(after=name)`).

A pass reads what it needs from `Context` (the capture, the trained parameters and their channel slices, the
frozen values, the options, the device) and changes the graph in place; the stages that create program inputs
(the optimizer state) record the tensors bound to them in `ctx.static`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from pockengine.autodiff import ChannelSlice, differentiate
from pockengine.autodiff.rules.attention import attention_setting, lower_attention
from pockengine.capture import Captured
from pockengine.capture.stop_gradient import drop_stop_gradients
from pockengine.errors import CompilerError, PockEngineError, UserInputError
from pockengine.ir.graph import Graph, Node, eliminate_dead_code
from pockengine.optim.base import Optimizer
from pockengine.optim.update import BUFFER_OUTPUT, GRADIENT_OUTPUT, emit_gradient_outputs, emit_updates
from pockengine.passes import (chunk_for_memory, compact_activation_masks, drop_redundant_clones, fold_constants,
                               fold_frozen_batchnorm, fuse_linear_cross_entropy, pointwise_convolutions_as_matmul,
                               rematerialize, run_in_place, simplify_attention_masks, to_channels_last, update_early)
from pockengine.passes.activation_masks import MASK_ACTIVATION_OPS
from pockengine.scheme import Selection

if TYPE_CHECKING:
    from pockengine.options import Options


@dataclass
class Context:
    """What the passes may read (and the stages that create inputs, record)."""

    captured: Captured
    trained: dict[str, Node]  # trained parameter name -> its input node, in the scheme's order
    slices: dict[Node, ChannelSlice]  # partially trained parameters: their channels
    frozen: dict[Node, torch.Tensor]  # inputs no step changes (frozen parameters, buffers), with their values
    static: dict[Node, torch.Tensor]  # inputs bound to the same tensor at every step (weights, state, constants)
    options: Options
    device: torch.device
    channels_last: bool  # convolution activations and weights run in channels-last layout
    optimizer: Optimizer | None  # None: the gradient program (gradients out, nothing updated)
    state: dict[str, dict[str, torch.Tensor]]  # the optimizer state, by parameter and state name

    @property
    def trained_nodes(self) -> set[Node]:
        return set(self.trained.values())

    def input_strides(self, graph: Graph) -> dict[Node, tuple[int, ...]]:
        """The layout of every input bound to a fixed tensor, for the memory plan."""
        return {n: t.stride() for n, t in {**self.static, **graph.constants}.items()}


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, Context], object]
    enabled: Callable[[Context], bool] = lambda ctx: True
    optional: bool = True  # can be switched off by name (`disable=`)


def _autodiff(graph: Graph, ctx: Context) -> None:
    """Backward nodes for the trained parameters; their gradients join the program's outputs as `grad:<name>`
    (for the output stage; a parameter the loss does not depend on gets none)."""
    with attention_setting(ctx.options.attention, ctx.device):
        gradients = differentiate(graph, graph.outputs["loss"], list(ctx.trained.values()), ctx.slices)
    drop_stop_gradients(graph)
    graph.outputs.update({f"{GRADIENT_OUTPUT}{name}": gradients[p] for name, p in ctx.trained.items()
                          if gradients[p] is not None})


def _attention(graph: Graph, ctx: Context) -> None:
    """The attentions no gradient passes through get the faster forward kernel alone (math where they draw
    dropout: from the trainer's generator, never the global one, so this stage cannot be left out)."""
    with attention_setting(ctx.options.attention, ctx.device):
        lower_attention(graph)


def _bit_masked_reads(ctx: Context) -> frozenset:
    """The backward ops whose read of an activation the `masks` pass (later) turns into a read of bits: for the
    `recompute` pass's costs."""
    masks_run = ctx.options.activation_masks != "off" and "masks" not in ctx.options.disable
    return frozenset(MASK_ACTIVATION_OPS) if masks_run else frozenset()


PASSES: tuple[Pass, ...] = (  # what each does: docs/architecture.md, "The pipeline"
    Pass("clones", lambda g, ctx: drop_redundant_clones(g)),
    Pass("fold", lambda g, ctx: fold_frozen_batchnorm(g, ctx.trained_nodes, set(ctx.slices))),
    Pass("attention_masks", lambda g, ctx: simplify_attention_masks(g, {**ctx.frozen, **g.constants})),
    Pass("cross_entropy", lambda g, ctx: fuse_linear_cross_entropy(g, ctx.trained_nodes)),
    Pass("autodiff", _autodiff, optional=False),
    Pass("attention", _attention, optional=False),
    Pass("gradients", emit_gradient_outputs, enabled=lambda ctx: ctx.optimizer is None, optional=False),
    Pass("update", emit_updates, enabled=lambda ctx: ctx.optimizer is not None, optional=False),
    Pass("constants", lambda g, ctx: fold_constants(g, {**ctx.frozen, **g.constants})),
    Pass("recompute", lambda g, ctx: rematerialize(g, _bit_masked_reads(ctx))),
    Pass("layout", lambda g, ctx: to_channels_last(g), enabled=lambda ctx: ctx.channels_last),
    Pass("masks", lambda g, ctx: compact_activation_masks(g, ctx.options.activation_masks, ctx.channels_last),
         enabled=lambda ctx: ctx.options.activation_masks != "off"),
    Pass("early_update", lambda g, ctx: update_early(g, g.outputs["loss"])),
    Pass("inplace", lambda g, ctx: run_in_place(g)),
    Pass("chunks", lambda g, ctx: chunk_for_memory(g, ctx.trained_nodes, ctx.options.frozen_chunks, ctx.device,
                                                   ctx.input_strides(g))),
    Pass("matmul", lambda g, ctx: pointwise_convolutions_as_matmul(g), enabled=lambda ctx: ctx.channels_last),
)


def optional_pass_names() -> tuple[str, ...]:
    """The passes `disable=` can switch off."""
    return tuple(p.name for p in PASSES if p.optional)


def context(captured: Captured, trained: dict[str, Selection], model: torch.nn.Module, options: Options,
            device: torch.device, channels_last: bool, optimizer: Optimizer | None,
            state: dict[str, dict[str, torch.Tensor]]) -> Context:
    """The context of one program: its trained parameters' nodes (channel indices become constants of the
    graph), the frozen and the fixed inputs' tensors. Sets the captured graph's outputs (the loss, the new
    buffer values), which dead-code elimination keeps."""
    graph = captured.graph
    missing = [n for n in trained if n not in captured.params]
    if missing:
        raise UserInputError(f"trained parameters {missing} do not appear in the captured graph (tied to "
                             "another parameter, or unused by forward); leave them out of the scheme")
    nodes = {name: captured.params[name] for name in trained}
    slices: dict[Node, ChannelSlice] = {}
    for name, sel in trained.items():
        if sel.kind == "partial":
            channels = torch.tensor(sel.channels, dtype=torch.int64, device=device)
            slices[nodes[name]] = ChannelSlice(sel.dim, sel.channels, graph.constant(f"{name}.channels", channels))
    graph.outputs = {"loss": captured.loss}
    graph.outputs.update({f"{BUFFER_OUTPUT}{name}": v for name, v in captured.buffer_updates.items()})
    params = {node: model.get_parameter(name) for name, node in captured.params.items()}
    buffers = {node: model.get_buffer(name) for name, node in captured.buffers.items()}
    frozen = {node: t for node, t in params.items() if node not in nodes.values()}
    frozen.update({node: buffers[node] for name, node in captured.buffers.items()
                   if name not in captured.buffer_updates})
    return Context(captured, nodes, slices, frozen, {**params, **buffers}, options, device, channels_last,
                   optimizer, state)


def run(graph: Graph, ctx: Context, until: str | None = None) -> Graph:
    """Run the enabled passes of `PASSES` in order on `graph` (in place), stopping after `until` if given."""
    names = [p.name for p in PASSES]
    if until is not None and until not in names:
        raise UserInputError(f"there is no pass {until!r}; the passes are {names}")
    done: list[str] = []
    for p in PASSES:
        if p.enabled(ctx) and p.name not in ctx.options.disable:
            _run_one(p, graph, ctx, done)
            done.append(p.name)
        if p.name == until:
            break
    return graph


def _run_one(p: Pass, graph: Graph, ctx: Context, done: list[str]) -> None:
    where = f"pass {p.name!r} (after {', '.join(done) or 'capture'})"
    try:
        p.run(graph, ctx)
        eliminate_dead_code(graph)
    except PockEngineError as e:  # already says what is wrong with the input and how to fix it
        e.add_note(f"raised in {where}")
        raise
    except Exception as e:
        raise CompilerError(f"{where} failed: {type(e).__name__}: {e}") from e
    if ctx.options.check:
        try:
            graph.lint()
        except ValueError as e:
            raise CompilerError(f"the program is malformed after {where}: {e}") from e
