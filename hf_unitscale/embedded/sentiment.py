"""VADER's human-rated movie-review snippets (Hutto & Gilbert, ICWSM 2014) as a sentiment data set.

The ``vaderSentiment`` 3.3.2 sdist nests ``hutto_ICWSM_2014.tar.gz``; its
``movieReviewSnippets_GroundTruth.txt`` holds ``id<TAB>mean rating<TAB>snippet`` lines, the mean
human rating in -4..4.
"""

from __future__ import annotations

import functools
import io
import random
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

from .fetching import FetchError, _ensure

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)


_SENTIMENT_MEMBERS = (
    "movieReviewSnippets_GroundTruth.txt",
    "movieReviewSnippets_anonDataRatings.txt",
    "_README_.txt",
)


def _build_sentiment(archive: Path, out: Path) -> None:
    inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(archive, "r:gz") as outer:
        try:
            inner_fh = outer.extractfile(inner_name)
        except KeyError:
            inner_fh = None
        if inner_fh is None:
            raise FetchError(f"{archive.name} has no {inner_name}")
        inner_bytes = inner_fh.read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for name in _SENTIMENT_MEMBERS:
            fh = inner.extractfile(f"hutto_ICWSM_2014/{name}")
            if fh is None:
                raise FetchError(f"hutto_ICWSM_2014.tar.gz has no {name}")
            (out / name).write_bytes(fh.read())
    logger.info("extracted %s", ", ".join(_SENTIMENT_MEMBERS))


def _decode_text(raw: bytes, what: str) -> str:
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    logger.warning("%s is neither UTF-8 nor cp1252; decoding as latin-1", what)
    return raw.decode("latin-1")


@functools.lru_cache(maxsize=4)
def _sentiment_rows(path: Path) -> tuple[tuple[int, float, str], ...]:
    text = _decode_text(path.read_bytes(), path.name)
    rows: list[tuple[int, float, str]] = []
    seen: set[str] = set()
    skipped = duplicates = 0
    for line in text.splitlines():
        fields = line.strip().split("\t", 2)
        if len(fields) != 3:
            skipped += bool(line.strip())
            continue
        try:
            ident, score = int(fields[0]), float(fields[1])
        except ValueError:
            skipped += 1
            continue
        snippet = fields[2].strip()
        if not snippet:
            skipped += 1
            continue
        if snippet in seen:  # a few snippets occur twice; keep the first so splits cannot leak
            duplicates += 1
            continue
        seen.add(snippet)
        rows.append((ident, score, snippet))
    if skipped or duplicates:
        logger.debug("%s: skipped %d malformed and %d duplicate lines", path.name, skipped, duplicates)
    rows.sort(key=lambda r: r[0])
    return tuple(rows)


def load_sentiment(split: str = "train", *, eval_size: int = 2000, seed: int = 0) -> datasets.Dataset:
    """VADER's human-rated movie-review snippets as a binary sentiment ``datasets.Dataset``.

    Columns: ``text`` (str), ``label`` (0/1 ``ClassLabel``: negative/positive, label = score > 0)
    and ``score`` (mean human rating, -4..4). Duplicate snippets are dropped. The rows are
    shuffled with ``random.Random(seed)``; the first ``eval_size`` form ``"test"``, the rest ``"train"``.
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows = _sentiment_rows(_ensure("sentiment") / "movieReviewSnippets_GroundTruth.txt")
    if not 0 < eval_size < len(rows):
        raise ValueError(f"eval_size must be in 1..{len(rows) - 1}, got {eval_size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = order[:eval_size] if split == "test" else order[eval_size:]
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "score": datasets.Value("float64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "text": [rows[i][2] for i in chosen],
            "label": [int(rows[i][1] > 0) for i in chosen],
            "score": [rows[i][1] for i in chosen],
        },
        features=features,
        split=datasets.Split.TRAIN if split == "train" else datasets.Split.TEST,
    )
