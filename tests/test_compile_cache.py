"""The capture's disk cache (pockengine/capture/cache.py): a warm compile is the cold one, every change the capture
depends on is a miss, a damaged entry is rebuilt with a warning, the option and the environment turn it off, and the
folder keeps to its size limit."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import pockengine as pe
import pockengine.trainer
from pockengine.capture import cache
from pockengine.capture import capture as real_capture
from pockengine.storage import file_digest

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Convolution, BatchNorm, a linear head, and a tensor attribute that is neither parameter nor buffer (traced
    as a constant of the program)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # before BatchNorm a bias's gradient is 0
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.offsets = torch.linspace(-0.5, 0.5, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(h) + self.offsets


def batch(n: int = 4, size: int = 6, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, size, size, generator=g, dtype=dtype),), torch.randint(0, 4, (n,), generator=g)


@pytest.fixture
def cache_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("POCKENGINE_CAPTURE_CACHE", "1")
    return tmp_path / "capture"


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.exists() else []


def compile_net(model: nn.Module, b=None, **options) -> pe.Trainer:
    return pe.compile(model, pe.losses.cross_entropy(), b or batch(), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9),
                      **options)


def autograd_gradients(model: nn.Module, b) -> dict[str, torch.Tensor]:
    (x,), y = b
    model.zero_grad()
    pe.losses.cross_entropy()(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_a_warm_compile_is_the_cold_one(cache_folder, monkeypatch):
    cold = compile_net(Net())
    assert len(entries(cache_folder)) == 1
    assert cold.options.capture_cache
    cold_losses = [cold.step(batch()) for _ in range(3)]

    monkeypatch.setattr(pockengine.trainer, "capture", lambda *a: pytest.fail("captured although cached"))
    warm = compile_net(Net())
    assert str(warm.program().graph) == str(cold.program().graph)
    assert str(warm.program(gradients=True).graph) == str(cold.program(gradients=True).graph)
    assert [warm.step(batch()) for _ in range(3)] == cold_losses  # the same program on the same values: bit for bit
    for (name, a), b in zip(cold.model.named_parameters(), warm.model.parameters()):
        assert torch.equal(a, b), name

    # The weights are inputs, not part of the entry: other weights read the same entry and train as autograd says.
    other = Net(seed=3)
    reference = autograd_gradients(Net(seed=3), batch())
    grads = compile_net(other).gradients(batch())
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        assert relative_error(g, reference[name]) <= 1e-4, name


def key(model=None, loss=None, b=None) -> str:
    return cache.capture_key(model or Net(), loss or pe.losses.cross_entropy(), b or batch())


def test_every_change_the_capture_depends_on_is_another_key(monkeypatch):
    base = key()
    assert key() == base  # a fresh model, same code and shapes: the same key
    assert key(Net(seed=5)) == base  # other weights: the same key

    class Net2(Net):  # the same structure, other code
        def forward(self, x):
            return super().forward(x) * 2
    Net2.__qualname__, Net2.__name__ = Net.__qualname__, Net.__name__
    assert key(Net2()) != base

    changed = Net()
    changed.offsets = changed.offsets + 1  # a constant of the program: its values are part of the key
    assert key(changed) != base
    scalar = Net()
    scalar.scale = torch.tensor(2.0, dtype=torch.bfloat16)  # a 0-d tensor of any dtype is keyed by its value too
    assert key(scalar) not in (None, base)
    assert key(b=batch(size=8)) != base  # a shape
    assert key(b=batch(n=2)) != base
    assert key(Net().double(), b=batch(dtype=torch.float64)) != base  # a dtype
    assert key(loss=pe.losses.cross_entropy(label_smoothing=0.1)) != base  # the loss's closure
    assert key(loss=pe.losses.mse()) != base  # the loss's code
    assert key(Net().eval()) != base  # train/eval mode
    frozen = Net()
    frozen.conv.weight.requires_grad_(False)
    assert key(frozen) != base
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert key() != base


def test_a_change_of_shape_or_mode_captures_again(cache_folder):
    compile_net(Net())
    compile_net(Net(), batch(n=2))
    compile_net(Net().eval())
    assert len(entries(cache_folder)) == 3


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_json(path: Path) -> None:
    """Valid safetensors with a matching checksum, whose IR does not decode: only the reader can find it."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta[cache._META_IR] = meta[cache._META_IR][:-40]
    save_file(tensors, str(path), metadata=meta)
    path.with_name(path.name + ".sha256").write_text(f"{file_digest(path)} {path.stat().st_size}\n")


