"""`pockengine finetune`: fine-tune a person's own model on their own data, in a run folder that survives a crash.

    RUN/
      run.json          the configuration, the data's classes and sizes, the metric before training
      metrics.jsonl     one record per step (loss, step time) and per evaluation (the held-out metric)
      checkpoint/       the trainer's latest checkpoint (`Trainer.save`: atomic, checksummed)
      model/            the fine-tuned model for its own library: a `save_pretrained` folder (Hugging Face) or
                        model.safetensors (+ classes.json) for a torch module
      summary.json      the metric before and after, step time, peak memory, what was trained
      plots/            loss.png and metric.png (`pockengine report RUN` redraws them)

A run is a function of its configuration: batches come from a seeded order (`Batches.at(step)`), so a run resumed
from its last checkpoint (`--resume`) computes exactly the steps the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import pockengine as pe
from pockengine.data.sources import (CHAT, IMAGE, ChatData, Data, ImageData, TextData, append_data, assign_labels,
                                     data_kind, load_data, note)
from pockengine.errors import UserInputError
from pockengine.models.loading import LoadedModel, ModelSource, load_model, model_source, save_model
from pockengine.scheme import Scheme
from pockengine.search import choose_scheme as choose_search
from pockengine.search.search import mb
from pockengine.search.task import Batch, Task
from pockengine.storage import atomic_path, cache_dir

__all__ = ["FinetuneConfig", "FinetuneRun", "prepare", "scheme_for", "finetune", "resume_config", "draw_plots", "compare_summaries",
           "parse_milliseconds", "Batches"]

PRESETS = {"full": Scheme.full, "bias_only": Scheme.bias_only, "head": Scheme.head}
DEFAULT_SEQ_LEN = 128
DEFAULT_STEPS = 100
EVAL_BATCH = 64
RUN_FILE, METRICS_FILE, SUMMARY_FILE = "run.json", "metrics.jsonl", "summary.json"
CHECKPOINT_DIR, MODEL_DIR, PLOTS_DIR, SEARCH_DIR = "checkpoint", "model", "plots", "search"
# What a resumed run may change: how long it goes on and how often it reports; everything else is the run itself.
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every", "checkpoint_every", "threads")

# Called with the step number after each step (its checkpoint, if any, written); the resume test stops a run here.
after_step: Callable[[int], None] = lambda step: None


@dataclass
class FinetuneConfig:
    """Every setting of a run; `pockengine finetune`'s flags and YAML keys are these names (with - for _)."""

    model: str
    data: str
    out: str
    scheme: str = "full"
    memory_budget: int | None = None  # bytes, for the step peak the compiler plans
    time_budget: float | None = None  # milliseconds per step
    steps: int | None = None  # default: DEFAULT_STEPS when neither steps nor epochs is given
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    optimizer: str = "adamw"
    eval_every: int = 0  # 0: evaluate before and after only
    checkpoint_every: int = 50
    eval_fraction: float = 0.1  # the validation split: the analysis, the search and --eval-every read it
    test_fraction: float = 0.0  # a test split, read only for the summary's test metric (never for a choice)
    test_data: str | None = None  # or a test set of its own (as --data; `mnist-test`), instead of test_fraction
    seq_len: int | None = None  # default: the longest example, at most 128 tokens
    image_size: int | None = None  # default: the model's (64 for mobilenet_v2; the images' own for module:function)
    seed: int = 0
    max_examples: int | None = None  # use a seeded subset of the data (before the split)
    max_eval_examples: int | None = None
    threads: int = 0
    text_column: str = "text"  # of a CSV/TSV/JSONL text data set
    label_column: str = "label"
    quick: bool = False  # --scheme auto: the analysis's quick mode (docs/search.md)

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise UserInputError("give --steps or --epochs, not both")
        if not 0 <= self.eval_fraction < 1:
            raise UserInputError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.test_data is not None and self.test_fraction:
            raise UserInputError("give --test-data or --test-fraction, not both")
        if not 0 <= self.test_fraction < 1 or self.eval_fraction + self.test_fraction >= 1:
            raise UserInputError(f"--test-fraction must be in [0, 1) and leave training examples beside "
                                 f"--eval-fraction {self.eval_fraction}, got {self.test_fraction}")
        if self.scheme == "auto" and self.memory_budget is None and self.time_budget is None:
            raise UserInputError("--scheme auto searches under a budget: give --memory-budget (such as 4MB), "
                                 "--time-budget (ms per step), or both")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserInputError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(f"unknown setting(s) {unknown}; the settings are {sorted(names)}")
        return cls(**values)


