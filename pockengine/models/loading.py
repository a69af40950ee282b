"""The models `pockengine finetune --model` loads, and how the fine-tuned one is saved for its own library.

`--model` is a built-in name (`mobilenet_v2`, `minilm`, `smollm2`), a local Hugging Face folder (with its
`config.json`; the head, `AutoModelFor...`, follows from the data: image or sequence classification, or causal
language modelling), or `module:function`, a function of an importable module that returns a `torch.nn.Module`.
A Hugging Face model is saved with `save_pretrained` (config, safetensors, tokenizer or image processor), so
`AutoModelFor....from_pretrained(folder)` loads it; a torch module as a safetensors state dict.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pockengine.data.sources import CHAT, IMAGE, TEXT
from pockengine.errors import UserInputError
from pockengine.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD
from pockengine.storage import flush_folder, fsync_dir, save_safetensors, temp_name

__all__ = ["BUILTIN_MODELS", "ModelSource", "LoadedModel", "model_source", "load_model", "save_model"]

BUILTIN_MODELS = {"mobilenet_v2": IMAGE, "minilm": TEXT, "smollm2": CHAT}
_HEADS = {IMAGE: "AutoModelForImageClassification", TEXT: "AutoModelForSequenceClassification",
          CHAT: "AutoModelForCausalLM"}
MOBILENET_IMAGE_SIZE = 64  # fast on a CPU; ImageNet's 224 works too (--image-size 224)
TORCH_WEIGHTS = "model.safetensors"
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"


@dataclass(frozen=True)
class ModelSource:
    """What `--model` names, checked, before anything heavy is loaded."""

    spec: str
    kind: str  # "builtin", "huggingface" or "function"
    config: Any = None  # the Hugging Face config of a folder
    function: Callable[[], nn.Module] | None = None

    @property
    def name(self) -> str:
        return Path(self.spec).name if self.kind == "huggingface" else self.spec.replace(":", ".")

    def fixed_classes(self) -> list[str] | None:
        """The class names of a folder that already is a fine-tuned classifier (its own `id2label`), else None:
        the head is then made anew for the data's classes."""
        if self.kind != "huggingface" or not any(a.endswith(("ForSequenceClassification", "ForImageClassification"))
                                                 for a in self.config.architectures or []):
            return None
        names = [self.config.id2label[i] for i in sorted(self.config.id2label)]
        return None if names == [f"LABEL_{i}" for i in range(len(names))] else names

    def image_settings(self) -> tuple[tuple[int, int] | None, tuple[float, ...], tuple[float, ...], int]:
        """(input size or None for the data's own, normalisation mean, std, channels) of an image model."""
        if self.kind == "builtin":
            return (MOBILENET_IMAGE_SIZE,) * 2, IMAGENET_MEAN, IMAGENET_STD, 3
        if self.kind == "function":
            return None, IMAGENET_MEAN, IMAGENET_STD, 3
        channels = int(getattr(self.config, "num_channels", 3))
        size = getattr(self.config, "image_size", None)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        processor = _image_processor(self.spec)
        if processor is not None:
            mean = tuple(getattr(processor, "image_mean", None) or mean)
            std = tuple(getattr(processor, "image_std", None) or std)
        if isinstance(size, (list, tuple)):
            size = tuple(size)
        elif size is not None:
            size = (int(size), int(size))
        if len(mean) != channels:
            mean, std = (mean[0],) * channels, (std[0],) * channels
        return size, tuple(mean), tuple(std), channels

    def image_resizer(self) -> Callable[[Any], np.ndarray] | None:
        """A Hugging Face folder's image processor's own resizing and cropping (its resample filter, shortest-edge
        size, centre crop), as a function of an RGB PIL image to (height, width, 3) uint8 pixels: the images are
        trained on as the processor saved beside the model will give them to it later. None without one."""
        processor = _image_processor(self.spec) if self.kind == "huggingface" else None
        if processor is None or int(getattr(self.config, "num_channels", 3)) != 3:
            return None

        def resize(image: Any) -> np.ndarray:
            pixels = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
            return np.asarray(pixels).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)

        return resize


@dataclass
class LoadedModel:
    model: nn.Module
    library: str  # "transformers" or "torch": who loads the saved model
    keyword_inputs: bool  # Hugging Face models take their inputs by name
    tokenizer: Any = None
    processor: Any = None  # a Hugging Face image processor, saved with the model


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; nothing is downloaded
    try:
        import transformers
    except ImportError as e:
        raise UserInputError("Hugging Face models need transformers: pip install transformers") from e
    transformers.logging.set_verbosity_error()  # "newly initialized head" is what fine-tuning asks for
    transformers.logging.disable_progress_bar()  # bars for loading and writing a few files, beside the run's own
    return transformers


def _image_processor(folder: str) -> Any:
    if not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    return _transformers().AutoImageProcessor.from_pretrained(folder)


