"""Helpers shared by the subcommands: loading a model by folder, Hub id or embedded name."""

from __future__ import annotations

import argparse
import fnmatch
import shutil
from pathlib import Path
from typing import Any


class CommandError(Exception):
    """A user error a subcommand reports in one line (no traceback)."""


def add_model_class_argument(parser: argparse.ArgumentParser) -> None:
    """The `--model-class` flag, whose value `args.model_class` goes to `load_model`."""
    parser.add_argument(
        "--model-class",
        "--model_class",
        dest="model_class",
        default=None,
        help="transformers class to load with, e.g. AutoModelForSequenceClassification (default: config.architectures)",
    )


def check_local_path(name_or_path: str, what: str) -> None:
    """Refuse a local-looking path (`/…`, `./…`, `../…`, `~…`) that does not exist, before the Hub reads it as an
    id."""
    if name_or_path.startswith(("/", "./", "../", "~", "\\")) and not Path(name_or_path).expanduser().exists():
        raise CommandError(
            f"could not load {what} {name_or_path!r}: no such file or folder; give a model folder, a Hub id, "
            "embedded:minilm or embedded:smollm2."
        )


def check_model_path(name_or_path: str, what: str) -> None:
    """`check_local_path`, and a local path must be a model folder: one holding config.json (transformers would
    take a file for a malformed Hub id, and a folder without config.json for a config without `model_type`)."""
    check_local_path(name_or_path, what)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise CommandError(
            f"{what} {name_or_path!r} is a file; give the model's folder (the one holding config.json and the "
            "weights), a Hub id, embedded:minilm or embedded:smollm2."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise CommandError(
            f"{what} {name_or_path!r} is a folder without config.json, so no model folder; give the folder holding "
            "the model's config.json and weights (as `save_pretrained` writes them)."
        )


def check_not_a_file(path: str, what: str) -> None:
    """Refuse a folder path to be written that is an existing file, before anything is loaded or trained."""
    if Path(path).expanduser().is_file():
        raise CommandError(f"{what} {path!r} is a file; give a folder path (a missing folder is created).")


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """The `--overwrite` flag, whose value `args.overwrite` goes to `check_output_dir`."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model already in output_dir instead of refusing to: its weights (of any format) and the "
        "files an earlier convert or merge recorded writing there (tokenizer, card, its source's files); other files "
        "stay, named in a warning",
    )


def check_output_dir(name_or_path: str, output_dir: str, overwrite: bool) -> None:
    """Refuse writing into the folder the model is read from (it would replace the source checkpoint, and files
    of its format the new one does not write would stay beside it), and, unless `overwrite`, into a folder that
    holds another checkpoint's weights or an earlier convert's or merge's files (`output_record`), which the write
    would delete; a folder whose last write was interrupted; and a path that is a file."""
    from ..hub import weight_files
    from .output_record import check_no_interrupted_write, recorded_files

    check_not_a_file(output_dir, "output_dir")
    check_no_interrupted_write(output_dir)
    source = Path(name_or_path).expanduser()
    if source.is_dir() and source.resolve() == Path(output_dir).expanduser().resolve():
        raise CommandError(
            f"output_dir {output_dir!r} is the model folder itself; write to another folder (the source stays as "
            "it is)."
        )
    weights = [path.name for path in weight_files(Path(output_dir).expanduser())]
    names = weights + [name for name in recorded_files(output_dir) if name not in weights]
    if names and not overwrite:
        listed = ", ".join(names[:3]) + (f", … ({len(names)} files)" if len(names) > 3 else "")
        raise CommandError(
            f"output_dir {output_dir!r} already holds a model ({listed}); pass --overwrite to replace it, or write "
            "to another folder."
        )


def load_model(name_or_path: str, model_class: str | None = None) -> Any:
    """A unit-scaled model from a folder, Hub id or `embedded:<name>`, whatever its checkpoint format.

    `model_class` names a transformers class or Auto class (e.g. `AutoModelForSequenceClassification`);
    by default the class in `config.architectures`.
    """
    import transformers

    from ..embedded import resolve_model_path
    from ..hub import from_pretrained

    check_model_path(name_or_path, "model")
    cls = None
    if model_class is not None:
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise CommandError(f"`--model-class {model_class}` is not a transformers class.")
    try:
        return from_pretrained(resolve_model_path(name_or_path), model_class=cls)
    except OSError as err:
        raise CommandError(f"could not load {name_or_path!r}: {err}") from err


def write_model_folder(args: argparse.Namespace, save: Any) -> Any:
    """Fill `args.output_dir` from the model `args.model`: copy the source folder's other files
    (`copy_source_files`), `save()` (config, weights, card), save its tokenizer and record the files written, with
    the files an earlier convert or merge recorded there moved aside until this write succeeds
    (`output_record`; `check_output_dir` has refused them without --overwrite). The tokenizer is loaded first, so
    that broken tokenizer files are an error before anything is written or moved. Returns the tokenizer, or None
    if the source has none."""
    from .output_record import record_written_files, replacing_recorded_files

    tokenizer = load_tokenizer(args.model)
    with replacing_recorded_files(args.output_dir) as stamps_before:
        copied = copy_source_files(args.model, args.output_dir)
        save()
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output_dir)
    record_written_files(args.output_dir, stamps_before, copied, source=args.model)
    return tokenizer


# weights beside a folder's checkpoint (`hub.weight_files`) in its top level: other frameworks', exports, Mistral's
# `consolidated.safetensors`, adapters. Copied next to the converted checkpoint they would be the source model's,
# loadable as if they were the converted one (and gigabytes). Subfolders' files are the model's (sentence-transformers'
# `2_Dense/model.safetensors`).
OTHER_WEIGHTS = (
    *("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf"),
    *("onnx", "openvino", "original"),  # exports; Llama's `original/consolidated.00.pth`
)
# a Trainer output folder's run state: checkpoints of other steps, event logs; not part of the model
RUN_STATE = ("checkpoint-*", "runs", "trainer_state.json", "training_args.bin")


def copy_source_files(name_or_path: str, output_dir: str) -> list[str]:
    """Copy the files and subfolders of a model folder that the save does not write (README.md, modules.json,
    1_Pooling/, …) to `output_dir`, so that the output is the whole source converted; before the save, which
    writes config.json and the weights and merges its card into the source's README. Never copied: the source's
    weights (`hub.weight_files`, `OTHER_WEIGHTS`), a Trainer's run state (`RUN_STATE`: `checkpoint-*`, `runs`, …),
    config.json, hidden entries (`.git`, `.cache`) and
    `output_dir` itself. A Hub id cannot be listed offline: only its config, weights and tokenizer carry over.
    Returns the files copied, relative to `output_dir` ('/'-separated)."""
    from ..embedded import resolve_model_path
    from ..hub import weight_files

    source, out = Path(resolve_model_path(name_or_path)).expanduser(), Path(output_dir).expanduser()
    copied = []

    def copy(src: Any, dst: str | Path) -> None:  # a file, or one in a subfolder (copytree)
        shutil.copy2(src, dst)
        copied.append(Path(dst).relative_to(out).as_posix())

    if not source.is_dir():
        return copied
    skipped = {path.name for path in weight_files(source)} | {"config.json"}
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if (
            path.name in skipped
            or path.name.startswith(".")
            or any(fnmatch.fnmatchcase(path.name, pattern) for pattern in OTHER_WEIGHTS + RUN_STATE)
            or out.resolve().is_relative_to(path.resolve())
        ):
            continue
        if path.is_dir():
            shutil.copytree(path, out / path.name, copy_function=copy, dirs_exist_ok=True)
        else:
            copy(path, out / path.name)
    return copied


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def load_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer saved with a model, or None when it has no tokenizer files.

    Checks for tokenizer files first: transformers 5 otherwise builds an empty tokenizer (special
    tokens only) from a bare config, which would silently map every word to [UNK]. Tokenizer files that
    do not load (a truncated tokenizer.json) are an error, not a missing tokenizer.
    """
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    from ..embedded import resolve_model_path

    path = resolve_model_path(name_or_path)
    found = any(
        cached_file(
            path, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
        for name in TOKENIZER_FILES
    )
    if not found:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # json, tokenizers (a bare Exception), sentencepiece, transformers: all say "broken"
        raise CommandError(
            f"the tokenizer of {name_or_path!r} does not load ({type(err).__name__}: {err}); repair its tokenizer "
            "files, or remove them to go on without a tokenizer."
        ) from err