# -- budgets --------------------------------------------------------------------------------------------------
def parse_milliseconds(text: str) -> float:
    """'30', '30ms', '0.5s' -> milliseconds per step."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|)\s*", str(text))
    if not match:
        raise UserInputError(f"time budget {text!r}: write milliseconds per step, such as 30 or 30ms")
    value = float(match.group(1)) * (1000 if match.group(2) == "s" else 1)
    if value <= 0:
        raise UserInputError(f"time budget {text!r} must be above zero")
    return value


# -- the task -------------------------------------------------------------------------------------------------
class Batches:
    """Training batches in a seeded order: epoch e shuffles the examples with seed (seed, e) and cuts them into
    `per_epoch` full batches (the last, smaller one is left out: one compiled shape). `at(step)` is the batch of
    any step, so a resumed run reads the same batches as the uninterrupted one."""

    def __init__(self, n: int, batch_size: int, make: Callable[[torch.Tensor], Batch], seed: int) -> None:
        self.n, self.batch_size, self.make, self.seed = n, batch_size, make, seed
        self.per_epoch = n // batch_size
        self._order: tuple[int, torch.Tensor] | None = None

    def at(self, step: int, seed: int | None = None) -> Batch:
        seed = self.seed if seed is None else seed
        epoch, i = divmod(step, self.per_epoch)
        key = seed * 1_000_003 + epoch
        if self._order is None or self._order[0] != key:
            self._order = (key, torch.randperm(self.n, generator=torch.Generator().manual_seed(key)))
        return self.make(self._order[1][i * self.batch_size:(i + 1) * self.batch_size])

    def endless(self, seed: int) -> Iterator[Batch]:
        step = 0
        while True:
            yield self.at(step, seed)
            step += 1


@dataclass
class FinetuneRun:
    """A model and data made ready: the `Task` the trainer (and the scheme search) runs, and what saving needs."""

    task: Task
    loaded: LoadedModel  # the model this run trains (task.build_model makes fresh copies)
    source: ModelSource
    batches: Batches
    kind: str
    classes: list[str] | None
    n_train: int
    n_eval: int
    shape: dict[str, int] = field(default_factory=dict)  # seq_len or image size, as resolved
    preprocessing: dict[str, Any] | None = None  # how an image becomes an input, saved beside the model
    evaluate_test: Callable[[Any], float] | None = None  # task.evaluate's metric on the test split
    n_test: int = 0


def _split(n: int, config: FinetuneConfig, n_test_data: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training, validation, test) example indices. The last `n_test_data` examples are --test-data's: they are the
    test split, the others are split as without them. Otherwise one seeded order: the test split first, then the
    validation split (the same examples as without a test split when --test-fraction is 0), the rest for training."""
    n -= n_test_data
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    if config.max_examples is not None:
        order = order[:config.max_examples]

    def share(fraction: float) -> int:
        return min(len(order) - 1, max(1, round(len(order) * fraction))) if fraction else 0

    n_test = share(config.test_fraction)
    n_eval = min(share(config.eval_fraction), len(order) - 1 - n_test)
    test, held_out, train = order[:n_test], order[n_test:n_test + n_eval], order[n_test + n_eval:]
    if n_test_data:
        test = torch.arange(n, n + n_test_data)
    if config.max_eval_examples is not None:
        held_out = held_out[:config.max_eval_examples]
    if len(train) < config.batch_size:
        raise UserInputError(f"--data {config.data}: {len(train)} training examples after holding out "
                             f"{n_eval + n_test}, fewer than --batch-size {config.batch_size}; lower --batch-size, "
                             "--eval-fraction or --test-fraction, or add examples")
    return train, held_out, test


