"""Bad data, models and run folders given to `pockengine finetune` get a clear error naming the file and line (or a
note said once, where the data is usable: mixed image sizes, texts too long)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune import WORDS, cnn_module, hf_folders, write_image_folder, write_reviews_csv  # noqa: F401 (fixtures)

from pockengine.cli import main
from pockengine.data.sources import load_data
from pockengine.finetune import FinetuneConfig, prepare

transformers = pytest.importorskip("transformers")


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def finetune_argv(model: str, data, out, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--data", str(data), "--steps", "2", "--batch-size", "2", "--out", str(out),
            *extra]


# -- image folders ----------------------------------------------------------------------------------------------
def test_an_unreadable_image_is_named(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=3)
    (images / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert "broken.png" in err and "unreadable image" in err


def test_a_truncated_image_is_named(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=3)
    whole = (images / "cats" / "0.png").read_bytes()
    (images / "cats" / "0.png").write_bytes(whole[:len(whole) // 2])
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert str(images / "cats" / "0.png") in err and "unreadable image" in err


def test_a_class_folder_without_images_is_named(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=3)
    (images / "birds").mkdir()
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert "birds" in err and "holds no images" in err


@pytest.mark.parametrize("layout, message", [("loose", "lie outside the class sub-folders"),
                                             ("one class", "only one class folder"),
                                             ("flat", "has no sub-folder")])
def test_a_folder_that_is_not_one_sub_folder_per_class(tmp_path, capsys, layout, message):
    images = tmp_path / "images"
    if layout == "flat":
        images.mkdir()
        Image.new("RGB", (8, 8)).save(images / "a.png")
    else:
        write_image_folder(images, per_class=2, classes=("cats",) if layout == "one class" else ("cats", "dogs"))
        if layout == "loose":
            Image.new("RGB", (8, 8)).save(images / "stray.png")
    assert message in refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)


def test_mixed_image_sizes_are_resized_and_said_once(tmp_path):
    images = write_image_folder(tmp_path / "images", size=12, per_class=3)
    for i, size in enumerate([(20, 10), (7, 9), (30, 30)]):
        Image.new("RGB", size, (9, 9, 9)).save(images / "dogs" / f"odd{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(str(images), (16, 16))
    notes = [str(w.message) for w in caught if "different sizes" in str(w.message)]
    assert len(notes) == 1 and "resized to 16x16" in notes[0] and str(images) in notes[0]
    assert data.images.shape == (9, 3, 16, 16) and data.images.dtype == torch.uint8


# -- text files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, message", [
    ("empty.csv", "", "is empty"),
    ("blank.csv", "\n\n", "is empty"),
    ("header.csv", "text,label\n", "has a header but no example rows"),
    ("columns.csv", "sentence,label\ngood,pos\n", ":1: missing column(s) ['text']"),
    ("ragged.csv", "text,label\ngood,pos\nbad, awful,neg\n", ":3: the row has another number of fields"),
    ("nolabel.csv", "text,label\ngood,pos\nbad,\n", ":3: the label is empty"),
    ("notext.csv", "text,label\ngood,pos\n,neg\n", ":3: the 'text' is empty"),
    ("mixed.csv", "text,label\ngood,pos\nbad,0\n", ":3: label 0 is a number, but"),
    ("negative.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": -1}\n', ":2: label -1 is out of range"),
    ("fraction.jsonl", '{"text": "good", "label": 1.5}\n', ":1: label 1.5 is not a class"),
    ("badjson.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", label: 0}\n', ":3: not valid JSON"),
    ("field.jsonl", '{"text": "good", "label": 1}\n{"txt": "bad", "label": 0}\n', ":2: missing field(s) ['text']"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}\n',
     ":1: the last message is from 'user'"),
    ("pairs.jsonl", '{"prompt": "hi", "response": "hello"}\n{"prompt": "hi"}\n', ":2: missing field(s) ['response']"),
    ("same.csv", "text,label\ngood,pos\nbad,pos\n", "every example has the same label"),
    ("latin1.csv", "text,label\ncaf\xe9,pos\n", "not UTF-8"),
])
def test_bad_text_files_are_named_with_their_line(tmp_path, capsys, hf_folders, name, text, message):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    err = refused(finetune_argv(str(hf_folders / "bert"), path, tmp_path / "run"), capsys)
    assert str(path) in err and message in err, err


@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory, hf_folders):
    """A tiny BERT that already is a classifier of its own classes (id2label neg, pos)."""
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(hf_folders / "bert").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("labels, message", [(("pos", "meh", "neg"),
                                              "unknown label 'meh'; the model's classes are ['neg', 'pos']"),
                                             ((1, 2, 0), "label 2 is out of range: class indices are 0..1")])
def test_labels_a_fine_tuned_classifier_does_not_know(tmp_path, capsys, sentiment_classifier, labels, message):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in
                                              zip(("good movie", "awful plot", "bad"), labels)))
    err = refused(finetune_argv(str(sentiment_classifier), path, tmp_path / "run"), capsys)
    assert f"{path}:3: {message}" in err, err


def test_a_fine_tuned_classifier_keeps_its_head_for_its_own_labels(tmp_path, sentiment_classifier):
    path = write_reviews_csv(tmp_path / "reviews.csv")
    run = prepare(FinetuneConfig(model=str(sentiment_classifier), data=str(path), out=str(tmp_path / "run")))
    original = transformers.AutoModelForSequenceClassification.from_pretrained(sentiment_classifier)
    assert run.classes == ["neg", "pos"]
    assert torch.equal(run.loaded.model.classifier.weight, original.classifier.weight)


def test_texts_too_long_are_truncated_and_said_once(tmp_path, hf_folders):
    path = tmp_path / "reviews.csv"
    rows = ["good movie,pos", "the plot is boring the actor is awful the film is bad,neg", "fine,pos",
            "good great fun movie the plot the actor,pos"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = prepare(FinetuneConfig(model=str(hf_folders / "bert"), data=str(path), out=str(tmp_path / "run"),
                                     seq_len=8, batch_size=2, eval_fraction=0.25))
    notes = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(notes) == 1 and f"{path}:3" in notes[0] and "2 of 4 texts" in notes[0]
    inputs, _ = run.batches.at(0)
    assert inputs["input_ids"].shape == (2, 8)


# -- models, schemes, budgets, run folders -----------------------------------------------------------------------
def test_an_unknown_model_name_lists_what_is_accepted(tmp_path, capsys):
    err = refused(finetune_argv("mobilenet_v3", write_reviews_csv(tmp_path / "r.csv"), tmp_path / "run"), capsys)
    assert "--model mobilenet_v3: unknown model name" in err and "mobilenet_v2, minilm, smollm2" in err


@pytest.mark.parametrize("model, message", [("tinymodels:nowhere", "has no function 'nowhere'"),
                                            ("nomodule:f", "cannot import the module 'nomodule'")])
def test_a_bad_module_function_is_named(tmp_path, capsys, cnn_module, model, message):
    images = write_image_folder(tmp_path / "images", per_class=2)
    assert message in refused(finetune_argv(model, images, tmp_path / "run"), capsys)


def test_more_classes_than_a_module_model_has_outputs(tmp_path, capsys, cnn_module):
    images = write_image_folder(tmp_path / "images", per_class=2, classes=("cats", "dogs", "birds"))
    err = refused(finetune_argv("tinymodels:small_cnn", images, tmp_path / "run"), capsys)
    assert "the data has 3 classes" in err and "the model has 2 outputs" in err


def test_a_model_made_for_other_data(tmp_path, capsys):
    err = refused(finetune_argv("mobilenet_v2", write_reviews_csv(tmp_path / "r.csv"), tmp_path / "run"), capsys)
    assert "mobilenet_v2 is made for image classification, but the data is for text classification" in err


def test_scheme_auto_needs_a_budget(tmp_path, capsys, cnn_module):
    images = write_image_folder(tmp_path / "images", size=8, per_class=2)
    err = refused(finetune_argv("tinymodels:small_cnn", images, tmp_path / "run", "--scheme", "auto"), capsys)
    assert "--scheme auto searches under a budget: give --memory-budget" in err


def test_a_memory_budget_the_scheme_exceeds(tmp_path, capsys, cnn_module):
    images = write_image_folder(tmp_path / "images", size=8, per_class=2)
    err = refused(finetune_argv("tinymodels:small_cnn", images, tmp_path / "run", "--memory-budget", "10B"), capsys)
    assert re.search(r"scheme 'full' plans [0-9.]+ [KM]B per step above the weights \(step peak [0-9.]+ [KM]B \+ optimizer state "
                     r"[0-9.]+ [KM]B\), over --memory-budget", err), err


@pytest.mark.parametrize("flag, value, message", [("--memory-budget", "4 parsecs", "write a size such as 4MB"),
                                                  ("--time-budget", "soon", "write milliseconds per step"),
                                                  ("--scheme", "last:x", "last:K with an integer")])
def test_bad_settings_are_refused_before_loading(tmp_path, capsys, flag, value, message):
    images = write_image_folder(tmp_path / "images", size=8, per_class=2)
    assert message in refused(finetune_argv("mobilenet_v2", images, tmp_path / "run", flag, value), capsys)


def test_run_folders_are_never_overwritten_and_resume_keeps_its_settings(tmp_path, capsys, cnn_module):
    images = write_image_folder(tmp_path / "images", size=8, per_class=3)
    out = tmp_path / "run"
    assert main(finetune_argv("tinymodels:small_cnn", images, out)) == 0
    assert "already holds a run; continue it with --resume" in refused(
        finetune_argv("tinymodels:small_cnn", images, out), capsys)
    assert "was started with lr = 0.0001, not 0.5" in refused(
        ["finetune", "--out", str(out), "--resume", "--lr", "0.5"], capsys)
    assert "holds no run" in refused(["finetune", "--out", str(tmp_path / "none"), "--resume"], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "is not an empty folder" in refused(finetune_argv("tinymodels:small_cnn", images, tmp_path / "full"),
                                               capsys)
    assert "needs --data" in refused(["finetune", "--model", "mobilenet_v2"], capsys)


def test_a_bad_yaml_config_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: mobilenet_v2\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        main(["finetune", "--config", str(config)])  # argparse: unrecognized arguments: --learning-rate
    assert "--learning-rate" in capsys.readouterr().err
    config.write_text("- just a list\n")
    assert "a run file is a YAML mapping" in refused(["finetune", "--config", str(config)], capsys)


def test_a_spreadsheet_csv_with_semicolons_and_capitalised_columns_is_read(tmp_path):
    """Excel in locales whose decimal separator is a comma saves ';' between fields, and often with a BOM and
    column names such as "Text": read as the user means it, the separator said once."""
    path = tmp_path / "reviews.csv"
    path.write_text("\ufeffText;Label\n" + "".join(f"{w} film, really;{'pos' if i % 2 else 'neg'}\n"
                                                 for i, w in enumerate(WORDS[:6])), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(str(path), None)
    assert [str(w.message) for w in caught if "separated by ';'" in str(w.message)] != []
    assert data.texts[0] == f"{WORDS[0]} film, really" and len(data.texts) == 6


def test_an_ambiguous_column_name_is_not_guessed(tmp_path, capsys, hf_folders):
    path = tmp_path / "reviews.csv"
    path.write_text("Text,TEXT,label\na,b,pos\nc,d,neg\n")
    err = refused(finetune_argv(str(hf_folders / "bert"), path, tmp_path / "run"), capsys)
    assert ":1: missing column(s) ['text']" in err and "'Text', 'TEXT'" in err, err


def test_files_that_are_not_images_by_name_are_skipped_and_said_once(tmp_path):
    """What a photo folder holds besides photos (Windows' Thumbs.db, notes) is skipped, said once; images in other
    modes (grayscale, RGBA, CMYK, palette) and with upper-case extensions are read."""
    images = write_image_folder(tmp_path / "images", size=12, per_class=2)
    (images / "cats" / "Thumbs.db").write_bytes(b"\0\0not an image")
    (images / "dogs" / "notes.txt").write_text("taken in May")
    (images / "README.md").write_text("my photos")
    for mode, name in [("L", "gray.png"), ("RGBA", "alpha.PNG"), ("CMYK", "print.JPG"), ("P", "palette.gif")]:
        Image.new(mode, (12, 12)).save(images / "dogs" / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(str(images), (12, 12))
    notes = [str(w.message) for w in caught if "not images by their name" in str(w.message)]
    assert len(notes) == 1 and "3 file(s)" in notes[0] and "Thumbs.db" in notes[0], notes
    assert data.images.shape == (8, 3, 12, 12)


def test_a_class_folder_of_non_images_says_what_it_holds(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=3)
    (images / "birds").mkdir()
    (images / "birds" / "list.txt").write_text("robin")
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert "holds no images (only ['list.txt'])" in err, err


@pytest.mark.parametrize("name, text", [
    ("separators.csv", 'text,label\n"good\u2028film",pos\nbad\x85film,neg\nfine\u2029film,pos\n'),
    ("separators.jsonl", '{"text": "good\u2028film", "label": "pos"}\n{"text": "bad\x85film", "label": "neg"}\n'
                         '{"text": "fine\u2029film", "label": "pos"}\n'),
])
def test_texts_holding_unicode_line_separators_stay_one_example(tmp_path, name, text):
    """U+2028, U+2029 and U+0085 are valid inside a CSV field or a JSON string (json.dumps(ensure_ascii=False)
    writes them raw); only a line feed or carriage return ends a record."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    data = load_data(str(path))
    assert data.texts == ["good\u2028film", "bad\x85film", "fine\u2029film"]
    first = 2 if name.endswith(".csv") else 1  # after the CSV's header
    assert data.where == [f"{path}:{line}" for line in range(first, first + 3)]


def test_a_record_spanning_lines_is_named_by_its_first_line(tmp_path, capsys, hf_folders):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\r\n"good\r\nfilm",pos\r\n\r\n"bad\nfilm\nreally",\r\n', encoding="utf-8")
    err = refused(finetune_argv(str(hf_folders / "bert"), path, tmp_path / "run"), capsys)
    assert f"{path}:5: the label is empty" in err, err


def test_labels_as_pandas_writes_them_and_json_booleans(tmp_path):
    """pandas writes an integer column with a missing value as floats ("1.0"): those are the integer labels; JSON
    true/false are the classes "false" and "true"."""
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\ngood,1.0\nbad,0.0\nfine,2\n")
    data = load_data(str(floats))
    assert data.classes == ["0", "1", "2"] and data.labels.tolist() == [1, 0, 2]
    booleans = tmp_path / "spam.jsonl"
    booleans.write_text('{"text": "win money", "label": true}\n{"text": "lunch?", "label": false}\n')
    data = load_data(str(booleans))
    assert data.classes == ["false", "true"] and data.labels.tolist() == [1, 0]


def test_a_utf16_spreadsheet_export_is_read_and_latin1_named_by_line(tmp_path, capsys, hf_folders):
    """A spreadsheet's "Unicode text" export is UTF-16 with a byte-order mark, tab-separated: read. A Windows
    code-page file is refused naming the line and column of the first byte that is not UTF-8, and how to convert."""
    path = tmp_path / "reviews.tsv"
    path.write_bytes("text\tlabel\ncafé film\tpos\nbad film\tneg\n".encode("utf-16"))
    assert load_data(str(path)).texts == ["café film", "bad film"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ngood,pos\nun café,neg\n".encode("cp1252"))
    err = refused(finetune_argv(str(hf_folders / "bert"), latin, tmp_path / "run"), capsys)
    assert f"{latin}:3: not UTF-8 text (byte 0xe9 at column 7" in err and "save the file as UTF-8" in err, err


def test_what_macos_and_jupyter_keep_beside_photos_is_not_data(tmp_path, capsys):
    """A folder unzipped from a macOS archive has __MACOSX/ (its ._ files mirroring every class folder); Jupyter
    leaves .ipynb_checkpoints/ copies of images inside a class folder: neither is a class nor an example. A link to
    nothing, named as an image, is refused by name rather than silently left out."""
    images = write_image_folder(tmp_path / "images", size=12, per_class=2)
    (images / "__MACOSX" / "cats").mkdir(parents=True)
    (images / "__MACOSX" / "cats" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")
    (images / "cats" / ".ipynb_checkpoints").mkdir()
    (images / "cats" / "0.png").rename(images / "cats" / ".ipynb_checkpoints" / "0.png")
    (images / "dogs" / "._1.png").write_bytes(b"\0\5\26\7AppleDouble")
    data = load_data(str(images), (12, 12))
    assert data.classes == ["cats", "dogs"]
    assert sorted(data.where) == [str(images / "cats" / "1.png"), str(images / "dogs" / "0.png"),
                                  str(images / "dogs" / "1.png")]
    (images / "dogs" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert f"{images / 'dogs' / 'gone.jpg'}: a broken link (to {tmp_path / 'moved-away.jpg'})" in err, err


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """A phone photo stored sideways with an EXIF orientation is read upright; a 16-bit greyscale PNG is scaled to
    8 bits, not clipped to white; a palette or transparent image is turned into RGB before it is resized, so it
    becomes the same pixels as the RGB image it shows (resizing RGBA premultiplies the alpha: a transparent
    pixel turned black)."""
    images = tmp_path / "images"
    (images / "photos").mkdir(parents=True)
    (images / "scans").mkdir()
    stored = np.zeros((4, 8, 3), np.uint8)  # 4 high, 8 wide: red on the left, blue on the right
    stored[:, :4, 0] = stored[:, 4:, 2] = 255
    sideways = Image.fromarray(stored)
    exif = sideways.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 8 high, 4 wide, red on top
    sideways.save(images / "photos" / "phone.png", exif=exif.tobytes())
    grey16 = np.zeros((8, 4), np.uint16)
    grey16[4:] = 65535
    Image.fromarray(grey16).save(images / "scans" / "16bit.png")
    assert Image.open(images / "scans" / "16bit.png").mode == "I;16"
    data = load_data(str(images), None)
    assert data.size == (8, 4)  # the upright size is the most common one
    phone, scan = (data.images[data.where.index(str(images / folder / name))]
                   for folder, name in [("photos", "phone.png"), ("scans", "16bit.png")])
    assert phone[:, :4].float().mean((1, 2)).tolist() == [255, 0, 0] and phone[2, 4:].min() == 255
    assert scan[:, :4].max() == 0 and scan[:, 4:].min() == 255
    transparent = np.zeros((8, 8, 4), np.uint8)
    transparent[..., 0] = 255  # red, fully transparent
    Image.fromarray(transparent, "RGBA").save(images / "scans" / "clear.png")
    Image.fromarray(transparent[..., :3]).convert("P").save(images / "scans" / "palette.png")
    data = load_data(str(images), (4, 4))
    for name in ("clear.png", "palette.png"):
        pixels = data.images[data.where.index(str(images / "scans" / name))]
        assert pixels.float().mean((1, 2)).tolist() == [255, 0, 0], name


def test_an_image_too_large_to_decode_safely_is_named(tmp_path, capsys, monkeypatch):
    images = write_image_folder(tmp_path / "images", size=12, per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 12x12 is over twice the limit: Pillow refuses it
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert str(images / "cats" / "0.png") in err and "decompression bomb" in err and "Shrink the image" in err, err


def test_a_built_in_text_model_says_only_what_pockengine_says(tmp_path):
    """transformers' load report (the new head's weights listed as MISSING) and its tokenizer's "indexing errors"
    warning for a text longer than the model's positions are not shown: pockengine's own note says the text is
    truncated. (A process of its own: transformers' log handler holds the stderr of the process that imported it.)"""
    path = write_reviews_csv(tmp_path / "reviews.csv")
    path.write_text(path.read_text() + f"{'the plot ' * 400},pos\n")
    script = ("from pockengine.finetune import FinetuneConfig, prepare; "
              f"prepare(FinetuneConfig(model='minilm', data={str(path)!r}, out='unused', batch_size=4))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "MISSING" not in done.stderr and "indexing errors" not in done.stderr, done.stderr
    assert "Loading weights" not in done.stderr, done.stderr
    assert "are truncated to 128" in done.stderr


def test_a_phone_photo_pillow_cannot_read_is_refused_with_the_fix(tmp_path, capsys):
    """An iPhone's .HEIC photos are images the user means to train on: refused naming the plugin (or, where
    pillow-heif is installed, decoded by it: this fake one is then unreadable), not skipped as "not images"."""
    images = write_image_folder(tmp_path / "images", per_class=3)
    (images / "cats" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert "IMG_0001.HEIC" in err and ("pip install pillow-heif" in err or "unreadable image" in err), err


def test_excels_separator_line_is_read(tmp_path):
    """Excel writes "sep=;" as a CSV's first line to say which separator follows: read so, lines still counted
    from the file's first."""
    path = tmp_path / "reviews.csv"
    path.write_bytes("\ufeffsep=;\r\nText;Label\r\ngood, really;pos\r\nbad;\r\n".encode())
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: the label is empty")):
        load_data(str(path))
    path.write_bytes("sep=;\nText;Label\ngood, really;pos\nbad;neg\n".encode())
    data = load_data(str(path))
    assert data.texts == ["good, really", "bad"] and data.where == [f"{path}:3", f"{path}:4"]


@pytest.mark.parametrize("name, text, message", [
    ("gaps.csv", "text,label\ngood,pos\nbad,\nfine,pos\n,neg\nmeh,\n" + "ok,pos\n" * 12 + "x,\n",
     ":3: the label is empty; write a class name or an integer class index; and 3 more example(s) have problems, "
     "at line(s) 5, 6, 19"),
    ("gaps.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad"}\n{"text": 3, "label": "neg"}\n',
     ":2: missing field(s) ['label']"),
])
def test_every_bad_row_of_a_file_is_listed_in_one_error(tmp_path, capsys, hf_folders, name, text, message):
    """A spreadsheet with gaps is mended in one pass: the first bad row said in full, the lines of the others
    listed, not one run per line."""
    path = tmp_path / name
    path.write_text(text)
    err = refused(finetune_argv(str(hf_folders / "bert"), path, tmp_path / "run"), capsys)
    assert f"{path}{message}" in err, err
    if name.endswith(".jsonl"):
        assert "and 1 more example(s) have problems, at line(s) 3" in err, err


def test_every_unreadable_image_is_listed_in_one_error(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=3)
    for name in ("cats/0.png", "cats/2.png", "dogs/1.png"):
        (images / name).write_bytes((images / name).read_bytes()[:40])
    err = refused(finetune_argv("mobilenet_v2", images, tmp_path / "run"), capsys)
    assert f"{images / 'cats' / '0.png'}: unreadable image" in err, err
    assert "and 2 more example(s) have problems, at file(s) cats/2.png, dogs/1.png" in err, err


def test_a_spreadsheet_file_is_refused_saying_how_to_save_it(tmp_path, capsys):
    path = tmp_path / "reviews.xlsx"
    path.write_bytes(b"PK\x03\x04")
    err = refused(finetune_argv("minilm", path, tmp_path / "run"), capsys)
    assert "a data file is a .csv, .tsv or .jsonl" in err and 'save the spreadsheet as CSV ("CSV UTF-8")' in err, err


def test_a_class_name_written_decomposed_is_the_same_class(tmp_path, capsys):
    """macOS names a folder "café" decomposed (e and a combining accent); a test set or CSV made elsewhere writes
    it composed: one class, not an unknown label."""
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    images = write_image_folder(tmp_path / "images", size=12, per_class=4, classes=(decomposed, "tea"))
    test = write_image_folder(tmp_path / "test", size=12, per_class=2, classes=(composed, "tea"))
    data = load_data(str(images), (12, 12))
    assert data.classes == [composed, "tea"]
    run = prepare(FinetuneConfig(model="mobilenet_v2", data=str(images), test_data=str(test), out=str(tmp_path / "x"),
                                 batch_size=2, image_size=12))
    assert run.classes == [composed, "tea"] and run.n_test == 4
