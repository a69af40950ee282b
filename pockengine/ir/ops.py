"""Facts about ATen operators, in one place: every pass and the backend ask here.

Read from ATen's own metadata where it has them:

- a *view* returns (an output aliasing) an input it does not write: the schema annotates them alike,
  `reshape(Tensor(a) self, ...) -> Tensor(a)`, without the `!` of an in-place op;
- *mutating* ops write an input: `Tensor(a!)` in the schema;
- *pointwise* ops carry `torch.Tag.pointwise` (and draw nothing at random: `torch.Tag.nondeterministic_seeded`);
- the *in-place variant* of `aten.op.overload` is `aten.op_.overload` when its schema writes its first argument;
- *random* ops carry `torch.Tag.nondeterministic_seeded`; the overload that draws from a given generator is the one
  whose schema adds a `Generator? generator` argument (`rand.default` -> `rand.generator`).

The hand lists below are judgement calls ATen has no metadata for; each says why it exists.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

aten = torch.ops.aten

# `_unsafe_view` returns a view, but its schema declares a fresh tensor (autograd is told not to track the alias).
UNANNOTATED_VIEWS = frozenset({aten._unsafe_view.default})

# Element-wise ops ATen leaves untagged.
UNTAGGED_POINTWISE = frozenset({aten.hardswish.default})

# The functional ops the in-place pass rewrites (to their schema's in-place variant, `in_place_variant`): the ones
# whose outputs are large in the models measured (activations, residual adds, gradient masking, the bit masks'
# ATen fallback). Every other pointwise op has an in-place variant too; adding one here changes the programs and
# their kernels, so it is done with a measurement.
RUN_IN_PLACE = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.masked_fill.Scalar, aten.add.Tensor, aten.mul.Tensor,
    aten.bitwise_and.Scalar, aten.bitwise_right_shift.Tensor_Scalar, aten.logical_or.default,
    # the log-softmax backward (rules/norm.py) and the gather backward's scatter into zeros: a causal LM's
    # (tokens x vocabulary) gradients (SmolLM2 at 1024 tokens: 192 MiB each)
    aten.exp.default, aten.sub.Tensor, aten.scatter_add.default,
})
# Ops whose two tensor operands can be swapped (ATen has no tag for it): either one may be overwritten.
COMMUTATIVE = frozenset({aten.add.Tensor, aten.mul.Tensor, aten.logical_or.default})

# Views that fail when the input's strides do not allow one (a channels-last activation read as NCHW-flat);
# `reshape` is the same view where one exists and a copy elsewhere.
STRICT_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default})

# Non-pointwise ops that treat each sample of the batch (dimension 0) on its own, so running them on slices of the
# batch gives slices of the result: no ATen metadata says which dimension an op reduces over. `mean.dim` only
# when it keeps dimension 0 (checked where it is used).
SAMPLEWISE = frozenset({
    aten.convolution.default, aten._native_batch_norm_legit_no_training.default,
    aten.max_pool2d_with_indices.default, aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.mean.dim,
    operator.getitem,
})

# Python bindings that dispatch to exactly these overloads when called with positional arguments only: they skip the
# OpOverload object's generic argument handling, 2-3 us a call, and a MobileNetV2 step makes over a thousand calls.
# tests/test_codegen.py checks that both spellings dispatch the same ops.
FAST_CALLS = {
    aten.permute.default: "torch.permute", aten.reshape.default: "torch.reshape",
    aten.view.default: "torch.Tensor.view", aten.mm.default: "torch.mm", aten.addmm.default: "torch.addmm",
    aten.convolution.default: "torch.convolution", aten.hardtanh_.default: "torch._C._nn.hardtanh_",
    aten.add.Tensor: "torch.add", aten.add_.Tensor: "torch.Tensor.add_", aten.mul.Tensor: "torch.mul",
    aten.mul_.Tensor: "torch.Tensor.mul_", aten.sum.dim_IntList: "torch.sum",
}


def _schema(target: Any) -> torch.FunctionSchema | None:
    return getattr(target, "_schema", None)


@functools.cache
def is_view(target: Any) -> bool:
    """The result may share storage with an input that the op does not write. `getitem` (an output of a
    multi-output op) counts: the outputs of `split` are views of its input."""
    if target is operator.getitem or target in UNANNOTATED_VIEWS:
        return True
    schema = _schema(target)
    return schema is not None and any(r.alias_info is not None and not r.alias_info.is_write
                                      for r in schema.returns)


def is_mutating(target: Any) -> bool:
    """The op writes one of its inputs."""
    schema = _schema(target)
    return schema is not None and schema.is_mutable


@functools.cache
def is_pointwise(target: Any) -> bool:
    """Each output element depends on the input elements at the same position only, and on nothing random."""
    tags = getattr(target, "tags", ())
    return (torch.Tag.pointwise in tags or target in UNTAGGED_POINTWISE) and not draws_random(target)


@functools.cache
def in_place_variant(target: Any) -> Any | None:
    """`aten.op_.overload` for `aten.op.overload`, when its schema writes (and returns) its first argument and
    otherwise takes the same arguments; None when there is none."""
    schema = _schema(target)
    if schema is None:
        return None
    namespace = getattr(torch.ops, target.namespace)
    packet = getattr(namespace, f"{target.overloadpacket.__name__}_", None)
    variant = getattr(packet, target._overloadname, None) if packet is not None else None
    if variant is None:
        return None
    args = variant._schema.arguments
    writes_first = bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    same_args = [a.name for a in args] == [a.name for a in schema.arguments]
    return variant if writes_first and same_args else None


def draws_random(target: Any) -> bool:
    """The op draws random numbers (dropout, `rand`, `bernoulli`, attention kernels that can apply dropout)."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


@functools.cache
def generator_variant(target: Any) -> Any | None:
    """The overload drawing from a `generator=` argument: `target` itself where its schema has one (`bernoulli.p`),
    else the overload of its packet taking the same arguments plus `generator` (`rand.default` -> `rand.generator`,
    `randint.low` -> `randint.low_generator`); None when ATen has none (`native_dropout`, attention kernels)."""
    schema = _schema(target)
    if schema is None:
        return None

    def signature(s: torch.FunctionSchema) -> list[tuple[str, str]]:
        return [(a.name, str(a.type)) for a in s.arguments if a.name != "generator"]

    if any(a.name == "generator" for a in schema.arguments):
        return target
    for name in target.overloadpacket.overloads():
        variant = getattr(target.overloadpacket, name)
        if (any(a.name == "generator" for a in variant._schema.arguments)
                and signature(variant._schema) == signature(schema)):
            return variant
    return None


def draws_nothing(target: Any, args: tuple, kwargs: dict) -> bool:
    """A random op whose randomness is a dropout (`native_dropout`'s `p`; attention kernels, recurrent layers: their
    schemas name it `dropout_p` or `dropout`, beside a `train` flag for some) draws nothing with these arguments when
    that probability is 0 or `train` is off."""
    schema = _schema(target)
    if schema is None:
        return False
    values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name, a.default_value))
              for i, a in enumerate(schema.arguments)}
    probability = next((values[n] for n in ("dropout_p", "dropout", "p") if n in values), None)
    return probability == 0 or (probability is not None and values.get("train") is False)