def _forward(model: torch.nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


_logits = pe.losses.logits


def _evaluation(make: Callable[[torch.Tensor], Batch], held_out: torch.Tensor, kind: str) -> Callable[[Any], float]:
    """The held-out metric: accuracy for classification, minus the mean loss per reply token for a language model
    (higher is better either way)."""

    def evaluate(model: torch.nn.Module) -> float:
        if len(held_out) == 0:
            return float("nan")
        modes = {m: m.training for m in model.modules()}  # frozen BatchNorm layers stay in eval mode afterwards
        model.eval()
        right = total = 0
        loss_sum = 0.0
        with torch.no_grad():
            for start in range(0, len(held_out), EVAL_BATCH):
                inputs, target = make(held_out[start:start + EVAL_BATCH])
                logits = _logits(_forward(model, inputs))
                if kind == CHAT:
                    loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(),
                                                ignore_index=-100, reduction="sum").item()
                    total += int((target[:, 1:] != -100).sum())
                else:
                    right += int((logits.argmax(-1) == target).sum())
                    total += len(target)
        for m, training in modes.items():
            m.train(training)
        return -loss_sum / max(total, 1) if kind == CHAT else right / total

    return evaluate


def _image_batches(data: ImageData, loaded: LoadedModel, mean: tuple, std: tuple) -> Callable[[torch.Tensor], Batch]:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    labels = data.labels

    def make(idx: torch.Tensor) -> Batch:
        x = data.images[idx].float().div_(255)
        if x.shape[-2:] != data.size:
            x = F.interpolate(x, size=data.size, mode="bilinear", align_corners=False)
        x = (x - mean_t) / std_t
        return ({"pixel_values": x} if loaded.keyword_inputs else (x,)), labels[idx]

    return make


def _grey(data: ImageData) -> ImageData:
    """`data` as one-channel images: Pillow's convert("L") of the RGB pixels (ITU-R 601-2 luma, the same integer
    rounding), so a grey image read as RGB comes back unchanged."""
    r, g, b = data.images.to(torch.int64).unbind(1)
    grey = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)
    return dataclasses.replace(data, images=grey)


def _probe_function_model(loaded: LoadedModel, data: ImageData, mean: tuple, std: tuple,
                          spec: str) -> tuple[int, ImageData, tuple, tuple]:
    """(the number of outputs, the data, mean, std) a `module:function` model takes: RGB images, or grey ones where
    it takes one channel only (an MNIST-style network), found by running one image through it each way."""
    model = loaded.model
    model.eval()
    failures = []
    try:
        for candidate, m, s in ((data, mean, std), (_grey(data), mean[:1], std[:1])):
            inputs = _image_batches(candidate, loaded, m, s)(torch.arange(1))[0]
            try:
                with torch.no_grad():
                    output = _logits(_forward(model, inputs))
            except Exception as e:  # the user's model refusing this input: the other one may suit it
                failures.append(f"{tuple(inputs[0].shape)}: {type(e).__name__}: {e}")
                continue
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise UserInputError(f"--model {spec} returns {what} for a batch of one image; a classifier returns "
                                     "its logits, a (batch, classes) tensor (or a dict or object with 'logits')")
            return output.shape[-1], candidate, m, s
    finally:
        model.train()
    raise UserInputError(f"--model {spec} fails on one image of the data, given as RGB and as grey ("
                         + "; ".join(failures) + "); a module:function model takes (batch, 3 or 1, height, width) "
                         "images: if it needs a size, give --image-size")