def _wrong_operator(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    ir = json.loads(meta[cache._META_IR])
    next(n for n in ir["nodes"] if n[1] and n[1].startswith("aten::"))[1] = "aten::no_such_op.default"
    meta[cache._META_IR] = json.dumps(ir)
    save_file(tensors, str(path), metadata=meta)
    path.with_name(path.name + ".sha256").write_text(f"{file_digest(path)} {path.stat().st_size}\n")


@pytest.mark.parametrize("damage, message", [(_flip_bytes, "does not match its recorded checksum"),
                                             (_truncate, "does not match its recorded checksum"),
                                             (_bad_json, "cannot be used .*JSONDecodeError"),
                                             (_wrong_operator, "cannot be used .*no_such_op")])
def test_a_damaged_entry_is_found_reported_and_rebuilt(cache_folder, damage, message, monkeypatch):
    cold = compile_net(Net())
    (entry,) = entries(cache_folder)
    damage(entry)
    with pytest.warns(RuntimeWarning, match=message):
        rebuilt = compile_net(Net())
    assert str(rebuilt.program().graph) == str(cold.program().graph)
    assert entries(cache_folder) == [entry]
    monkeypatch.setattr(pockengine.trainer, "capture", lambda *a: pytest.fail("captured although cached"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert str(compile_net(Net()).program().graph) == str(cold.program().graph)  # the rebuilt entry is good


def test_an_entry_under_another_key_is_not_used(cache_folder):
    compile_net(Net())
    (entry,) = entries(cache_folder)
    other = cache.entry_path(key(b=batch(n=2)))
    entry.rename(other)
    entry.with_name(entry.name + ".sha256").rename(other.with_name(other.name + ".sha256"))
    with pytest.warns(RuntimeWarning, match="cannot be used .*records the key"):
        trainer = compile_net(Net(), batch(n=2))
    assert trainer.step(batch(n=2)) > 0


def test_the_option_and_the_environment_turn_it_off(cache_folder, monkeypatch):
    compile_net(Net(), capture_cache=False)
    assert entries(cache_folder) == []
    monkeypatch.setenv("POCKENGINE_CAPTURE_CACHE", "0")
    assert pe.Options().capture_cache is False
    compile_net(Net())
    assert entries(cache_folder) == []
    assert compile_net(Net(), capture_cache=True).options.capture_cache  # the option wins over the environment
    assert len(entries(cache_folder)) == 1
    with pytest.raises(pe.UserInputError, match="capture_cache must be True or False"):
        compile_net(Net(), capture_cache="yes")


def test_the_size_limit_removes_the_least_recently_used(cache_folder, monkeypatch):
    model, loss = Net(), pe.losses.cross_entropy()
    shapes = [batch(n=n) for n in (1, 2, 3)]
    for i, b in enumerate(shapes):
        cache.cached_capture(model, loss, b, lambda b=b: real_capture(model, loss, b))
        path = cache.entry_path(key(model, loss, b))
        os.utime(path, (1000 + i, 1000 + i))
    size = max(p.stat().st_size for p in entries(cache_folder))
    os.utime(cache.entry_path(key(model, loss, shapes[0])), (2000, 2000))  # read recently: kept
    monkeypatch.setattr(cache, "SIZE_LIMIT", int(size * 3.5))  # room for three of the four
    b = batch(n=5)
    cache.cached_capture(model, loss, b, lambda: real_capture(model, loss, b))
    kept = {p.name for p in entries(cache_folder)}
    assert kept == {cache.entry_path(key(model, loss, s)).name for s in (shapes[0], shapes[2], b)}
    assert not cache.entry_path(key(model, loss, shapes[1])).with_name(
        cache.entry_path(key(model, loss, shapes[1])).name + ".sha256").exists()


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class WithFunction(Net):
    def forward(self, x):
        return Reverse.apply(super().forward(x))


def test_a_capture_with_a_custom_function_is_not_cached(cache_folder):
    trainer = compile_net(WithFunction())
    assert entries(cache_folder) == []
    grads = trainer.gradients(batch())
    reference = autograd_gradients(WithFunction(), batch())
    for name, g in grads.items():
        assert relative_error(g, reference[name]) <= 1e-4, name


def test_a_capture_with_branches_decided_on_the_example_is_not_cached(cache_folder):
    """Branches on values are decided as the example batch decides them (capture/value_branches.py); the key holds
    the batch's shapes, not its values, so another example batch of the same shapes must be captured anew."""
    from test_capture import _square_mean, _ValueBranches

    x = torch.randn(2, 4)
    padded, unpadded = torch.tensor([[3, 0], [4, 5]]), torch.tensor([[3, 1], [4, 5]])
    pe.compile(_ValueBranches(), _square_mean, ((x, padded), None))
    assert entries(cache_folder) == []
    model = _ValueBranches()
    trainer = pe.compile(model, _square_mean, ((x, unpadded), None))  # row 0 not doubled: the other branch
    assert trainer.loss(((x, unpadded), None)) == pytest.approx((model.layer(x) ** 2).mean().item(), rel=1e-6)


def test_a_model_holding_an_object_that_cannot_be_described_is_not_cached(cache_folder):
    model = Net()
    model.generator = torch.Generator()  # described only by an address: another key in every process
    assert key(model) is None
    compile_net(model)
    assert entries(cache_folder) == []


def test_a_new_process_reads_the_entry_without_importing_the_tracer(tmp_path):
    script = textwrap.dedent("""
        import hashlib, json, sys
        import torch
        import pockengine as pe
        sys.path.insert(0, %r)
        from test_compile_cache import Net, batch
        trainer = pe.compile(Net(), pe.losses.cross_entropy(), batch())
        print(json.dumps({"tracer": "torch.export._trace" in sys.modules, "loss": trainer.step(batch()),
                          "listing": hashlib.sha256(str(trainer.program().graph).encode()).hexdigest()}))
    """) % str(Path(__file__).parent)
    env = {**os.environ, "POCKENGINE_CACHE": str(tmp_path), "POCKENGINE_CAPTURE_CACHE": "1",
           "PYTHONPATH": str(REPO)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0]["tracer"] and not runs[1]["tracer"]
    assert runs[0]["listing"] == runs[1]["listing"] and runs[0]["loss"] == runs[1]["loss"]


def test_a_hugging_face_model_has_the_same_key_in_every_process():
    """transformers' classes reach much of the library and Python's state (threads, registries): none of what
    differs between processes may enter the key, or a new process would never find its entry."""
    script = textwrap.dedent("""
        import torch, transformers
        import pockengine as pe
        from pockengine.capture import cache
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, num_labels=2)
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, 64, (2, 8))
        print(cache.capture_key(model, pe.losses.cross_entropy(), ({"input_ids": ids}, torch.tensor([0, 1]))))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    keys = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           check=True).stdout.split()[-1] for _ in range(2)]
    assert keys[0] == keys[1] and len(keys[0]) == 64
