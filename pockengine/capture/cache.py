"""The capture's disk cache: a model's captured IR kept across processes, so that compiling it again skips torch.export.

Capturing is most of a compile (MobileNetV2: ~2.5 of ~3 s, and the import of torch.export's tracer, ~1-2 s more). A
capture depends only on the model's code and structure, the loss function, the batch's structure and shapes, and the
versions of what traces it; not on the weights, which are the program's inputs. An entry is one safetensors file in
`<cache_dir()>/capture/`: the IR (`ir.graph.Graph` and the `Captured` record) as JSON in the file's metadata, each
constant tensor of the graph as a tensor. Operators are stored by their qualified names (`aten::convolution.default`)
and looked up in `torch.ops` when read.

The key (`capture_key`) digests what the capture reads:
- pockengine (its version and the digest of its source files), torch, Python, the machine, the default dtype, torch's
  global module hooks;
- the model's modules: for each, its path, its class (module and qualified name; for classes outside torch the code of
  every function defined on it and its bases, with the constants and globals that code reads, to a few levels), and its
  attributes (training flag, hooks, configuration objects, plain tensors by value: a tensor attribute that is not a
  parameter or buffer is traced as a constant, so its values are part of the program);
- every parameter's and buffer's name (tied ones: the name they are tied to), shape, stride, dtype, device and
  `requires_grad`; never their values;
- the loss function (its code, closure, defaults and the globals it reads), and the batch: its tree structure, each
  tensor leaf's shape, stride, dtype and device, and the value of each leaf that is not a tensor (traced as a constant).

Torch's own functions and classes are keyed by name (torch's version covers their code); so is code reached only
through another module's attribute (`library.function(x)`), covered by the version of the library of each module's
class. An object in the model whose
description would hold a memory address (an opaque C object) makes the model uncacheable: such a key would never be
found again, and an object that cannot be described cannot be ruled out as something tracing reads.

What is not cached (captured every time, as without the cache): a capture holding custom `autograd.Function` records
(`Captured.function_calls`: their contexts belong to the process that ran them), one with branches on values decided
as the example batch decides them (capture/value_branches.py: another example batch may decide them otherwise), a
graph with an argument, target or constant the JSON cannot encode exactly (an operator that is not an `OpOverload` or
`getitem`, a Python object), and a model whose key cannot be described. Errors are never cached.

Entries are written atomically with a SHA-256 sidecar (`storage.cached_file`). A reader trusts nothing: a file that
does not match its checksum, JSON that does not decode, an operator that no longer exists, a key recorded inside the
entry that differs from the one asked for, or a graph that fails `Graph.lint()` or whose parameters do not match the
model's, is reported with a warning and captured and written again. The folder is kept under `SIZE_LIMIT` bytes: after
each write the least recently used entries (by modification time, refreshed on every hit) are removed.
"""

from __future__ import annotations

import builtins
import contextvars
import enum
import functools
import hashlib
import importlib.metadata
import json
import operator
import os
import platform
import re
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from pockengine.capture.export import Captured, normalize_batch
from pockengine.capture.value_branches import MESSAGE_START as BRANCH_CHECK
from pockengine.ir.graph import Graph, Node, TensorMeta
from pockengine.storage import USUAL_FILE_MODE, cache_dir, cached_file

SIZE_LIMIT = 256 * 2 ** 20  # bytes of the cache folder; the least recently used entries go first
FORMAT = 1  # of the entries' JSON; part of the key
_FOLDER = "capture"
_SUFFIX = ".safetensors"
_META_KEY, _META_IR = "pockengine_capture_key", "pockengine_capture"
_UNSET = object()
_LOCKS = (type(threading.Lock()), type(threading.RLock()))
_DEPTH = 4  # how far the globals read by a function's code are followed (a function calling a function ...)


class _NotCacheable(Exception):
    """This capture or model cannot be cached exactly; it is captured every time instead."""


def folder() -> Path:
    return cache_dir() / _FOLDER