def _token_limit(loaded: LoadedModel, config: FinetuneConfig, longest: int) -> int:
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 10 ** 9
    if config.seq_len is not None:
        if config.seq_len > limit:
            raise UserInputError(f"--seq-len {config.seq_len} is longer than the model's {limit} positions")
        return config.seq_len
    return min(limit, DEFAULT_SEQ_LEN, max(8, -(-longest // 8) * 8))


def _text_batches(data: TextData, loaded: LoadedModel, config: FinetuneConfig, shape: dict) -> Callable:
    from pockengine.data.text import tokenize_batch

    lengths = [len(ids) for ids in loaded.tokenizer(data.texts, truncation=False)["input_ids"]]
    seq_len = shape["seq_len"] = _token_limit(loaded, config, max(lengths))
    long = [i for i, n in enumerate(lengths) if n > seq_len]
    if long:
        note(f"{len(long)} of {len(lengths)} texts are longer than {seq_len} tokens (the first: {data.where[long[0]]},"
              f" {lengths[long[0]]} tokens) and are truncated to {seq_len}; --seq-len sets the length")
    encoded = tokenize_batch(loaded.tokenizer, data.texts, seq_len)
    labels = data.labels

    def make(idx: torch.Tensor) -> Batch:
        return {k: v[idx] for k, v in encoded.items()}, labels[idx]

    return make


def _chat_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt tokens, reply tokens): the chat template where the tokenizer has one, else the turns joined by
    newlines and the reply ended by the end-of-sequence token."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        if full.startswith(prompt):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return prompt_ids, tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    prompt = "\n".join(m["content"] for m in conversation[:-1]) + "\n"
    reply = tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], reply + eos


def _chat_batches(data: ChatData, loaded: LoadedModel, config: FinetuneConfig, shape: dict) -> Callable:
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserInputError(f"--model {config.model}: the tokenizer has neither a padding nor an end-of-sequence "
                             "token to pad the examples with")
    pairs = [_chat_ids(tokenizer, c) for c in data.conversations]
    seq_len = shape["seq_len"] = _token_limit(loaded, config, max(len(p) + len(r) for p, r in pairs))
    ids = torch.full((len(pairs), seq_len), pad, dtype=torch.int64)
    mask = torch.zeros((len(pairs), seq_len), dtype=torch.int64)
    labels = torch.full((len(pairs), seq_len), -100, dtype=torch.int64)
    long = []
    for i, (prompt, reply) in enumerate(pairs):
        if len(prompt) + len(reply) > seq_len:
            long.append(i)
            prompt = prompt[-(seq_len // 2):] if len(prompt) > seq_len // 2 else prompt  # keep part of the reply
            reply = reply[:seq_len - len(prompt)]
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(reply)
    if long:
        note(f"{len(long)} of {len(pairs)} conversations are longer than {seq_len} tokens (the first: "
              f"{data.where[long[0]]}); their prompt keeps its last tokens and their reply its first, to "
              f"{seq_len} in all; --seq-len sets the length")

    def make(idx: torch.Tensor) -> Batch:
        return {"input_ids": ids[idx], "attention_mask": mask[idx]}, labels[idx]

    return make


def prepare(config: FinetuneConfig) -> FinetuneRun:
    """Load the data and the model of `config` and make the `Task` (bad data is refused here, by file and line)."""
    source = model_source(config.model)
    kind = data_kind(config.data)
    image_size: tuple[int, int] | None = None
    if kind == IMAGE:
        size, mean, std, channels = source.image_settings()
        image_size = (config.image_size,) * 2 if config.image_size else size
        resize = None if config.image_size else source.image_resizer()
        if config.image_size and source.image_resizer() is not None:
            note(f"--image-size {config.image_size}: the images are resized to it, not by the image processor of "
                 f"{config.model}, which is saved beside the model unchanged: set its size before using it")
        data: Data = load_data(config.data, image_size, channels, resize=resize)
    else:
        data = load_data(config.data, columns=(config.text_column, config.label_column))
    n_test_data = 0
    if config.test_data is not None:
        if data_kind(config.test_data) != kind:
            raise UserInputError(f"--test-data {config.test_data} holds {data_kind(config.test_data)} examples, "
                                 f"--data {config.data} {kind} ones; give a test set of the same kind")
        # resized to the training images' size: a module:function model takes the size its data came in
        extra = (load_data(config.test_data, data.size, channels, test=True, resize=resize) if kind == IMAGE
                 else load_data(config.test_data, columns=(config.text_column, config.label_column), test=True))
        n_test_data = len(extra.where)
        data = append_data(data, extra, f"--test-data {config.test_data}")
    classes = None
    if kind != CHAT:
        fixed = source.fixed_classes()
        if fixed is not None:  # otherwise the data's own classes, as its loader assigned them
            assign_labels(data, fixed)
        classes = data.classes
    loaded = load_model(source, kind, classes, config.seed)
    shape: dict[str, int] = {}
    if kind == IMAGE:
        if source.kind == "function":  # the head's size, and whether it takes grey images, show in an output only
            outputs, data, mean, std = _probe_function_model(loaded, data, mean, std, config.model)
            channels = len(mean)
            assign_labels(data, None, outputs)
            classes = data.classes
        make = _image_batches(data, loaded, mean, std)
        shape["image_height"], shape["image_width"] = data.size
        preprocessing = {"size": list(data.size), "channels": channels, "mean": list(mean), "std": list(std),
                         "how": "RGB (or grey for 1 channel) pixels resized bilinearly to size (height, width), "
                                "divided by 255, then (x - mean) / std per channel; layout (N, C, H, W)"}
    elif kind == CHAT:
        make = _chat_batches(data, loaded, config, shape)
    else:
        make = _text_batches(data, loaded, config, shape)
    n = len(data.where)
    train, held_out, test = _split(n, config, n_test_data)
    batches = Batches(len(train), config.batch_size, lambda idx: make(train[idx]), config.seed)
    loss_fn = pe.losses.causal_lm() if kind == CHAT else pe.losses.cross_entropy()
    task = Task(
        name=f"{source.name} on {Path(config.data).name}",
        build_model=lambda: load_model(source, kind, classes, config.seed).model,
        loss_fn=loss_fn,
        example_batch=batches.at(0),
        train_batches=batches.endless,
        evaluate=_evaluation(make, held_out, kind),
        metric="-loss" if kind == CHAT else "accuracy",
        data_key=hashlib.sha256(json.dumps([train.tolist(), held_out.tolist()]).encode()).hexdigest()[:32],
    )
    return FinetuneRun(task, loaded, source, batches, kind, classes, len(train), len(held_out), shape,
                       preprocessing if kind == IMAGE else None, _evaluation(make, test, kind), len(test))


def scheme_for(config: FinetuneConfig, task: Task, steps: int) -> tuple[Scheme, float]:
    """The scheme `--scheme` names and the learning rate to train it with: a preset (full, bias_only, head, last:K)
    or a scheme file at `--lr`; or `auto`: the contribution analysis of `task` (cached in the pockengine cache, so a
    second run on the same model and data skips it) and the search under the budgets, at the learning rate tuned
    for the chosen scheme over the run's `steps` on the validation split, around the rate the analysis found for
    its kind. The search report goes to the run folder's search/."""
    if config.scheme != "auto":
        return parse_scheme(config.scheme), config.lr
    scheme, report = choose_search(task, memory_budget=config.memory_budget, time_budget_ms=config.time_budget,
                                   cache_dir=cache_dir() / "analysis", quick=config.quick, seed=config.seed,
                                   out_dir=Path(config.out) / SEARCH_DIR, lr_steps=steps)
    return scheme, report.lr


def parse_scheme(spec: str) -> Scheme:
    """`full`, `bias_only`, `head`, `last:K`, or a .yaml/.json scheme file."""
    if spec in PRESETS:
        return PRESETS[spec]()
    if spec.startswith("last:"):
        k = spec.removeprefix("last:").strip()
        if not k.lstrip("+-").isdigit():
            raise UserInputError(f"--scheme {spec}: write last:K with an integer K, e.g. last:4")
        if int(k) < 1:
            raise UserInputError(f"--scheme {spec}: K is the number of last layers to train, at least 1 "
                                 "(last:1 trains the classifier only)")
        return Scheme.last(int(k))
    if Path(spec).suffix not in (".yaml", ".yml", ".json"):
        raise UserInputError(f"--scheme {spec!r} is neither a preset ({', '.join(PRESETS)}, last:K) nor a scheme "
                             "file (.yaml, .yml or .json)")
    return Scheme.from_file(spec)


# -- the run folder -------------------------------------------------------------------------------------------
def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path} cannot be read ({type(e).__name__}: {e}); is this a pockengine run "
                             "folder?") from e


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write: nothing after it was committed
            break
    return records


def _check_out(out: Path, resume: bool) -> None:
    if resume:
        if not (out / RUN_FILE).is_file():
            raise UserInputError(f"--resume: {out} holds no run ({RUN_FILE} is missing); start it without --resume")
        return
    if (out / RUN_FILE).exists():
        raise UserInputError(f"{out} already holds a run; continue it with --resume, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"--out {out} exists and is not an empty folder; choose a new folder")


def resume_config(out: str | Path, given: dict[str, Any]) -> FinetuneConfig:
    """The recorded configuration of the run in `out`, with the settings of `given` that a resumed run may change
    (RESUMABLE_CHANGES); another setting that differs from the recorded one is an error."""
    _check_out(Path(out), resume=True)
    recorded = _read_json(Path(out) / RUN_FILE)["config"]
    recorded["out"] = str(out)
    for key, value in given.items():
        if value is None or key in ("out",):
            continue
        if key in RESUMABLE_CHANGES:
            recorded[key] = value
            if key in ("steps", "epochs"):
                recorded["epochs" if key == "steps" else "steps"] = None
        elif recorded.get(key) != value:
            raise UserInputError(f"--resume: the run in {out} was started with {key} = {recorded.get(key)!r}, not "
                                 f"{value!r}; a resumed run keeps its settings except {', '.join(RESUMABLE_CHANGES)}")
    return FinetuneConfig.from_dict(recorded)


def _total_steps(config: FinetuneConfig, per_epoch: int) -> int:
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * per_epoch))
    return config.steps if config.steps is not None else DEFAULT_STEPS


