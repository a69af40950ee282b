"""`pockengine finetune` end to end through the CLI entry: tiny Hugging Face folders (built from configs), tiny image
folders and CSV files, a `module:function` model; the saved model loads with its own library and holds the trained
weights; a resumed run equals the uninterrupted one; `pockengine report` redraws the plots."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pockengine as pe
import pockengine.finetune as finetune_module
from pockengine.cli import main
from pockengine.data.sources import load_data
from pockengine.finetune import FinetuneConfig, format_summary, prepare

transformers = pytest.importorskip("transformers")

WORDS = "good bad great awful fine movie film plot actor boring fun the a is was".split()


def write_image_folder(root, size=16, per_class=8, classes=("cats", "dogs")):
    rng = np.random.default_rng(0)
    colors = [(200, 40, 40), (40, 40, 200), (40, 200, 40)]
    for c, color in zip(classes, colors):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def write_reviews_csv(path, n=24):
    rows = ["text,label"] + [f"{'good great fun' if i % 2 else 'bad awful boring'} movie {'the plot' * (i % 3)},"
                             f"{'pos' if i % 2 else 'neg'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A tiny BERT (with its tokenizer) and a tiny ViT, each a save_pretrained folder of a base model (no head)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = transformers.BertTokenizer(vocab=vocab)
    assert tokenizer("the movie")["input_ids"] == [2, vocab["the"], vocab["movie"], 3]
    tokenizer.save_pretrained(root / "bert")
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    return root


def changed_parameters(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) <= set(after)
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_finetune_a_vit_folder_on_an_image_folder(tmp_path, hf_folders):
    images = write_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(hf_folders / "vit"), "--data", str(images), "--scheme", "bias_only",
            "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0.25", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "image classification" and summary["steps"] == 4
    saved = transformers.AutoModelForImageClassification.from_pretrained(out / "model")
    assert saved.config.id2label == {0: "cats", 1: "dogs"}
    # The same pretrained copy the run started from (its new head from the same seed), to see what training moved.
    config = FinetuneConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    run = prepare(config)
    start = dict(run.task.build_model().named_parameters())
    trained = dict(saved.named_parameters())
    moved = changed_parameters(start, trained)
    assert moved and all(name.endswith("bias") for name in moved), moved
    assert "classifier.bias" in moved
    # The loaded model is the one the run evaluated: same held-out accuracy.
    assert run.task.evaluate(saved) == pytest.approx(summary["after"])
    assert (out / "plots" / "loss.png").stat().st_size > 0


def test_finetune_a_bert_folder_on_a_csv(tmp_path, hf_folders):
    data = write_reviews_csv(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(hf_folders / "bert"), "--data", str(data), "--scheme", "last:2",
                 "--steps", "5", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "2", "--out", str(out)]) == 0
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert saved.config.id2label == {0: "neg", 1: "pos"}
    config = FinetuneConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    run = prepare(config)
    start = dict(run.task.build_model().named_parameters())
    moved = changed_parameters(start, dict(saved.named_parameters()))
    # last:2 trains the last two parametrised layers in forward order: the pooler's dense layer and the classifier.
    assert moved == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    # The checkpoint's weights are the saved model's, and the tokenizer came along.
    ckpt = load_file(out / "checkpoint" / "model.safetensors")
    for name, p in saved.named_parameters():
        assert torch.equal(ckpt[name], p), name
    enc = tokenizer(["good great fun movie"], return_tensors="pt")
    assert saved(**enc).logits.shape == (1, 2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [0, 2, 4, 5]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    summary = json.loads((out / "summary.json").read_text())
    assert run.task.evaluate(saved) == pytest.approx(summary["after"])
    assert summary["planned_step_peak_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    memory = summary["memory_report"]  # trainer.memory_report() at the end of the run, line by line
    assert memory["trained weights"] > 0 and memory["planned step buffers (peak)"] > 0
    assert memory["predicted training memory above the runtime libraries"] >= memory["trained weights"]
    assert "planned step buffers (peak)" in format_summary(summary)  # printed at the end and by `pockengine report`


def test_a_tsv_with_its_own_column_names(tmp_path, hf_folders, capsys):
    rows = ["sentence\tsentiment"] + [f"{'good great fun' if i % 2 else 'bad awful boring'} movie\t"
                                     f"{'positive' if i % 2 else 'negative'}" for i in range(16)]
    data = tmp_path / "reviews.tsv"
    data.write_text("\n".join(rows) + "\n")
    argv = ["finetune", "--model", str(hf_folders / "bert"), "--data", str(data), "--scheme", "bias_only",
            "--steps", "2", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "missing column(s) ['text', 'label']" in capsys.readouterr().err
    assert main([*argv, "--text-column", "sentence", "--label-column", "sentiment", "--out", str(tmp_path / "run")]) == 0
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert saved.config.id2label == {0: "negative", 1: "positive"}


SMALL_CNN = '''
import torch
from torch import nn


def small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, {outputs}))
'''


@pytest.fixture
def cnn_module(tmp_path, monkeypatch):
    """An importable module `tinymodels` with small_cnn() (two outputs) and three_way() (three)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "tinymodels.py").write_text(SMALL_CNN.format(outputs=2) + SMALL_CNN.replace("small_cnn", "three_way")
                                          .format(outputs=3))
    monkeypatch.syspath_prepend(str(folder))
    return "tinymodels"


