"""Fuzzing the public API and the parsers (schemes, optimizer configs, selections, checkpoints, cache entries, CLI
scheme specs, batches): whatever goes in, the only exceptions that come out are pockengine's own, and damaged bytes
are never loaded."""

import math
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pockengine as pe
from pockengine import storage
from pockengine.capture import normalize_batch
from pockengine.finetune import parse_scheme as cli_scheme
from pockengine.scheme import MODES, SELECTS, Scheme, Selection

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 20), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["1/4", "0.5", "1/0", "nan", "-1", "x/y"]))
json_like = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                         max_leaves=12)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


MODULE_NAMES = ["", "0", "2", "4", "*", "[0-2]", "?", "nowhere", "4.weight"]
rules = st.fixed_dictionaries({}, optional={
    "modules": st.one_of(st.sampled_from(MODULE_NAMES), scalars),
    "mode": st.one_of(st.sampled_from(MODES), scalars),
    "ratio": scalars,
    "select": st.one_of(st.sampled_from(SELECTS), scalars),
    "junk": scalars})
schemes = st.one_of(json_like, st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=5), scalars),
    "rules": st.one_of(st.lists(st.one_of(rules, scalars), max_size=4), scalars),
    "last": scalars,
    "resolved": st.one_of(json_like, st.dictionaries(st.sampled_from(["0.weight", "4.bias", "x"]), json_like))}))


@FUZZ
@given(schemes)
def test_scheme_dicts(d):
    try:
        scheme = Scheme.from_dict(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            selections = scheme.resolve(net())
    except pe.PockEngineError:
        return
    params = dict(net().named_parameters())
    for name, sel in selections.items():
        assert name in params
        if sel.kind == "partial":
            assert 0 < len(sel.channels) < params[name].shape[sel.dim]


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       st.sampled_from([".yaml", ".json"]))
def test_scheme_files(tmp_path, text, suffix):
    path = tmp_path / f"s{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        Scheme.from_file(path)
    except pe.PockEngineError:
        pass


@FUZZ
@given(st.one_of(st.text(max_size=12), st.sampled_from(["last:", "last:1", "last:01", "last:-0", "last: 3", "full"])))
def test_cli_scheme_specs(spec):
    try:
        cli_scheme(spec)
    except pe.PockEngineError:
        pass


@FUZZ
@given(json_like)
def test_selections(d):
    try:
        sel = Selection.from_dict(d)
    except pe.PockEngineError:
        return
    assert Selection.from_dict(sel.to_dict()) == sel


hyper = st.one_of(scalars, st.floats(-2, 2), st.tuples(scalars, scalars), st.lists(st.floats(-1, 2), max_size=3))


@FUZZ
@given(st.sampled_from(["SGD", "AdamW", "Adam", None]), st.dictionaries(
    st.sampled_from(["lr", "momentum", "nesterov", "weight_decay", "betas", "eps", "dampening"]), hyper, max_size=4),
    st.integers(1, 10 ** 6), hyper)
def test_optimizers(kind, config, step, lr):
    try:
        opt = pe.optim.from_config({"kind": kind, **config})
    except pe.PockEngineError:
        return
    try:
        values = opt.scalars(step, lr)
    except pe.PockEngineError:
        return
    assert all(math.isfinite(v) for v in values.values())
    assert pe.optim.from_config(opt.config()).config() == opt.config()


@FUZZ
@given(st.one_of(json_like, st.tuples(json_like, json_like),
                 st.tuples(st.just(torch.zeros(2, 3)), json_like), st.just((torch.zeros(2), torch.zeros(2)))))
def test_batches(batch):
    try:
        normalize_batch(batch)
    except pe.PockEngineError:
        pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "ckpt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    trainer = pe.compile(model, pe.losses.cross_entropy(), ((torch.randn(3, 4),), torch.tensor([0, 1, 1])),
                         optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    trainer.save(folder)
    return folder


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["model.safetensors", "optimizer.safetensors", "generator.safetensors", "trainer.json",
                        "pockengine-manifest.json"]),
       st.floats(0, 1, exclude_max=True), st.one_of(st.integers(0, 255), st.none()))
def test_damaged_checkpoints_are_never_loaded(saved, tmp_path, file, where, byte):
    folder = tmp_path / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved, folder)
    path = folder / file
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if byte is None:
        data = data[:at]  # truncated
    else:
        data[at] = byte
    changed = bytes(data) != path.read_bytes()
    path.write_bytes(bytes(data))
    try:
        pe.read_checkpoint(folder)
    except pe.CheckpointError as e:
        assert changed and file in str(e)
        return
    # Loaded: only an unchanged file, or a manifest whose change does not alter what it records (JSON whitespace).
    assert not changed or file == "pockengine-manifest.json"


@FUZZ
@given(st.sampled_from(["truncate", "set"]), st.floats(0, 1, exclude_max=True), st.integers(0, 255))
def test_cache_entries_are_always_verified(tmp_path, how, where, byte):
    content = bytes(range(256)) * 4
    built = []

    def build(tmp):
        built.append(1)
        tmp.write_bytes(content)

    path = storage.cached_file(tmp_path / "entry.bin", build, "fuzz entry")
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if how == "truncate":
        data = data[:at]
    else:
        data[at] = byte
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert storage.cached_file(path, build, "fuzz entry").read_bytes() == content
    assert len(built) == (1 if bytes(data) == content else 2)
    path.unlink()