class _StopRequest:
    """The first Ctrl-C asks the run to stop after the step in progress (a step stopped half-way would leave some
    weights updated and others not) and save its checkpoint; a second one stops at once, keeping the last
    checkpoint written."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self.log = log
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.requested = True
        self.log("stopping after this step to save a checkpoint (Ctrl-C again to stop at once, keeping the last "
                 "checkpoint)")

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may handle signals
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def finetune(config: FinetuneConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or with `resume`, continue) the fine-tuning `config` describes; returns the summary (summary.json)."""
    from tqdm import tqdm

    out = Path(config.out)
    _check_out(out, resume)
    if config.scheme != "auto":
        parse_scheme(config.scheme)  # a wrong scheme is said before minutes go into loading and compiling
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    run = prepare(config)
    task = run.task
    total = _total_steps(config, run.batches.per_epoch)
    model = run.loaded.model
    checkpoint = out / CHECKPOINT_DIR
    if resume and checkpoint.exists():
        trainer = pe.load(checkpoint, model, task.loss_fn, task.example_batch)
        log(f"resuming {out} at step {trainer.steps_done} of {total}")
    else:
        scheme, lr = scheme_for(config, task, total)
        optimizer = pe.optim.AdamW(lr=lr) if config.optimizer == "adamw" else pe.optim.SGD(lr=lr, momentum=0.9)
        trainer = pe.compile(model, task.loss_fn, task.example_batch, optimizer, scheme, freeze_batchnorm=True,
                             seed=config.seed)
    planned = trainer.memory_plan().peak_bytes
    state = trainer.optimizer_state_bytes()
    if config.memory_budget is not None and planned + state > config.memory_budget:
        raise UserInputError(f"scheme {trainer.scheme.name!r} plans {mb(planned + state)} per step above the weights "
                             f"(step peak {mb(planned)} + optimizer state {mb(state)}), over --memory-budget "
                             f"{mb(config.memory_budget)}; train less (bias_only, last:K with a smaller K, a scheme "
                             "file, auto) or raise the budget")
    trained = sum(p.numel() if s.kind == "full" else p.numel() // p.shape[s.dim] * len(s.channels)
                  for name, p in model.named_parameters() if (s := trainer.trained.get(name)) is not None)
    n_params = sum(p.numel() for p in model.parameters())
    metric_name = "held-out loss" if run.kind == CHAT else "accuracy"
    show = (lambda v: f"{-v:.4f}") if run.kind == CHAT else (lambda v: f"{v:.4f}")
    log(f"{task.name}: {run.kind}, {run.n_train} training and {run.n_eval} held-out examples"
        + (f", {len(run.classes)} classes" if run.classes else "") + f"; {total} steps of {config.batch_size}; "
        f"scheme {trainer.scheme.name}: {trained:,} of {n_params:,} parameters ({100 * trained / n_params:.2f}%) "
        f"in {len(trainer.trained)} tensors; planned step peak {mb(planned)}; ready in "
        f"{time.perf_counter() - start:.1f} s")

    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_FILE).is_file():
        before = task.evaluate(model)
        _write_json(out / RUN_FILE, {"config": config.to_dict(), "task": run.kind, "metric": metric_name,
                                     "classes": run.classes, "n_train": run.n_train, "n_eval": run.n_eval,
                                     "n_test": run.n_test, "shape": run.shape, "before": before,
                                     "test_before": run.evaluate_test(model) if run.n_test else None})
        log(f"{metric_name} before: {show(before)}")
    recorded = _read_json(out / RUN_FILE)
    recorded["config"] = config.to_dict()  # a resumed run may go on longer than first asked
    _write_json(out / RUN_FILE, recorded)
    before = recorded["before"]
    sign = -1 if run.kind == CHAT else 1  # the summary shows losses, the metric is minus the loss
    # What happened after the last checkpoint is done again: its records go, and so does the final evaluation of a
    # finished run that goes on (it is made again at the new end).
    done = trainer.steps_done
    records = [r for r in _read_metrics(out / METRICS_FILE)
               if r["step"] < done or r["step"] == done and ("loss" in r or done == 0)]
    with atomic_path(out / METRICS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not records:
        records.append({"step": 0, "eval": before})
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps(records[-1]) + "\n")

    step_times: list[float] = []
    last_eval = next((r["eval"] for r in reversed(records) if "eval" in r), before)
    bar = tqdm(total=total, initial=trainer.steps_done, desc="fine-tuning", unit="step", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
    with _StopRequest(bar.write) as stop, open(out / METRICS_FILE, "a") as metrics:
        while trainer.steps_done < total:
            step = trainer.steps_done + 1
            batch = run.batches.at(step - 1)
            t = time.perf_counter()
            loss = trainer.step(batch)
            step_times.append(time.perf_counter() - t)
            record: dict[str, Any] = {"step": step, "loss": loss, "step_ms": step_times[-1] * 1000}
            if config.eval_every and step % config.eval_every == 0 and step < total:
                last_eval = record["eval"] = task.evaluate(model)
                bar.write(f"step {step}: loss {loss:.4f}, held-out {metric_name} {show(last_eval)}")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if step % config.checkpoint_every == 0 and step < total:
                trainer.save(checkpoint)
            after_step(step)
            if stop.requested:
                bar.close()
                trainer.save(checkpoint)
                log(f"stopped: the checkpoint at step {step} is saved in {checkpoint}; continue with "
                    f"`pockengine finetune --out {out} --resume`")
                raise KeyboardInterrupt
    bar.close()
    trainer.save(checkpoint)
    after = task.evaluate(model)
    test_after = run.evaluate_test(model) if run.n_test else None
    with open(out / METRICS_FILE, "a") as metrics:
        metrics.write(json.dumps({"step": trainer.steps_done, "eval": after}) + "\n")
    save_model(run.loaded, out / MODEL_DIR, run.classes, run.preprocessing)

    memory = trainer.memory_report()
    timed = step_times[1:] or step_times  # the first step pays for first-touch allocations
    median_ms = statistics.median(timed) * 1000 if timed else None
    summary = {
        "model": config.model, "data": config.data, "task": run.kind, "metric": metric_name,
        "before": sign * before, "after": sign * after,
        "steps": trainer.steps_done, "batch_size": config.batch_size, "n_train": run.n_train, "n_eval": run.n_eval,
        **({"n_test": run.n_test, "test_before": sign * recorded["test_before"], "test_after": sign * test_after}
           if run.n_test else {}), "lr": trainer.optimizer.lr,
        "scheme": trainer.scheme.name, "trained_parameters": trained, "parameters": n_params,
        "trained_tensors": len(trainer.trained), "step_ms_median": median_ms, "planned_step_peak_bytes": planned,
        "optimizer_state_bytes": state, "peak_rss_bytes": peak_rss_bytes(), "memory_budget_bytes": config.memory_budget,
        "time_budget_ms": config.time_budget, "saved_model": str(out / MODEL_DIR), "library": run.loaded.library,
        "memory_report": {name.strip(): value for name, value in memory.lines()},
    }
    _write_json(out / SUMMARY_FILE, summary)
    draw_plots(out)
    log(format_summary(summary))
    if config.time_budget is not None and median_ms is not None and median_ms > config.time_budget:
        log(f"note: the median step took {median_ms:.1f} ms, over --time-budget {config.time_budget:g} ms")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['metric']}: {summary['before']:.4f} before, {summary['after']:.4f} after {summary['steps']} steps "
        f"({summary['n_eval']} held-out examples)",
        *([f"test {summary['metric'].removeprefix('held-out ')}: {summary['test_before']:.4f} before, "
           f"{summary['test_after']:.4f} after ({summary['n_test']} test examples)"] if summary.get("n_test") else []),
        f"trained: scheme {summary['scheme']}, {summary['trained_parameters']:,} of {summary['parameters']:,} "
        f"parameters ({100 * summary['trained_parameters'] / summary['parameters']:.2f}%) in "
        f"{summary['trained_tensors']} tensors",
        "step time: " + (f"{summary['step_ms_median']:.1f} ms (median)" if summary["step_ms_median"] is not None
                         else "no step in this session"),
        f"memory: planned step peak {mb(summary['planned_step_peak_bytes'])} above the weights, optimizer state "
        f"{mb(summary.get('optimizer_state_bytes', 0))}, peak RSS "
        f"{mb(summary['peak_rss_bytes'])}",
        f"saved: {summary['saved_model']} (load it with {summary['library']})",
    ]
    if summary.get("memory_report"):  # runs before memory_report existed have none
        report = summary["memory_report"]
        width = max(map(len, report))
        lines.append("the process's memory at the end (trainer.memory_report()):")
        lines += [f"  {name:<{width}} " + ("not measured" if value is None else mb(value))
                  for name, value in report.items()]
    return "\n".join(lines)


