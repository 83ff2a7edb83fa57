"""Jane Austen's six novels, read from the R package janeaustenr as Debian ships it.

``r-cran-janeaustenr`` holds the novels as character vectors (one element a line) in an R lazy-load
database: ``Rdata.rdx``, an RDS index of ``(offset, size)`` per variable, and ``Rdata.rdb``, the
concatenated compressed serializations. The builder writes one ``<book>.txt`` per novel and a
``books.json`` index; :func:`load_austen` joins lines into paragraphs.
"""

from __future__ import annotations

import functools
import json
import struct
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

from .fetching import FetchError, _ensure, _run, _tail

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)


# Order and titles as janeaustenr::austen_books() gives them.
_AUSTEN_BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _decompress_lazyload_blob(blob: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load compression: 4-byte big-endian length, then (type byte and) payload."""
    (length,) = struct.unpack(">I", blob[:4])
    if compressed == 1:
        kind, payload = b"Z", blob[4:]
    else:  # compress = 2 or 3: a type byte follows the length
        kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":
        import zlib

        raw = zlib.decompress(payload)
    elif kind == b"2":
        import bz2

        raw = bz2.decompress(payload)
    elif kind == b"X":
        import lzma

        raw = lzma.decompress(payload)
    elif kind == b"0":
        raw = payload
    else:
        raise FetchError(f"unknown R lazy-load compression type {kind!r}")
    if len(raw) != length:
        raise FetchError(f"R lazy-load blob decompressed to {len(raw)} bytes, header says {length}")
    return raw


def _read_r_lazyload(rdx: Path) -> dict[str, list[str]]:
    """Read every character vector of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs)."""
    import rdata  # the `embedded` extra's, checked before the download (`_Asset.builder_packages`)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that it assumes the RDS format
        index = rdata.read_rds(rdx)
        compressed = int(index["compressed"][0])
        blobs = rdx.with_suffix(".rdb").read_bytes()
        result: dict[str, list[str]] = {}
        for name, (offset, size) in index["variables"].items():
            raw = _decompress_lazyload_blob(blobs[int(offset) : int(offset) + int(size)], compressed)
            value = rdata.conversion.convert(rdata.parser.parse_data(raw))
            result[str(name)] = ["" if s is None else str(s) for s in list(value)]
    return result


def _build_austen(archive: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="hf_unitscale-deb-") as tmp:
        logger.info("unpacking %s with dpkg-deb", archive.name)
        proc = _run(["dpkg-deb", "-x", str(archive), tmp])
        if proc.returncode != 0:
            raise FetchError(f"dpkg-deb -x {archive.name} failed:\n{_tail(proc.stderr)}")
        rdx_files = list(Path(tmp).rglob("janeaustenr/data/Rdata.rdx"))
        if len(rdx_files) != 1:
            raise FetchError(f"{archive.name} has no janeaustenr/data/Rdata.rdx")
        logger.info("reading the R lazy-load data %s", rdx_files[0].relative_to(tmp))
        data = _read_r_lazyload(rdx_files[0])
    missing = sorted(set(_AUSTEN_BOOKS) - set(data))
    if missing:
        raise FetchError(f"janeaustenr data lacks the books {missing}")
    index = []
    for key, title in _AUSTEN_BOOKS.items():
        lines = data[key]
        (out / f"{key}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        index.append({"key": key, "title": title, "file": f"{key}.txt", "lines": len(lines)})
        logger.info("wrote %s.txt (%d lines)", key, len(lines))
    (out / "books.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=2)
def _austen_paragraphs(folder: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    books = json.loads((folder / "books.json").read_text(encoding="utf-8"))
    result = []
    for book in books:
        text = (folder / book["file"]).read_text(encoding="utf-8")
        paragraphs, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        result.append((book["title"], tuple(paragraphs)))
    return tuple(result)


def load_austen(split: str = "train", *, eval_fraction: float = 0.05) -> datasets.Dataset:
    """Jane Austen's six novels as a ``datasets.Dataset``, one row per non-empty paragraph.

    Columns: ``text`` (paragraph, lines joined by spaces) and ``book`` (title, e.g.
    ``"Pride & Prejudice"``), in reading order. ``"test"`` holds the last ``eval_fraction`` of
    each book's paragraphs (at least one when ``eval_fraction > 0``), ``"train"`` the rest.
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    texts: list[str] = []
    titles: list[str] = []
    for title, paragraphs in _austen_paragraphs(_ensure("austen")):
        n_test = max(1, round(len(paragraphs) * eval_fraction)) if eval_fraction > 0 else 0
        cut = len(paragraphs) - n_test
        part = paragraphs[cut:] if split == "test" else paragraphs[:cut]
        texts.extend(part)
        titles.extend([title] * len(part))
    return datasets.Dataset.from_dict(
        {"text": texts, "book": titles},
        split=datasets.Split.TRAIN if split == "train" else datasets.Split.TEST,
    )