def model_source(spec: str) -> ModelSource:
    """Check `--model spec` and say what it is; an unknown name is a `UserInputError` listing what is accepted."""
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, "builtin")
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"--model {spec}: the folder has no config.json; a Hugging Face model folder is "
                                 "what save_pretrained writes (config.json and the weights)")
        try:
            config = _transformers().AutoConfig.from_pretrained(spec)
        except (ValueError, OSError) as e:
            raise UserInputError(f"--model {spec}: {path / 'config.json'} cannot be read by transformers: {e}") from e
        return ModelSource(spec, "huggingface", config=config)
    module_name, colon, function_name = spec.partition(":")
    if colon and module_name and function_name.isidentifier():
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module beside the user, as `python -c "import m"` finds it
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserInputError(f"--model {spec}: cannot import the module {module_name!r} ({e}); run from the "
                                 "folder holding it or put it on PYTHONPATH") from e
        function = getattr(module, function_name, None)
        if not callable(function):
            raise UserInputError(f"--model {spec}: the module {module_name!r} has no function {function_name!r}")
        return ModelSource(spec, "function", function=function)
    raise UserInputError(f"--model {spec}: unknown model name; give a built-in ({', '.join(BUILTIN_MODELS)}), a "
                         "local Hugging Face folder (with config.json), or module:function returning a "
                         "torch.nn.Module")


def load_model(source: ModelSource, kind: str, classes: list[str] | None, seed: int) -> LoadedModel:
    """A fresh copy of the pretrained model for `kind` of data with a head for `classes` (a classifier), in
    training mode. A new head is initialised from `seed`, so two calls give identical models."""
    if source.kind == "builtin" and BUILTIN_MODELS[source.spec] != kind:
        raise UserInputError(f"--model {source.spec} is made for {BUILTIN_MODELS[source.spec]}, but the data is for "
                             f"{kind}")
    if source.kind == "function" and kind != IMAGE:
        raise UserInputError(f"--model {source.spec}: a module:function model takes image tensors; for {kind} give "
                             "a Hugging Face folder (its tokenizer turns the texts into inputs)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = _load(source, kind, classes)
    loaded.model.train()
    return loaded


def _load(source: ModelSource, kind: str, classes: list[str] | None) -> LoadedModel:
    if source.kind == "function":
        model = source.function()
        if not isinstance(model, nn.Module):
            raise UserInputError(f"--model {source.spec} returned {type(model).__name__}, not a torch.nn.Module")
        return LoadedModel(model, "torch", keyword_inputs=False)
    if source.spec == "mobilenet_v2":
        from pockengine.models.mobilenet_v2 import mobilenet_v2

        return LoadedModel(mobilenet_v2(pretrained=True, num_classes=len(classes)), "torch", keyword_inputs=False)
    if source.spec in ("minilm", "smollm2"):
        _transformers()  # quiet as for a folder: its load report calls the head fine-tuning adds "MISSING"
    if source.spec == "minilm":
        from pockengine.models.text import minilm_classifier

        model, tokenizer = minilm_classifier(len(classes))
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {name: i for i, name in enumerate(classes)}
        return LoadedModel(model, "transformers", keyword_inputs=True, tokenizer=tokenizer)
    if source.spec == "smollm2":
        from pockengine.models.text import smollm2

        model, tokenizer = smollm2()
        return LoadedModel(model, "transformers", keyword_inputs=True, tokenizer=tokenizer)
    transformers = _transformers()
    head = getattr(transformers, _HEADS[kind])
    extra: dict[str, Any] = {}
    if classes is not None and classes != source.fixed_classes():
        extra = {"id2label": dict(enumerate(classes)), "label2id": {name: i for i, name in enumerate(classes)},
                 "ignore_mismatched_sizes": True}  # a new head for the data's classes
    try:
        model = head.from_pretrained(source.spec, **extra)
    except ValueError as e:  # the config has no model for this head
        raise UserInputError(f"--model {source.spec}: {type(source.config).__name__} has no {_HEADS[kind]} for "
                             f"{kind} ({e})") from e
    except OSError as e:
        raise UserInputError(f"--model {source.spec}: the weights cannot be loaded ({e})") from e
    tokenizer = None
    if kind != IMAGE:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.spec)
        except (OSError, ValueError, TypeError) as e:
            raise UserInputError(f"--model {source.spec}: no usable tokenizer in the folder ({e}); save the "
                                 "tokenizer beside the model (tokenizer.save_pretrained(folder))") from e
        if tokenizer.pad_token is None:  # decoder-only tokenizers: pad with the end-of-sequence token
            if tokenizer.eos_token is None:
                raise UserInputError(f"--model {source.spec}: the tokenizer has neither a padding nor an "
                                     "end-of-sequence token to pad the examples with")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # a decoder's classifier reads the last token before the padding
            model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, "transformers", keyword_inputs=True, tokenizer=tokenizer,
                       processor=_image_processor(source.spec) if kind == IMAGE else None)


def save_model(loaded: LoadedModel, folder: Path, classes: list[str] | None,
               preprocessing: dict[str, Any] | None = None) -> None:
    """Write the model so its own library loads it, replacing `folder` only once the new one is complete.
    `preprocessing` (how images were turned into inputs) is written beside a model that has no image processor."""
    model = loaded.model
    tmp = temp_name(folder)
    tmp.mkdir(parents=True)
    try:
        for p in model.parameters():  # the trainer may have made 4-d weights channels-last; files want contiguous
            p.data = p.data.contiguous()
        if loaded.library == "transformers":
            model.save_pretrained(tmp)
            for extra in (loaded.tokenizer, loaded.processor):
                if extra is not None:
                    extra.save_pretrained(tmp)
        else:
            tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
            save_safetensors(tensors, tmp / TORCH_WEIGHTS)
            if classes is not None:
                (tmp / CLASSES_FILE).write_text(json.dumps(classes, indent=1))
        if preprocessing is not None and loaded.processor is None:
            (tmp / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=1))
        flush_folder(tmp)  # the library's writers do not flush: a crash after the rename must not leave empty files
        previous = temp_name(folder, ".previous") if folder.exists() else None
        if previous is not None:
            os.rename(folder, previous)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