def compare_summaries(runs: dict[str, dict[str, Any]]) -> str:
    """A table of finished runs side by side (`pockengine report RUN RUN ...`): the held-out metric, the step time and
    the step memory of each, and each figure divided by the first run's."""
    first = next(iter(runs.values()))
    step_memory = {name: s["planned_step_peak_bytes"] + s.get("optimizer_state_bytes", 0) for name, s in runs.items()}
    # The test split where every run has one (no choice read it); else the validation split.
    split = "test_" if all(s.get("n_test") for s in runs.values()) else ""
    metric = f"test {first['metric'].removeprefix('held-out ')}" if split else first["metric"]
    rows = ["| run | scheme | trained parameters | lr | " + f"{metric} before -> after | step ms (median) | "
            "step memory (planned peak + optimizer state) | peak RSS | time / first | step memory / first |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        time_ratio = (f"{s['step_ms_median'] / first['step_ms_median']:.2f}"
                      if s["step_ms_median"] and first["step_ms_median"] else "-")
        rows.append(f"| {name} | {s['scheme']} | {s['trained_parameters']:,} | "
                    + (f"{s['lr']:g}" if "lr" in s else "-")
                    + f" | {s[split + 'before']:.4f} -> {s[split + 'after']:.4f} | "
                    + (f"{s['step_ms_median']:.1f}" if s["step_ms_median"] else "-")
                    + f" | {mb(step_memory[name])} | {mb(s['peak_rss_bytes'])} | {time_ratio} | "
                    f"{step_memory[name] / step_memory[next(iter(runs))]:.2f} |")
    return "\n".join(rows)


def draw_plots(run_folder: str | Path) -> list[Path]:
    """Draw the run's loss and held-out metric over the steps (PNG, under RUN/plots/) from its metrics log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(run_folder)
    if not (folder / RUN_FILE).is_file():
        raise UserInputError(f"{folder} is not a pockengine run folder ({RUN_FILE} is missing)")
    info = _read_json(folder / RUN_FILE)
    records = _read_metrics(folder / METRICS_FILE)
    is_lm = info.get("task") == CHAT
    plots = folder / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    drawn = []
    series = [("loss", "training loss", [(r["step"], r["loss"]) for r in records if "loss" in r]),
              ("metric", f"held-out {info.get('metric', 'metric')}",
               [(r["step"], -r["eval"] if is_lm else r["eval"]) for r in records if "eval" in r])]
    for name, label, points in series:
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{Path(info['config']['model']).name} on {Path(info['config']['data']).name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(plots / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        drawn.append(plots / f"{name}.png")
    return drawn