def run_cnn(tmp_path, out, module, extra=()):
    images = tmp_path / "images"
    if not images.exists():
        write_image_folder(images, size=12)
    return main(["finetune", "--model", f"{module}:small_cnn", "--data", str(images), "--steps", "6",
                 "--batch-size", "4", "--lr", "0.05", "--optimizer", "sgd", "--checkpoint-every", "2",
                 "--out", str(out), *extra])


def test_a_module_function_model_is_saved_as_a_state_dict(tmp_path, cnn_module):
    out = tmp_path / "run"
    assert run_cnn(tmp_path, out, cnn_module) == 0
    import tinymodels

    model = tinymodels.small_cnn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_file(out / "model" / "model.safetensors"), strict=True)
    assert json.loads((out / "model" / "classes.json").read_text()) == ["cats", "dogs"]
    preprocessing = json.loads((out / "model" / "preprocessing.json").read_text())
    assert preprocessing["size"] == [12, 12] and preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    moved = changed_parameters(start, model.state_dict())
    assert {"0.weight", "0.bias", "1.weight", "1.bias", "6.weight", "6.bias"} <= moved
    assert not {"1.running_mean", "1.running_var"} & moved  # BatchNorm statistics stay frozen
    run = prepare(FinetuneConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))
    assert run.shape == {"image_height": 12, "image_width": 12}  # the images' own size
    summary = json.loads((out / "summary.json").read_text())
    assert run.task.evaluate(model) == pytest.approx(summary["after"])


def test_scheme_auto_trains_the_scheme_the_search_chose_within_the_budget(tmp_path, cnn_module, monkeypatch):
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    budget = 64 * 2 ** 10
    assert run_cnn(tmp_path, out, cnn_module, ["--scheme", "auto", "--quick", "--memory-budget", f"{budget}B"]) == 0
    chosen = pe.Scheme.from_file(out / "search" / "scheme.yaml")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheme"] == chosen.name
    assert summary["planned_step_peak_bytes"] <= budget
    assert (tmp_path / "cache" / "analysis").is_dir() and any((tmp_path / "cache" / "analysis").rglob("*.json"))


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, cnn_module, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cnn(tmp_path, whole, cnn_module) == 0

    def crash(step):
        if step == 3:
            raise RuntimeError("simulated crash after step 3")

    monkeypatch.setattr(finetune_module, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cnn(tmp_path, cut, cnn_module)
    assert not (cut / "model").exists()  # the run died between its checkpoint at step 2 and its end
    monkeypatch.setattr(finetune_module, "after_step", lambda step: None)
    assert main(["finetune", "--out", str(cut), "--resume"]) == 0

    a, b = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout draws included
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in (whole, cut)]
    assert losses[0] == losses[1] and [s for s, _ in losses[1]] == [1, 2, 3, 4, 5, 6]  # step 3 is not logged twice
    # A finished run can go on longer: only the new steps run.
    assert main(["finetune", "--out", str(cut), "--resume", "--steps", "8"]) == 0
    assert json.loads((cut / "summary.json").read_text())["steps"] == 8
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [0, 8]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))


