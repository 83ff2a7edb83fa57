"""The record of the files `convert` and `merge` wrote into their output folder, so that `--overwrite` removes them.

An output folder holds one model: its config, weights, card, tokenizer and the source folder's other files (a
sentence-transformers folder's `modules.json`, `1_Pooling/`). Writing another model over it must not leave the
earlier one's files beside the new ones: another tokenizer's `vocab.txt` or `special_tokens_map.json` loads with the
new tokenizer (AutoTokenizer reads every file it knows, so SmolLM2's would get BERT's `[UNK]`, `[SEP]`, ... as special
tokens it does not have), an earlier source's `modules.json` makes sentence-transformers assemble another pipeline,
and the earlier card would be merged into the new one. Only the write that put them there knows which files those
are, so each write lists them in `RECORD_NAME`, and the next write moves exactly those aside while it runs, deleting
them when it succeeds and putting them back when it fails. The record sits in `.cache/huggingface/`, where
huggingface_hub keeps its own local metadata: `upload_folder` and `hf upload` skip it, and `convert`/`merge` never
copy hidden folders from a source. Files no record names (a user's own, or those of a folder written by hand or by
an older version) stay, and a warning names them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from transformers.utils import logging

logger = logging.get_logger(__name__)

RECORD_NAME = ".cache/huggingface/hf_unitscale-output.json"
ASIDE_NAME = ".cache/huggingface/hf_unitscale-replaced"  # the earlier write's files while a new one runs


def _listed(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f", … ({len(names)} files)" if len(names) > shown else "")


def recorded_files(output_dir: str | Path) -> list[str]:
    """The files, relative to `output_dir`, that the last convert/merge into it recorded writing and that are still
    there. A record that does not parse names none (with a warning): nothing is removed on its word."""
    out = Path(output_dir).expanduser()
    record = out / RECORD_NAME
    if not record.is_file():
        return []
    try:
        names = json.loads(record.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"`files` should list file names, got {names!r}")
    except (ValueError, KeyError, TypeError) as err:
        logger.warning(f"Ignoring {record}, which does not parse ({type(err).__name__}: {err}).")
        return []
    # only files inside the folder: a record edited to name `../x` or `/x` does not reach out of it
    inside = [name for name in names if (out / name).resolve().is_relative_to(out.resolve())]
    return sorted(name for name in inside if (out / name).is_file())


def _move(names: Iterable[str], source: Path, target: Path) -> list[str]:
    """Move the files `names` from `source` to `target` (same relative paths), dropping the subfolders of `source`
    that this leaves empty; best effort: returns the names that could not be moved."""
    failed = []
    for name in names:
        path = source / name
        try:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            path.replace(target / name)
        except OSError:
            failed.append(name)
            continue
        for folder in path.parents:
            if folder == source or any(folder.iterdir()):
                break
            folder.rmdir()
    return failed


def check_no_interrupted_write(output_dir: str | Path) -> None:
    """Refuse a folder whose last convert/merge was killed mid-write (no exception to put the earlier model back):
    its earlier model's files are still in `ASIDE_NAME`, and a new write must not delete them unseen."""
    aside = Path(output_dir).expanduser() / ASIDE_NAME
    if aside.is_dir() and any(path.is_file() for path in aside.rglob("*")):
        raise ValueError(
            f"A convert or merge into {Path(output_dir).expanduser()} was interrupted: the files of the model it was "
            f"replacing are in {aside}. Move back those you want to keep, then delete that folder."
        )


@contextmanager
def replacing_recorded_files(output_dir: str | Path) -> Iterator[dict[str, tuple[int, int]]]:
    """For the length of a write into `output_dir`: the files the last convert/merge recorded are moved aside
    (`ASIDE_NAME`), so the new write neither reads them (the earlier card) nor leaves them. When the write succeeds
    they are deleted, the log naming them. When it fails, the files it created are deleted and the earlier ones put
    back, so the folder holds the earlier model and nothing of the new one. Yields the folder's file stamps
    (`hub.file_stamps(..., recursive=True)`) once the earlier files are aside."""
    from ..hub import file_stamps

    out = Path(output_dir).expanduser()
    check_no_interrupted_write(out)
    names, aside = recorded_files(out), out / ASIDE_NAME
    stuck = _move(names, out, aside)
    stamps = file_stamps(out, recursive=True)
    try:
        if stuck:
            raise OSError(f"could not move {_listed(stuck)} aside in {out} to replace them")
        yield stamps
    except BaseException:
        created = [name for name in file_stamps(out, recursive=True) if name not in stamps]
        for name in created:
            (out / name).unlink(missing_ok=True)
        changed = [name for name, stamp in file_stamps(out, recursive=True).items() if stamps.get(name) != stamp]
        left = _move([name for name in names if (aside / name).is_file()], aside, out)
        if not left:
            shutil.rmtree(aside, ignore_errors=True)
        if changed or left:
            logger.error(
                f"The failed write into {out} could not restore everything: "
                + (f"it rewrote {_listed(changed)}; " if changed else "")
                + (f"the earlier model's {_listed(left)} are still in {aside}" if left else "")
            )
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if names:
        logger.warning(f"--overwrite: replaced the files an earlier convert or merge wrote to {out}: {_listed(names)}")


def record_written_files(
    output_dir: str | Path, stamps_before: dict[str, tuple[int, int]], copied: Iterable[str], source: str
) -> None:
    """Record in `output_dir` the files of this write: those `copied` from the source folder and those whose stamp
    (`hub.file_stamps(..., recursive=True)`) differs from `stamps_before`. Warn about the files, other than hidden
    ones, that were there before and that this write left as they were."""
    from ..hub import file_stamps

    out = Path(output_dir).expanduser()
    stamps = file_stamps(out, recursive=True)
    written = set(copied) | {name for name, stamp in stamps.items() if stamps_before.get(name) != stamp}
    kept = sorted(name for name in stamps if name not in written and not PurePosixPath(name).name.startswith("."))
    if kept:
        logger.warning(
            f"{out} keeps files that this write did not write and no earlier convert or merge recorded: "
            f"{_listed(kept)}. Remove any that belong to the model this one replaces (another tokenizer's files load "
            "with the new tokenizer)."
        )
    record = {"source": source, "files": sorted(written)}
    (out / RECORD_NAME).parent.mkdir(parents=True, exist_ok=True)
    (out / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