# ---------------------------------------------------------------------------------------------------------- the key
@functools.cache
def _pockengine_digest() -> str:
    """pockengine's version and the digest of its source files: a capture made by other code is another entry."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    try:
        h.update(importlib.metadata.version("pockengine").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"unversioned")
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _environment() -> list[Any]:
    return [FORMAT, _pockengine_digest(), torch.__version__, sys.version, platform.machine(), platform.system(),
            str(torch.get_default_dtype())]


def _from_torch(obj: Any) -> bool:
    """Whether `obj` is torch's or Python's own (standard library, builtins): the versions in the key cover its code,
    and following the globals of their code would reach process state (threads, caches)."""
    top = (getattr(obj, "__module__", None) or "").partition(".")[0]
    return top == "torch" or top in sys.stdlib_module_names or top in ("builtins", "_thread", "_collections_abc")


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', getattr(obj, '__name__', type(obj)))}"


def _package_version(obj: Any) -> str | None:
    top = (getattr(obj, "__module__", None) or "").partition(".")[0]
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else None


class _Describer:
    """JSON-able descriptions of the objects tracing may read, equal across processes for equal objects. Functions,
    classes and objects are described once each (by id) while one key is made, as the digest of their description."""

    def __init__(self) -> None:
        self._done: dict[int, str] = {}
        self._active: set[int] = set()
        self._keep: list[Any] = []  # the described objects stay alive, so that no id is reused meanwhile

    def __call__(self, v: Any, depth: int = _DEPTH) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return ["float", repr(v)]
        if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)):
            return [type(v).__name__, str(v)]
        if isinstance(v, enum.Enum):
            return ["enum", _name(type(v)), str(v.value) if isinstance(v.value, (int, str)) else v.name]
        if isinstance(v, bytes):
            return ["bytes", hashlib.sha256(v).hexdigest()]
        if isinstance(v, torch.Tensor):
            return self._tensor(v)
        if type(v).__module__ == "numpy" and hasattr(v, "tobytes") and hasattr(v, "shape"):
            return ["ndarray", list(v.shape), str(v.dtype), hashlib.sha256(v.tobytes()).hexdigest()]
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return [type(v).__name__, [self(x, depth) for x in v]]
        if isinstance(v, (set, frozenset)):
            return [type(v).__name__, sorted(json.dumps(self(x, depth)) for x in v)]
        if isinstance(v, types.ModuleType):
            return ["pymodule", v.__name__]
        if id(v) in self._done:
            return self._done[id(v)]
        if id(v) in self._active:
            return ["cycle"]
        self._active.add(id(v))
        try:
            described = self._object(v, depth)
        finally:
            self._active.discard(id(v))
        digest = "@" + hashlib.sha256(json.dumps(described).encode()).hexdigest()
        self._done[id(v)] = digest
        self._keep.append(v)
        return digest

    def _tensor(self, t: torch.Tensor) -> Any:
        desc = ["tensor", list(t.shape), str(t.dtype), t.device.type, list(t.stride()) if t.layout == torch.strided
                else str(t.layout), t.requires_grad]
        if t.device.type != "meta" and t.layout == torch.strided:
            # its values: a tensor that is not a parameter or buffer is traced as a constant of the program
            data = t.detach().cpu().contiguous().reshape(-1)
            desc.append(hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest())
        return desc

    def _object(self, v: Any, depth: int) -> Any:
        if isinstance(v, dict):
            return ["dict", _name(type(v)), [[self(k, depth), self(x, depth)] for k, x in v.items()]]
        if isinstance(v, types.FunctionType):
            return self._function(v, depth)
        if isinstance(v, types.MethodType):
            return ["method", self(v.__func__, depth), _name(type(v.__self__))]
        if isinstance(v, functools.partial):
            return ["partial", self(v.func, depth), self(list(v.args), depth), self(dict(v.keywords), depth)]
        if isinstance(v, type):
            return self._class(v, depth)
        if isinstance(v, nn.Module):
            # a module kept outside the module tree: its structure (the tree's own modules are described apart)
            return ["module", self._class(type(v), depth), self(_attributes(v), depth - 1),
                    [[n, self._tensor(t)] for n, t in v.state_dict(keep_vars=True).items()]]
        if isinstance(v, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ["operator", str(v)]
        if isinstance(v, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodDescriptorType)) or (
                callable(v) and _from_torch(v) and hasattr(v, "__qualname__")):
            return ["callable", _name(v)]
        if hasattr(v, "_fields") and isinstance(v, tuple):
            return ["namedtuple", _name(type(v)), [self(x, depth) for x in v]]
        state = getattr(v, "__dict__", None)
        if isinstance(state, dict):
            if depth <= 0:
                return ["object", _name(type(v))]
            return ["object", self._class(type(v), depth - 1), self(dict(state), depth - 1)]
        if type(v) is object:
            return ["sentinel"]  # `MISSING = object()`: compared by identity, which holds within a process
        if isinstance(v, contextvars.ContextVar):
            return ["contextvar", v.name, self(v.get(_UNSET), depth)]  # its value now, which a trace would read
        if isinstance(v, types.GeneratorType):  # a context manager's generator: its code
            frame_globals = v.gi_frame.f_globals if v.gi_frame is not None else {}
            return ["generator", v.gi_code.co_qualname, self._code(v.gi_code, frame_globals, depth)]
        if isinstance(v, _LOCKS):
            return ["lock"]  # guards other state; holds no value a trace reads
        r = repr(v)
        if re.search(r"0x[0-9a-fA-F]{6,}", r):  # an address: another in every process
            raise _NotCacheable(f"the model holds {type(v).__qualname__} {r[:80]}, which cannot be described")
        return ["repr", _name(type(v)), r]

    def _function(self, f: types.FunctionType, depth: int) -> Any:
        if _from_torch(f):
            return ["function", _name(f)]
        cells = []
        for cell in f.__closure__ or ():
            try:
                cells.append(self(cell.cell_contents, depth))
            except ValueError:  # an empty cell
                cells.append(["empty"])
        return ["function", _name(f), self._code(f.__code__, f.__globals__, depth), cells,
                self(f.__defaults__, depth), self(f.__kwdefaults__, depth)]

    def _code(self, code: types.CodeType, globals_: dict, depth: int) -> Any:
        consts = [self._code(c, globals_, depth) if isinstance(c, types.CodeType) else self(c, depth)
                  for c in code.co_consts]
        read = []
        if depth > 0:
            for name in code.co_names:
                if name in globals_:
                    read.append([name, self(globals_[name], depth - 1)])
                elif hasattr(builtins, name):
                    read.append([name, "builtin"])
        return [hashlib.sha256(code.co_code).hexdigest(), consts, list(code.co_names), list(code.co_varnames),
                code.co_argcount, code.co_kwonlyargcount, code.co_flags, read]

    def _class(self, cls: type, depth: int) -> Any:
        if _from_torch(cls):
            return ["class", _name(cls)]
        methods = []
        for base in cls.__mro__:
            if _from_torch(base):
                continue
            for name, attr in vars(base).items():
                f = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else (
                    attr.fget if isinstance(attr, property) else attr)
                if isinstance(f, types.FunctionType):
                    methods.append([_name(base), name, self._function(f, depth)])
                elif not name.startswith("__") and isinstance(attr, (bool, int, float, str, tuple, type(None))):
                    methods.append([_name(base), name, self(attr, depth)])
        return ["class", _name(cls), _package_version(cls), methods]


# Described apart: the module tree and its tensors, and the hooks (by function and flags: the flags' dicts keep the
# ids of hooks removed since, and ids are a per-process count).
_APART = {"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"}


def _attributes(module: nn.Module) -> dict[str, Any]:
    """What a module holds besides its submodules and tensors, its forward hooks as `_hooks` describes them."""
    attrs = {k: v for k, v in vars(module).items() if k not in _APART}
    attrs["forward hooks"] = _hooks(vars(module), "")
    return attrs


def _hooks(where: dict[str, Any], prefix: str) -> list[Any]:
    """The forward hooks and pre-hooks in `where` (a module's attributes, or torch's globals with prefix
    `_global`), in the order they run, each with the flags it was registered with."""
    get = lambda name: where.get(f"{prefix}{name}") or {}  # noqa: E731
    with_kwargs, always, pre_with_kwargs = (get("_forward_hooks_with_kwargs"), get("_forward_hooks_always_called"),
                                            get("_forward_pre_hooks_with_kwargs"))
    return [[[hook, i in pre_with_kwargs] for i, hook in get("_forward_pre_hooks").items()],
            [[hook, i in with_kwargs, i in always] for i, hook in get("_forward_hooks").items()]]


def capture_key(model: nn.Module, loss_fn: Callable, batch: Any) -> str | None:
    """The cache key of the capture of `model` with `loss_fn` on batches like `batch` (see the module's docstring);
    None where the model or loss cannot be described exactly (it is then not cached)."""
    describe = _Describer()
    try:
        canonical = {id(p): n for n, p in model.named_parameters()}
        modules = [[path, describe(type(m)), describe(_attributes(m))]
                   for path, m in model.named_modules(remove_duplicate=False)]
        params = [[n, canonical[id(p)], list(p.shape), list(p.stride()), str(p.dtype), p.device.type, p.requires_grad]
                  for n, p in model.named_parameters(remove_duplicate=False)]
        buffers = [[n, list(b.shape), list(b.stride()), str(b.dtype), b.device.type]
                   for n, b in model.named_buffers(remove_duplicate=False)]
        leaves, spec = pytree.tree_flatten(normalize_batch(batch))
        batch_desc = [str(spec), [[list(t.shape), list(t.stride()), str(t.dtype), t.device.type] if
                                  isinstance(t, torch.Tensor) else describe(t) for t in leaves]]
        hooks = describe(_hooks(vars(nn.modules.module), "_global"))
        whole = [_environment(), hooks, modules, params, buffers, describe(loss_fn), batch_desc]
    except Exception:  # noqa: BLE001  (_NotCacheable, or a model that cannot be read this way: not cached)
        return None
    return hashlib.sha256(json.dumps(whole).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- the entry's IR
_SCALARS = {"dtype": torch.dtype, "device": torch.device, "layout": torch.layout, "memory_format": torch.memory_format}
_BY_STR = {kind: {str(v): v for v in vars(torch).values() if isinstance(v, cls)} for kind, cls in _SCALARS.items()
           if kind != "device"}


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    raise _NotCacheable(f"the graph calls {target!r}, which is not an ATen-style operator")


def _operator(name: str) -> Any:
    if name == "getitem":
        return operator.getitem
    namespace, _, rest = name.partition("::")
    op, _, overload = rest.rpartition(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _encode_arg(a: Any, index: dict[Node, int]) -> Any:
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return {"f": repr(a)}  # exactly, nan and inf included
    if isinstance(a, Node):
        return {"n": index[a]}
    if type(a) is list:
        return [_encode_arg(x, index) for x in a]
    if type(a) is tuple:
        return {"t": [_encode_arg(x, index) for x in a]}
    if type(a) is immutable_list:
        return {"il": [_encode_arg(x, index) for x in a]}
    if type(a) in (dict, immutable_dict):
        if not all(isinstance(k, str) for k in a):
            raise _NotCacheable(f"a dict argument with keys that are not strings: {list(a)[:3]}")
        return {"d" if type(a) is dict else "id": {k: _encode_arg(v, index) for k, v in a.items()}}
    for kind, cls in _SCALARS.items():
        if isinstance(a, cls):
            if kind != "device" and _BY_STR[kind].get(str(a)) is not a:
                raise _NotCacheable(f"{a!r} has no unique name in torch")
            return {kind: str(a)}
    raise _NotCacheable(f"an argument of type {type(a).__name__} ({a!r:.60})")


def _decode_arg(a: Any, nodes: list[Node]) -> Any:
    if not isinstance(a, (dict, list)):
        return a
    if isinstance(a, list):
        return [_decode_arg(x, nodes) for x in a]
    (kind, v), = a.items()
    if kind == "n":
        return nodes[v]
    if kind == "f":
        return float(v)
    if kind == "t":
        return tuple(_decode_arg(x, nodes) for x in v)
    if kind == "il":
        return immutable_list(_decode_arg(x, nodes) for x in v)
    if kind in ("d", "id"):
        return (dict if kind == "d" else immutable_dict)({k: _decode_arg(x, nodes) for k, x in v.items()})
    if kind == "device":
        return torch.device(v)
    return _BY_STR[kind][v]


def _encode_meta(m: Any) -> Any:
    if m is None:
        return None
    if isinstance(m, TensorMeta):
        return {"s": list(m.shape), "dt": str(m.dtype)}
    if isinstance(m, tuple):
        return [_encode_meta(x) for x in m]
    raise _NotCacheable(f"node metadata {m!r:.60}")


def _decode_meta(m: Any) -> Any:
    if m is None:
        return None
    if isinstance(m, list):
        return tuple(_decode_meta(x) for x in m)
    return TensorMeta(tuple(m["s"]), _BY_STR["dtype"][m["dt"]])


def _encode(captured: Captured) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The capture as JSON and its constants as tensors; _NotCacheable where that would not be exact."""
    graph = captured.graph
    if captured.function_calls:
        raise _NotCacheable("custom autograd.Function records")
    if graph.outputs or graph.notes or graph.unpadded_masks or graph.remarks:
        raise _NotCacheable("a graph with outputs, notes or remarks already")
    if any(n.target is torch.ops.aten._assert_async.msg and str(n.args[1]).startswith(BRANCH_CHECK)
           for n in graph.nodes):
        raise _NotCacheable("branches decided on the example batch's values, which the key does not hold")
    index = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [[n.name, None if n.is_input else _op_name(n.target), _encode_arg(n.args, index),
              _encode_arg(n.kwargs, index), _encode_meta(n.meta), n.module, n.section, n.role] for n in graph.nodes]
    tensors, constants = {}, []
    for i, (node, value) in enumerate(graph.constants.items()):
        if value.layout != torch.strided or value.is_quantized or value.requires_grad:
            raise _NotCacheable(f"constant {node.name} ({value.layout}, quantized or requiring grad)")
        tensors[f"c{i}"] = value.detach().cpu().clone()  # its own storage: safetensors refuses shared ones
        constants.append([index[node], f"c{i}", list(value.stride()), str(value.device)])
    ir = {"nodes": nodes, "names": sorted(graph._names), "constants": constants,
          "params": {k: index[v] for k, v in captured.params.items()},
          "buffers": {k: index[v] for k, v in captured.buffers.items()},
          "batch": [None if n is None else index[n] for n in captured.batch], "loss": index[captured.loss],
          "buffer_updates": {k: index[v] for k, v in captured.buffer_updates.items()}}
    return ir, tensors


def _decode(ir: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Captured:
    graph = Graph()
    nodes: list[Node] = []
    for name, target, args, kwargs, meta, module, section, role in ir["nodes"]:
        nodes.append(Node(name, None if target is None else _operator(target), _decode_arg(args, nodes),
                          _decode_arg(kwargs, nodes), _decode_meta(meta), module, section, role))
    graph.nodes = nodes
    graph._names = set(ir["names"])
    for i, key, stride, device in ir["constants"]:
        value = tensors[key]
        graph.constants[nodes[i]] = torch.empty_strided(value.shape, stride, dtype=value.dtype,
                                                        device=device).copy_(value)
    return Captured(graph, {k: nodes[i] for k, i in ir["params"].items()},
                    {k: nodes[i] for k, i in ir["buffers"].items()},
                    [None if i is None else nodes[i] for i in ir["batch"]], nodes[ir["loss"]],
                    {k: nodes[i] for k, i in ir["buffer_updates"].items()})


def _write(path: Path, key: str, captured: Captured) -> None:
    from safetensors.torch import save_file

    ir, tensors = _encode(captured)
    save_file(tensors, str(path), metadata={_META_KEY: key, _META_IR: json.dumps(ir, allow_nan=False)})
    os.chmod(path, USUAL_FILE_MODE)  # safetensors' writer gives 0600


def _read(path: Path, key: str, model: nn.Module) -> Captured:
    """The entry at `path`, checked against `key` and `model`; ValueError (or another error of decoding) if it is
    not what it should be."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get(_META_KEY) != key:
            raise ValueError(f"it records the key {meta.get(_META_KEY)!r:.20}, not {key[:16]}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    captured = _decode(json.loads(meta[_META_IR]), tensors)
    captured.graph.lint()
    for name, node in captured.params.items():
        p = model.get_parameter(name)
        if node.meta != TensorMeta(tuple(p.shape), p.dtype):
            raise ValueError(f"parameter {name} is recorded as {node.meta}, the model's is {list(p.shape)}")
    return captured


# ------------------------------------------------------------------------------------------------------ the lookup
def entry_path(key: str) -> Path:
    return folder() / f"{key}{_SUFFIX}"


def is_cached(model: nn.Module, loss_fn: Callable, batch: Any) -> bool:
    """Whether an entry for this capture is there (not yet verified: `cached_capture` does that)."""
    key = capture_key(model, loss_fn, batch)
    return key is not None and entry_path(key).exists()


class _Failed(Exception):
    """The capture itself failed inside the cache's build: its error is raised as it is, not as a cache error."""


def cached_capture(model: nn.Module, loss_fn: Callable, batch: Any, run: Callable[[], Captured]) -> Captured:
    """The capture of `model` with `loss_fn` on `batch` from the cache, or `run()`'s, written to the cache for the
    next process (see the module's docstring)."""
    key = capture_key(model, loss_fn, batch)
    if key is None:
        return run()
    path = entry_path(key)
    made: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        try:
            made["captured"] = run()
        except BaseException as e:
            made["error"] = e
            raise _Failed from e
        _write(tmp, key, made["captured"])

    def published() -> Captured | None:
        """The entry read back, or the capture just made and written; None if the entry there is unusable."""
        try:
            cached_file(path, build, "capture")
        except _Failed:
            raise made["error"] from None
        except _NotCacheable:
            return made["captured"]
        if "captured" in made:
            _evict(keep=path)
            return made["captured"]
        try:
            captured = _read(path, key, model)
        except FileNotFoundError:
            return None  # removed meanwhile by another process keeping the folder to its limit
        except Exception as e:  # noqa: BLE001  (whatever is wrong with the entry, it is captured again)
            warnings.warn(f"pockengine: the cached capture {path} cannot be used ({type(e).__name__}: "
                          f"{str(e)[:200]}); capturing again", RuntimeWarning, stacklevel=4)
            remove_entry(path)
            return None
        _touch(path)
        return captured

    for _ in range(2):  # the second time the entry is written anew, unless another process writes it meanwhile
        captured = published()
        if captured is not None:
            return captured
    return run()


def remove_entry(path: Path) -> None:
    """Remove the entry at `path` and its checksum."""
    for p in (path, path.with_name(path.name + ".sha256")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves its entries; they are only not ordered by use


def _evict(keep: Path) -> None:
    """Remove the least recently used entries until the folder holds at most SIZE_LIMIT bytes (`keep` stays)."""
    entries = []
    for p in folder().glob(f"*{_SUFFIX}"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # removed by another process meanwhile
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= SIZE_LIMIT:
            break
        if p != keep:
            remove_entry(p)
            total -= size