def test_ctrl_c_stops_after_the_step_and_saves_a_checkpoint(tmp_path, cnn_module, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert run_cnn(tmp_path, whole, cnn_module) == 0
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does, while the run is going

    monkeypatch.setattr(finetune_module, "after_step", interrupt)
    assert run_cnn(tmp_path, out, cnn_module) == 130
    assert pe.read_checkpoint(out / "checkpoint").meta["steps_done"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone
    monkeypatch.setattr(finetune_module, "after_step", lambda step: None)
    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_yaml_config_with_command_line_overrides(tmp_path, cnn_module):
    images = write_image_folder(tmp_path / "images", size=12)
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {cnn_module}:small_cnn
        data: {images}
        steps: 50
        batch_size: 4
        lr: 0.05
        memory-budget: 64MB
        out: {tmp_path / 'run'}
        """))
    assert main(["finetune", "--config", str(config), "--steps", "2"]) == 0
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert recorded["steps"] == 2 and recorded["batch_size"] == 4 and recorded["memory_budget"] == 64 * 2 ** 20


def test_report_redraws_the_plots(tmp_path, cnn_module, capsys):
    out = tmp_path / "run"
    assert run_cnn(tmp_path, out, cnn_module, ["--eval-every", "2"]) == 0
    for png in (out / "plots").iterdir():
        png.unlink()
    assert main(["report", str(out)]) == 0
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "metric.png"}
    assert "accuracy:" in capsys.readouterr().out
    with Image.open(out / "plots" / "metric.png") as png:
        assert png.width > 100


def test_report_compares_runs_each_divided_by_the_first(tmp_path, cnn_module, capsys):
    full, bias = tmp_path / "full", tmp_path / "bias"
    assert run_cnn(tmp_path, full, cnn_module) == 0
    assert run_cnn(tmp_path, bias, cnn_module, ["--scheme", "bias_only"]) == 0
    capsys.readouterr()
    assert main(["report", str(full), str(bias)]) == 0
    table = capsys.readouterr().out.split("| run |", 1)[1].splitlines()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, bias)]
    memory = [s["planned_step_peak_bytes"] + s["optimizer_state_bytes"] for s in summaries]
    first, second = (row.split("|") for row in table[2:4])
    assert first[2].strip() == "full" and second[2].strip() == "bias_only"
    assert float(first[-2]) == 1.0 and float(second[-2]) == pytest.approx(memory[1] / memory[0], abs=0.01)
    assert memory[1] < memory[0]

    (bias / "summary.json").unlink()
    assert main(["report", str(full), str(bias)]) == 2
    assert "has no summary.json (the run has not finished" in capsys.readouterr().err


def test_a_test_split_is_held_out_apart_from_the_validation_split():
    from pockengine.finetune import _split

    config = FinetuneConfig(model="m", data="d", out="o", eval_fraction=0.1, test_fraction=0.2)
    train, validation, test = _split(100, config)
    assert (len(train), len(validation), len(test)) == (70, 10, 20)
    assert sorted(torch.cat([train, validation, test]).tolist()) == list(range(100))
    # Without a test split the validation split is what it always was: the first examples of the seeded order.
    _, alone, none = _split(100, FinetuneConfig(model="m", data="d", out="o", eval_fraction=0.1))
    assert len(none) == 0 and torch.equal(alone, torch.cat([test, validation])[:10])
    with pytest.raises(pe.UserInputError, match="--test-fraction"):
        FinetuneConfig(model="m", data="d", out="o", eval_fraction=0.5, test_fraction=0.5)
    # A test set of its own (--test-data, appended after the data): the rest is split as without it.
    train_alone, _, _ = _split(100, FinetuneConfig(model="m", data="d", out="o", eval_fraction=0.1))
    train, validation, test = _split(130, FinetuneConfig(model="m", data="d", out="o", test_data="t"), 30)
    assert torch.equal(train, train_alone) and torch.equal(validation, alone)
    assert test.tolist() == list(range(100, 130))


def test_a_test_set_of_its_own_is_evaluated_for_the_summary_only(tmp_path, cnn_module):
    write_image_folder(tmp_path / "test", size=12, per_class=5)
    out = tmp_path / "run"
    assert run_cnn(tmp_path, out, cnn_module, ["--test-data", str(tmp_path / "test")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test"] == 10 and summary["n_eval"] == 2 and summary["n_train"] == 14
    assert 0 <= summary["test_before"] <= 1 and 0 <= summary["test_after"] <= 1
    write_image_folder(tmp_path / "other", size=12, per_class=2, classes=("cats", "birds"))
    with pytest.raises(pe.UserInputError, match="unknown label 'birds'"):
        prepare(FinetuneConfig(model=f"{cnn_module}:small_cnn", data=str(tmp_path / "images"),
                               test_data=str(tmp_path / "other"), out=str(tmp_path / "x")))


def test_report_compares_runs_on_their_test_split(tmp_path, cnn_module, capsys):
    runs = [tmp_path / "full", tmp_path / "bias"]
    for run, scheme in zip(runs, ("full", "bias_only")):
        assert run_cnn(tmp_path, run, cnn_module, ["--scheme", scheme, "--test-fraction", "0.25"]) == 0
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert all(s["n_test"] == 4 and 0 <= s["test_after"] <= 1 and s["lr"] == 0.05 for s in summaries)
    capsys.readouterr()
    assert main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy: " in out and "| test accuracy before -> after |" in out
    row = out.split("| run |", 1)[1].splitlines()[3].split("|")
    assert row[5].strip() == f"{summaries[1]['test_before']:.4f} -> {summaries[1]['test_after']:.4f}"


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_finetune_a_causal_lm_folder_on_chats(tmp_path, hf_folders):
    """Prompt/response pairs and chat messages in one JSONL; the loss covers the replies only; the saved folder
    loads with AutoModelForCausalLM and has the held-out loss the run reported."""
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)).save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folders / "bert")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    lines = []
    for i in range(12):
        if i % 2:
            lines.append({"prompt": "is the movie good", "response": "the movie is great fun"})
        else:
            lines.append({"messages": [{"role": "user", "content": "the plot"}, {"role": "assistant", "content": "boring"},
                                       {"role": "user", "content": "the actor"},
                                       {"role": "assistant", "content": "the actor was awful"}]})
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--scheme", "full", "--steps", "4",
                 "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0.25", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "held-out loss" and summary["after"] < summary["before"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    run = prepare(FinetuneConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))
    assert -run.task.evaluate(saved) == pytest.approx(summary["after"], rel=1e-5)
    inputs, target = run.batches.at(0)
    for ids, labels in zip(inputs["input_ids"], target):
        text = tokenizer.decode(ids[labels != -100])
        assert text in ("the movie is great fun", "the actor was awful"), text  # the last reply only


def test_finetune_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--model", "--data", "--scheme", "--memory-budget", "--time-budget", "--steps", "--epochs", "--lr",
                 "--eval-every", "--eval-fraction", "--seq-len", "--image-size", "--out", "--resume", "--config"):
        assert flag in out, flag
    assert "examples:" in out and "module:function" in out


@pytest.mark.slow  # the real MobileNetV2 (ImageNet weights) on real MNIST images
def test_finetune_the_builtin_mobilenet_v2_on_mnist(tmp_path):
    from pockengine.models import mobilenet_v2

    out = tmp_path / "run"
    assert main(["finetune", "--model", "mobilenet_v2", "--data", "mnist", "--scheme", "last:6", "--steps", "12",
                 "--max-examples", "600", "--max-eval-examples", "100", "--image-size", "32", "--out", str(out)]) == 0
    model = mobilenet_v2(pretrained=False, num_classes=10)
    model.load_state_dict(load_file(out / "model" / "model.safetensors"), strict=True)
    summary = json.loads((out / "summary.json").read_text())
    run = prepare(FinetuneConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))
    assert run.task.evaluate(model) == pytest.approx(summary["after"])
    assert summary["trained_tensors"] == 10 and summary["n_eval"] == 60


@pytest.mark.slow  # the real all-MiniLM-L6-v2 on Rotten Tomatoes sentences
def test_finetune_the_builtin_minilm_on_rotten_tomatoes(tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", "--model", "minilm", "--data", "rotten_tomatoes", "--scheme", "bias_only", "--steps",
                 "4", "--seq-len", "32", "--max-examples", "200", "--eval-fraction", "0.2", "--out", str(out)]) == 0
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert saved.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert saved(**tokenizer(["a gripping, beautiful film"], return_tensors="pt")).logits.shape == (1, 2)


def test_a_test_set_of_one_class_and_other_image_sizes(tmp_path, cnn_module, capsys):
    """A test set may hold one class only (it is scored against the training data's classes), and its images are
    resized to the training images' size, the size a module:function model took; a label the training data lacks
    is named by the test file's line."""
    write_image_folder(tmp_path / "images", size=12)
    write_image_folder(tmp_path / "test", size=20, per_class=3, classes=("dogs",))
    run = prepare(FinetuneConfig(model=f"{cnn_module}:small_cnn", data=str(tmp_path / "images"),
                                 test_data=str(tmp_path / "test"), out=str(tmp_path / "x")))
    assert run.n_test == 3 and run.shape == {"image_height": 12, "image_width": 12}
    assert run.evaluate_test(run.loaded.model) in (0.0, 1 / 3, 2 / 3, 1.0)
    reviews = write_reviews_csv(tmp_path / "reviews.csv")
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\ngood movie,pos\nthe plot,meh\n")
    assert main(["finetune", "--model", "minilm", "--data", str(reviews), "--test-data", str(unseen),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{unseen}:3: unknown label 'meh', none of the training data's classes ['neg', 'pos']" in err, err


ODD_MODELS = '''
import torch
from torch import nn


def grey_mlp():  # an MNIST-style network: one channel, a fixed size
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12 * 12, 8), nn.ReLU(), nn.Linear(8, 2))


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.fc(self.conv(x).mean((2, 3)))}


def named():
    torch.manual_seed(0)
    return Named()


def pair():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(1), nn.Unflatten(1, (2, -1)))
'''


def test_module_function_models_taking_grey_images_or_returning_a_dict(tmp_path, monkeypatch, capsys):
    """A one-channel network gets grey images (Pillow's luma of the RGB pixels); a forward returning
    {"logits": ...} trains; a model that fails on both an RGB and a grey image, or returns no (batch, classes)
    logits, is refused saying what it got."""
    (tmp_path / "oddmodels.py").write_text(ODD_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = write_image_folder(tmp_path / "images", size=12)
    run = prepare(FinetuneConfig(model="oddmodels:grey_mlp", data=str(images), out=str(tmp_path / "x")))
    assert run.preprocessing["channels"] == 1 and len(run.preprocessing["mean"]) == 1
    assert run.task.example_batch[0][0].shape == (8, 1, 12, 12)
    data = load_data(str(images))
    greys = finetune_module._grey(data).images
    for path, grey in zip(data.where, greys):
        assert torch.equal(grey[0], torch.tensor(np.array(Image.open(path).convert("L")))), path
    out = tmp_path / "named"
    assert main(["finetune", "--model", "oddmodels:named", "--data", str(images), "--steps", "2", "--batch-size",
                 "4", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["finetune", "--model", "oddmodels:grey_mlp", "--data", str(images), "--image-size", "16",
                 "--out", str(tmp_path / "sized")]) == 2
    err = capsys.readouterr().err
    assert "fails on one image of the data, given as RGB and as grey ((1, 3, 16, 16): RuntimeError" in err, err
    assert "give --image-size" in err
    assert main(["finetune", "--model", "oddmodels:pair", "--data", str(images), "--out", str(tmp_path / "p")]) == 2
    assert "returns (1, 2, 100) for a batch of one image" in capsys.readouterr().err


def test_a_folder_with_an_image_processor_is_trained_on_what_the_processor_makes(tmp_path):
    """The image processor saved beside the model is what gives it images later: its resample filter (bicubic),
    shortest-edge resize and centre crop make the training inputs too, not a bilinear squash to the config's size."""
    torch.manual_seed(0)
    folder = tmp_path / "convnext"
    transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                           image_size=224)).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 24}, crop_pct=0.75).save_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    shown = {}
    for name, (height, width) in {"cats": (30, 50), "dogs": (60, 20)}.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        shown[name] = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for i in range(6):
            shown[name].save(tmp_path / "images" / name / f"{i}.png")
    run = prepare(FinetuneConfig(model=str(folder), data=str(tmp_path / "images"), out=str(tmp_path / "x"),
                                 batch_size=4))
    (inputs, labels) = run.task.example_batch
    assert run.shape == {"image_height": 24, "image_width": 24}
    for x, label in zip(inputs["pixel_values"], labels):
        expected = processor(shown[run.classes[label]], return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(x, expected, atol=1e-5)


def test_the_readmes_way_to_load_a_saved_torch_model():
    """`import pockengine` then `pockengine.models.mobilenet_v2(...)`, as the README loads a run's model.safetensors:
    the submodules import on first use like pockengine.losses (a process of its own: here they are imported)."""
    import subprocess
    import sys

    script = ("import pockengine; pockengine.models.mobilenet_v2(pretrained=False, num_classes=2); "
              "assert callable(pockengine.data.load_mnist)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr


def test_a_yaml_config_may_name_paths_from_the_home_folder(tmp_path, cnn_module, monkeypatch):
    """`data: ~/photos` in a run file means what it means on a command line, where the shell expands it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "photos", size=12)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {cnn_module}:small_cnn\ndata: ~/photos\nsteps: 1\nbatch_size: 4\nout: ~/run\n")
    assert main(["finetune", "--config", str(config)]) == 0
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert recorded["data"] == str(tmp_path / "photos")
