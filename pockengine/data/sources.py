"""The data `pockengine finetune --data` reads: the built-in sets, or a person's own files.

- an image folder with one sub-folder per class (`cats/1.jpg`, `dogs/a.png`): image classification;
- a CSV or JSONL of `text` and `label` (a class name or an integer): text classification;
- a JSONL of `prompt`/`response` pairs or of chat `messages`: causal language modelling on the replies;
- `mnist` (`mnist-test`: its test split), `rotten_tomatoes`, `chatterbot`: the offline packages' data
  (/work/shared/OFFLINE_RESOURCES.md).

Every example remembers where it came from (`file:line`, `file`), so that a bad one is refused by name
(`UserInputError`) before any minute goes into loading a model or compiling. Images are decoded once, resized to the
size the model takes and kept as uint8; texts stay strings until the model's tokenizer is known.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pockengine.errors import UserInputError

__all__ = ["ImageData", "TextData", "ChatData", "Data", "BUILTIN_DATA", "data_kind", "load_data", "append_data",
           "image_sizes", "assign_labels", "note"]

IMAGE, TEXT, CHAT = "image classification", "text classification", "causal language modelling"
BUILTIN_DATA = {"mnist": IMAGE, "mnist-test": IMAGE, "rotten_tomatoes": TEXT, "chatterbot": CHAT}
_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_TEXT_SUFFIXES = (*_TABLE_DELIMITERS, ".jsonl", ".json")


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, C, H, W), all of one size
    raw_labels: list[Any]  # class names (folder names) or integers
    where: list[str]  # the file of each image
    size: tuple[int, int]  # (height, width) the model takes: batches are resized to it where the images differ
    classes: list[str] = field(default_factory=list)  # filled by assign_labels
    labels: torch.Tensor | None = None
    kind: str = IMAGE


@dataclass
class TextData:
    texts: list[str]
    raw_labels: list[Any]
    where: list[str]  # file:line of each example
    classes: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    kind: str = TEXT


@dataclass
class ChatData:
    conversations: list[list[dict[str, str]]]  # each: messages {role, content}; the last one is the reply trained on
    where: list[str]
    kind: str = CHAT


Data = ImageData | TextData | ChatData


def note(message: str) -> None:
    """A problem with the data that pockengine works around (images resized, texts truncated), said once per data
    set: callers say it once per kind of problem, never per example. The CLI prints it as one line."""
    warnings.warn(f"pockengine: {message}", UserWarning, stacklevel=3)


def data_kind(spec: str) -> str:
    """What `--data spec` holds, read from the name or the first record (for the model loader to pick a head)."""
    if spec in BUILTIN_DATA:
        return BUILTIN_DATA[spec]
    path = Path(spec)
    if path.is_dir():
        return IMAGE
    if not path.exists():
        raise UserInputError(f"--data {spec}: no such file or folder, and not a built-in data set "
                             f"({', '.join(BUILTIN_DATA)})")
    if path.suffix.lower() not in _TEXT_SUFFIXES:
        spreadsheet = path.suffix.lower() in (".xlsx", ".xls", ".xlsm", ".ods", ".numbers")
        raise UserInputError(f"--data {spec}: a data file is a .csv, .tsv or .jsonl (text and label, prompt and "
                             "response, or chat messages); an image data set is a folder with one sub-folder per "
                             "class" + ("; save the spreadsheet as CSV (\"CSV UTF-8\")" if spreadsheet else ""))
    if path.suffix.lower() in _TABLE_DELIMITERS:
        return TEXT
    first = next(_jsonl_records(path), None)
    if first is None:
        raise UserInputError(f"{path} is empty: it holds no record")
    keys = first[1]
    return CHAT if "messages" in keys or "prompt" in keys else TEXT


def load_data(spec: str, image_size: tuple[int, int] | None = None, channels: int = 3,
              columns: tuple[str, str] = ("text", "label"), test: bool = False,
              resize: Callable[[Any], np.ndarray] | None = None) -> Data:
    """Read `--data spec`; images are resized to `image_size` (None: their most common size), or by `resize` (an
    image processor's resizing: an RGB PIL image to (height, width, 3) uint8 pixels); a text data set's `columns`
    are the names of its (text, label) columns or fields. A `test` set (--test-data) may hold a single class; its
    labels are not assigned: `append_data` reads them as the training data's classes."""
    if spec in ("mnist", "mnist-test"):
        return _mnist(image_size, channels, "test" if spec == "mnist-test" else "train")
    if spec == "rotten_tomatoes":
        from pockengine.data.text import load_movie_reviews

        texts, labels = load_movie_reviews("rotten_tomatoes")
        data = TextData(texts, labels, [f"rotten_tomatoes example {i}" for i in range(len(texts))])
        assign_labels(data, ["negative", "positive"])
        return data
    if spec == "chatterbot":
        return _chatterbot()
    kind = data_kind(spec)
    path = Path(spec)
    if kind == CHAT:
        return _chat_jsonl(path)
    if kind == IMAGE:
        data: ImageData | TextData = _image_folder(path, image_size, channels, 1 if test else 2, resize)
    else:
        data = _text_table(path, columns) if path.suffix.lower() in _TABLE_DELIMITERS else _text_jsonl(path, columns)
    if not test:
        assign_labels(data)
    return data


def append_data(data: Data, extra: Data, name: str) -> Data:
    """`data` followed by `extra` (the examples of `--test-data`, named `name`), one data set of data's kind whose
    class names are data's."""
    if type(extra) is not type(data):
        raise UserInputError(f"{name} holds {extra.kind} examples, --data {data.kind} ones; give a test set of the "
                             "same kind")
    if isinstance(data, ChatData):
        return ChatData(data.conversations + extra.conversations, data.where + extra.where)
    if isinstance(data, TextData):
        merged: ImageData | TextData = TextData(data.texts + extra.texts, data.raw_labels + extra.raw_labels,
                                                data.where + extra.where)
    else:
        if extra.size != data.size or extra.images.shape[1:] != data.images.shape[1:]:
            raise UserInputError(f"{name}: its images are {tuple(extra.images.shape[1:])}, --data's "
                                 f"{tuple(data.images.shape[1:])}; give --image-size so both are resized alike")
        merged = ImageData(torch.cat([data.images, extra.images]), data.raw_labels + extra.raw_labels,
                           data.where + extra.where, data.size)
    for label, at in zip(extra.raw_labels, extra.where):
        if isinstance(label, str) and label not in data.classes:
            raise UserInputError(f"{at}: unknown label {label!r}, none of the training data's classes "
                                 f"{data.classes[:20]}; the model learns only those: give {name.split()[0]} "
                                 "examples of them")
    assign_labels(merged, data.classes)
    return merged


# -- labels ---------------------------------------------------------------------------------------------------
def assign_labels(data: ImageData | TextData, known: list[str] | None = None, num_outputs: int | None = None) -> None:
    """Turn the raw labels into class indices (`data.labels`) and names (`data.classes`).

    `known`: the model's own class names (a fine-tuned classifier's `id2label`, the built-in sets' names): a class
    name must be one of them, an integer a valid index. `num_outputs`: how many classes the model's head has when
    its names are not known (a `module:function` model): integers must be below it. Otherwise the data defines the
    classes: names sorted, integers 0..max.
    """
    raw, where = data.raw_labels, data.where
    names = [str(label) for label in raw if isinstance(label, str)]
    if names and len(names) != len(raw):
        i = next(i for i, label in enumerate(raw) if not isinstance(label, str))
        j = next(i for i, label in enumerate(raw) if isinstance(label, str))
        raise UserInputError(f"{where[i]}: label {raw[i]!r} is a number, but {where[j]} has the class name "
                             f"{raw[j]!r}; write every label as a class name or every one as an integer index")
    if names:
        classes = list(known) if known is not None else sorted(set(names))
        if num_outputs is not None and len(classes) > num_outputs:
            raise UserInputError(f"{where[0].rsplit(':', 1)[0]}: the data has {len(classes)} classes {classes[:10]}, "
                                 f"but the model has {num_outputs} outputs; give a model with a head for every class")
        index = {_nfc(name): i for i, name in enumerate(classes)}
        for i, label in enumerate(raw):
            if _nfc(label) not in index:
                raise UserInputError(f"{where[i]}: unknown label {label!r}; the model's classes are "
                                     f"{classes[:20]}: use one of them, or fine-tune a model without a fixed "
                                     "label set")
        data.labels = torch.tensor([index[_nfc(label)] for label in raw], dtype=torch.int64)
    else:
        limit = len(known) if known is not None else num_outputs
        for i, label in enumerate(raw):
            if label < 0 or (limit is not None and label >= limit):
                allowed = f"0..{limit - 1}" if limit is not None else "0 or more"
                raise UserInputError(f"{where[i]}: label {label} is out of range: class indices are {allowed}"
                                     + (f" (the model has {limit} classes)" if limit is not None else ""))
        count = limit if limit is not None else (max(raw) + 1 if raw else 0)
        classes = list(known) if known is not None else [str(i) for i in range(count)]
        data.labels = torch.tensor(raw, dtype=torch.int64)
    if len(set(data.labels.tolist())) < 2 and known is None and num_outputs is None:
        raise UserInputError(f"{where[0].split(':')[0]}: every example has the same label {raw[0]!r}; a classifier "
                             "needs examples of at least two classes")
    data.classes = classes


def _label(value: Any, where: str) -> Any:
    """A label as written: an integer index (also "3" in a CSV, and "3.0", as pandas writes an integer column that
    has a missing value), a class name, or a JSON true/false (the class names "false" and "true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserInputError(f"{where}: the label is empty; write a class name or an integer class index")
    if isinstance(value, float):
        if not value.is_integer():
            raise UserInputError(f"{where}: label {value} is not a class: write a class name or an integer index")
        value = int(value)
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise UserInputError(f"{where}: label {value!r} is neither a class name nor an integer class index")
    text = value.strip()
    return int(float(text)) if re.fullmatch(r"-?[0-9]+(\.0*)?", text) else _nfc(text)


def _nfc(name: str) -> str:
    """A class name in Unicode's composed form: macOS names folders decomposed ("e" and a combining accent), a
    CSV typed elsewhere has "é" as one character; both are the same class."""
    return unicodedata.normalize("NFC", name)


def _text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{where}: the {column!r} is empty or not a string; every example needs its text")
    return value


# -- images ---------------------------------------------------------------------------------------------------
# Photos Pillow reads only through a plugin (a phone's HEIC, JPEG XL) or not at all (camera raw, vector images):
# files named so are images the user means to train on, refused with the fix rather than skipped as not images.
_HEIF = ("pillow_heif", "pip install pillow-heif")
_PHOTO_PLUGINS = {".heic": _HEIF, ".heif": _HEIF, ".jxl": ("pillow_jxl", "pip install pillow-jxl-plugin")}
_UNREADABLE_PHOTOS = (".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".svg")


def _split_by_name(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the paths named as images, the others), in order: by extension, among every format PIL reads (with the
    HEIC and JPEG XL plugins where they are installed)."""
    from PIL import Image

    Image.init()  # registers every format's extensions
    for module, _ in set(_PHOTO_PLUGINS.values()):
        if importlib.util.find_spec(module) is not None:
            plugin = importlib.import_module(module)  # pillow_jxl registers itself when imported
            if hasattr(plugin, "register_heif_opener"):
                plugin.register_heif_opener()
    extensions = Image.registered_extensions()
    images = [p for p in paths if p.suffix.lower() in extensions]
    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in extensions and (suffix in _PHOTO_PLUGINS or suffix in _UNREADABLE_PHOTOS):
            fix = (f"{_PHOTO_PLUGINS[suffix][1]} (pockengine uses it when installed), or convert the photos to JPEG"
                   if suffix in _PHOTO_PLUGINS else "convert the images to JPEG or PNG")
            raise UserInputError(f"{path}: Pillow cannot read {suffix} images here; {fix}")
    return images, [p for p in paths if p.suffix.lower() not in extensions]


def _hidden(path: Path, root: Path) -> bool:
    """Whether `path` is what a system or tool keeps beside the data: dot-files and dot-folders (.DS_Store, macOS'
    ._photo.jpg, .ipynb_checkpoints/) or what macOS puts in a zip archive (__MACOSX/)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def _image_files(folder: Path, min_classes: int = 2) -> tuple[list[str], list[list[Path]]]:
    """The class names (sub-folders) and each one's image files. Files without an image format's extension (a
    README, Windows' Thumbs.db, notes) are skipped, said once; a file named as an image must be one (a link to
    nothing is refused by name, not skipped)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p, folder))
    visible = [p for p in sorted(folder.iterdir()) if p.is_file() and not _hidden(p, folder)]
    loose, skipped = _split_by_name(visible)
    if not classes:
        raise UserInputError(f"{folder}: an image data set is a folder with one sub-folder per class (cats/, dogs/), "
                             f"each holding that class's images; this one has no sub-folder"
                             + (f" (files: {[p.name for p in visible][:5]})" if visible else ""))
    if loose:
        raise UserInputError(f"{folder}: {[p.name for p in loose][:5]} lie outside the class sub-folders; put each "
                             "image in the sub-folder of its class")
    files = []
    for name in classes:
        found = sorted(p for p in (folder / name).rglob("*")
                       if (p.is_file() or p.is_symlink() and not p.is_dir()) and not _hidden(p, folder / name))
        images, others = _split_by_name(found)
        skipped += others
        if not images:
            raise UserInputError(f"{folder / name}: the class folder {name!r} holds no images"
                                 + (f" (only {[p.name for p in found][:5]})" if found else "")
                                 + "; add some or remove the folder")
        files.append(images)
    if len(classes) < min_classes:
        raise UserInputError(f"{folder}: only one class folder ({classes[0]}); a classifier needs at least two")
    if skipped:
        shown = ", ".join(str(p.relative_to(folder)) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        note(f"{folder}: {len(skipped)} file(s) that are not images by their name were skipped ({shown})")
    return classes, files


def _open_image(path: Path, mode: str) -> Any:
    """The image in `path` decoded now (a truncated file fails here, naming itself, not in the middle of training),
    upright (its EXIF orientation applied, as a photo viewer shows it) and in `mode` ("RGB" or "L")."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise UserInputError(f"{path}: a broken link (to {path.readlink()}); remove it or point it at an image")
    try:
        with Image.open(path) as file:
            file.load()
            image = ImageOps.exif_transpose(file)
            if image.mode == "I" or image.mode.startswith("I;16"):
                # 16-bit greyscale (scans, microscopy, depth): convert() would clip every value above 255 to white
                pixels = np.asarray(image, dtype=np.float64) / 257
                image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
            return image.convert(mode)
    except Image.DecompressionBombError as e:
        raise UserInputError(f"{path}: {e} Shrink the image (it is resized to the model's size anyway), e.g. with "
                             "`convert in.jpg -resize 4096x4096 out.jpg`") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserInputError(f"{path}: unreadable image ({type(e).__name__}: {e}); remove the file or replace it "
                             "with a valid image") from e


def _upright_size(image: Any) -> tuple[int, int]:
    """(height, width) as the image is shown: an EXIF orientation of 5 to 8 turns it a quarter."""
    turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
    return (image.width, image.height) if turned else (image.height, image.width)


def image_sizes(spec: str) -> Counter[tuple[int, int]]:
    """How many images of the folder `spec` have each upright (height, width), from the files' headers."""
    if spec in ("mnist", "mnist-test"):
        return Counter({(28, 28): 1})
    return _sizes(_image_files(Path(spec), min_classes=1)[1])


def _sizes(files: list[list[Path]]) -> Counter[tuple[int, int]]:
    from PIL import Image

    sizes: Counter[tuple[int, int]] = Counter()
    for paths in files:
        for path in paths:
            try:
                with Image.open(path) as image:
                    sizes[_upright_size(image)] += 1
            except Exception:  # reported by name when the image is decoded
                continue
    return sizes


def _image_folder(folder: Path, size: tuple[int, int] | None, channels: int, min_classes: int,
                  resize: Callable[[Any], np.ndarray] | None = None) -> ImageData:
    from PIL import Image

    classes, files = _image_files(folder, min_classes)
    if resize is not None:  # what the processor makes, the size the model is given later, wins over its config's
        size = tuple(resize(_open_image(files[0][0], "RGB")).shape[:2])
    target = size or _sizes(files).most_common(1)[0][0]
    mode = "RGB" if channels == 3 else "L"
    arrays, names, where = [], [], []
    first_of_size: dict[tuple[int, int], Path] = {}
    unreadable: list[tuple[str, UserInputError]] = []
    for name, paths in zip(classes, files):
        for path in paths:
            # converted before it is resized: a palette, 16-bit or transparent image is interpolated in RGB as an
            # image of that size already in RGB is
            try:
                image = _open_image(path, mode)
            except UserInputError as e:
                unreadable.append((str(path), e))
                continue
            first_of_size.setdefault((image.height, image.width), path)
            if resize is not None:
                image = resize(image)
                if image.shape[:2] != target:  # a processor that keeps the aspect ratio: its output made square
                    image = Image.fromarray(image).resize((target[1], target[0]), Image.BILINEAR)
            elif (image.height, image.width) != target:
                image = image.resize((target[1], target[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
            arrays.append(pixels.reshape(target[0], target[1], channels))
            names.append(_nfc(name))
            where.append(str(path))
    _refuse_problems(folder, unreadable, "file(s)")
    if len(first_of_size) > 1:
        examples = ", ".join(f"{p.name} {w}x{h}" for (h, w), p in list(first_of_size.items())[:3])
        more = ", ..." if len(first_of_size) > 3 else ""
        note(f"{folder}: the images have {len(first_of_size)} different sizes ({examples}{more}); each is resized "
              f"to {target[1]}x{target[0]} (width x height)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, names, where, size=target)


def _mnist(size: tuple[int, int] | None, channels: int, split: str) -> ImageData:
    """MNIST's training split (`mnist`, 50,000 images) or its test split (`mnist-test`, 10,000)."""
    from pockengine.data.mnist import load_mnist

    images, labels = load_mnist(split)
    # Kept at 28x28 (39 MB); each batch is resized to the model's size when it is made.
    pixels = images.mul_(255).round_().to(torch.uint8).expand(-1, channels, -1, -1)
    data = ImageData(pixels, labels.tolist(), [f"mnist {split} image {i}" for i in range(len(labels))],
                     size=size or (28, 28))
    assign_labels(data, [str(i) for i in range(10)])
    return data


# -- text -----------------------------------------------------------------------------------------------------
def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    # A spreadsheet's "Unicode text" export is UTF-16 with its byte-order mark: unambiguous, so read as such.
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise UserInputError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {column}, "
                             f"{e.reason}); save the file as UTF-8 (a spreadsheet's \"CSV UTF-8\", or "
                             f"`iconv -f cp1252 -t utf-8`)") from e
    if not text.strip():
        raise UserInputError(f"{path} is empty: it holds no example")
    return text


def _csv_rows(text: str, delimiter: str, first_line: int = 1) -> Iterator[tuple[int, list[str]]]:
    """(the line a record starts on, its fields) for each record of a CSV text that starts on `first_line`, blank
    lines skipped. Records end at line feeds and carriage returns only: a text may hold other line separators
    (U+2028, U+0085) that str.splitlines would cut it at; a quoted field may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = first_line
    for row in reader:
        if row:
            yield start, row
        start = first_line + reader.line_num


def _text_table(path: Path, names: tuple[str, str]) -> TextData:
    text = _read_text_file(path)
    delimiter = _TABLE_DELIMITERS[path.suffix.lower()]
    first_line = 1
    hint = re.match(r'"?sep=(.)"?(\r\n|\r|\n)', text)
    if hint:  # Excel's first line naming the separator, "sep=;", before the header
        delimiter, text, first_line = hint.group(1), text[hint.end():], 2

    def header(delimiter: str) -> list[str]:
        return next(_csv_rows(text, delimiter, first_line), (1, []))[1]

    if not hint and not _find_columns(header(delimiter), names):
        # a spreadsheet saved where the decimal separator is a comma writes ';' between fields
        for other in ";\t|,":
            if other != delimiter and _find_columns(header(other), names):
                note(f"{path}: fields are separated by {other!r}, not {delimiter!r}; reading it so")
                delimiter = other
                break
    rows = _csv_rows(text, delimiter, first_line)
    columns = next(rows, (1, []))[1]
    found = _find_columns(columns, names)
    if not found:
        missing = [c for c in names if c not in columns]
        raise UserInputError(f"{path}:{first_line}: missing column(s) {missing}; the header is {columns}. A text data "
                             "set needs a text and a label column: name yours with --text-column and --label-column")
    text_at, label_at = (columns.index(name) for name in found)
    texts, labels, where = [], [], []
    problems: list[tuple[str, UserInputError]] = []
    for line, row in rows:
        at = f"{path}:{line}"
        try:
            if len(row) != len(columns):
                raise UserInputError(f"{at}: the row has another number of fields ({len(row)}) than the header "
                                     f"({len(columns)}: {columns}); quote texts that hold commas")
            text, label = _text(row[text_at], at, found[0]), _label(row[label_at], at)
        except UserInputError as e:
            problems.append((at, e))
            continue
        texts.append(text)
        labels.append(label)
        where.append(at)
    _refuse_problems(path, problems)
    if not texts:
        raise UserInputError(f"{path} has a header but no example rows")
    return TextData(texts, labels, where)


def _refuse_problems(path: Path, problems: list[tuple[str, UserInputError]], places_are: str = "line(s)") -> None:
    """One error for every bad example of a file or folder: the first said in full, the others' lines (files)
    listed, so that data with many gaps is mended in one pass, not one run per line."""
    if not problems:
        return
    first = problems[0][1]
    if len(problems) == 1:
        raise first
    places = [at.removeprefix(f"{path}:").removeprefix(f"{path}/") for at, _ in problems[1:]]
    shown = ", ".join(places[:10]) + (", ..." if len(places) > 10 else "")
    raise UserInputError(f"{first}; and {len(places)} more example(s) have problems, at {places_are} {shown}") \
        from first


def _find_columns(header: list[str], names: tuple[str, ...]) -> tuple[str, ...] | None:
    """The header's column for each of `names`: the same name, or else the one column that differs from it only in
    case and surrounding spaces ("Text" for text); None if one is missing or ambiguous."""
    found = []
    for name in names:
        if name in header:
            found.append(name)
            continue
        alike = [c for c in header if c.strip().lower() == name.strip().lower()]
        if len(alike) != 1:
            return None
        found.append(alike[0])
    return tuple(found)


def _jsonl_records(path: Path):
    """(file:line, record) for each non-empty line; a JSON array file (.json) counts its items as lines."""
    text = _read_text_file(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UserInputError(f"{path}: item {i} is not an object with named fields")
            yield f"{path} item {i}", item
        return
    # Lines end at \n (\r\n too) only: JSON strings may hold U+2028 or U+0085 raw, where str.splitlines cuts.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); a .jsonl file "
                                 "holds one JSON object per line") from e
        if not isinstance(record, dict):
            raise UserInputError(f"{path}:{number}: a line holds {type(record).__name__}, not a JSON object")
        yield f"{path}:{number}", record


def _text_jsonl(path: Path, names: tuple[str, str]) -> TextData:
    texts, labels, where = [], [], []
    text_field, label_field = names
    problems: list[tuple[str, UserInputError]] = []
    for at, record in _jsonl_records(path):
        try:
            missing = [key for key in names if key not in record]
            if missing:
                raise UserInputError(f"{at}: missing field(s) {missing} (found {sorted(record)}); each line of a "
                                     "text data set needs a text and a label field: name yours with --text-column "
                                     "and --label-column")
            text, label = _text(record[text_field], at, text_field), _label(record[label_field], at)
        except UserInputError as e:
            problems.append((at, e))
            continue
        texts.append(text)
        labels.append(label)
        where.append(at)
    _refuse_problems(path, problems)
    return TextData(texts, labels, where)


def _chat_jsonl(path: Path) -> ChatData:
    conversations, where = [], []
    for at, record in _jsonl_records(path):
        if "messages" in record:
            messages = record["messages"]
            if (not isinstance(messages, list) or len(messages) < 2
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages)):
                raise UserInputError(f"{at}: 'messages' must be a list of at least two {{\"role\": ..., "
                                     "\"content\": ...}} objects")
            if messages[-1]["role"] != "assistant":
                raise UserInputError(f"{at}: the last message is from {messages[-1]['role']!r}; the last message "
                                     "is the reply the model learns, from the 'assistant'")
            conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            missing = [key for key in ("prompt", "response") if key not in record]
            if missing:
                raise UserInputError(f"{at}: missing field(s) {missing} (found {sorted(record)}); each line needs "
                                     "'prompt' and 'response', or 'messages'")
            conversation = [{"role": "user", "content": _text(record["prompt"], at, "prompt")},
                            {"role": "assistant", "content": _text(record["response"], at, "response")}]
        conversations.append(conversation)
        where.append(at)
    return ChatData(conversations, where)


def _chatterbot() -> ChatData:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the chatterbot data needs its package: pip install --no-deps chatterbot-corpus==1.3.3")
    conversations, where = [], []
    for file in sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml")):
        for i, turns in enumerate(yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", [])):
            turns = [str(t) for t in turns]
            for j in range(len(turns) - 1):  # every turn and the reply to it is one pair
                conversations.append([{"role": "user", "content": turns[j]},
                                      {"role": "assistant", "content": turns[j + 1]}])
                where.append(f"{file.name} conversation {i} turn {j}")
    return ChatData(conversations, where)
