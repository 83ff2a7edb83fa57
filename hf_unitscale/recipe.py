"""Fine-tuning recipes: a flat YAML file read into `ModelArguments`, `DataArguments` and
`UnitScaleTrainingArguments` with `HfArgumentParser`.

Every key of a recipe is a field of one of the three dataclasses; each field's `help` metadata is
also its `--flag` help in `hf-unitscale train --help`. Before the dataclasses are built, every key
is checked against the parser's own argument table, so an unknown key, a missing required key or
a value of the wrong type is an error that names the key (plain `parse_yaml_file` would fail deep
inside `TrainingArguments`, or silently keep YAML's string "5e-5" as a learning rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "RECIPES_DIR",
    "RECIPE_SUFFIXES",
    "TASKS",
    "DataArguments",
    "ModelArguments",
    "Recipe",
    "RecipeError",
    "list_valued_keys",
    "load_recipe",
    "mapping_keys",
    "optional_keys",
    "packaged_recipes",
    "recipe_parser",
    "resolve_recipe",
]

Task = Literal["text-classification", "causal-lm"]
TASKS: tuple[str, ...] = typing.get_args(Task)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # the recipes shipped in the package
RECIPE_SUFFIXES = (".yaml", ".yml")


class RecipeError(ValueError):
    """A recipe key is unknown, missing or has a value of the wrong type."""


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to save it."""

    model_name_or_path: str = field(
        metadata={
            "help": "Model to fine-tune: a local folder, a Hub id, or an embedded real model that works offline, "
            "`embedded:minilm` (all-MiniLM-L6-v2) or `embedded:smollm2` (SmolLM2-135M-Instruct)."
        },
    )
    task: Task | None = field(
        default=None,
        metadata={"help": "`text-classification` or `causal-lm`; default: from the model's architecture."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id, if not the model's own; more tokens than the model's `vocab_size` "
            "is an error."
        },
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes for text classification; default: from the training labels."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Draw a new classifier head when the checkpoint's has another number of labels."},
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, how to tokenize it, and what to measure."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset for `datasets.load_dataset`; null for the embedded real data that works offline "
            "(movie-review sentiment snippets for text classification, Jane Austen's novels for causal LM)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A local .csv/.tsv/.json/.jsonl/.txt training file, optionally .gz/.bz2/.xz (instead of "
            "`dataset_name`)."
        },
    )
    eval_file: str | None = field(default=None, metadata={"help": "A local evaluation file, same format."})
    train_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    eval_split: str | None = field(
        default="test",
        metadata={"help": "Split of `dataset_name` to evaluate on; null for no evaluation (also of embedded data)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    label_column: str = field(
        default="label", metadata={"help": "Column holding the class label (text classification)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": "Text classification: truncate inputs to this many tokens. "
            "Causal LM: the text is concatenated and cut into blocks of this many tokens."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N ≥ 1 training rows (after shuffling with `seed`); null: every row."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N ≥ 1 evaluation rows; null: every row."}
    )
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={
            "help": "Metrics computed at evaluation, shipped `evaluate` scripts loaded by path (no Hub): `accuracy`, "
            "`f1` (binary for 2 classes, else macro). Causal LM: `accuracy` is next-token accuracy; eval loss and "
            "perplexity are always reported."
        },
    )
    baseline_eval: bool = field(
        default=True,
        metadata={"help": "Evaluate the model before training too, and print before/after metrics side by side."},
    )
    scale_plot: str | None = field(
        default="scales.png",
        metadata={
            "help": "After training, measure per-layer scales (W, Ŵ, x, g, x/a, g/c) on evaluation batches and write "
            "this PNG (relative to `output_dir`) with the table next to it as JSON; null to skip."
        },
    )
    scale_plot_batches: int = field(
        default=2, metadata={"help": "Number of evaluation batches the scale plot measures (and calibrates) on."}
    )


def _training_arguments_class():
    from .arguments import UnitScaleTrainingArguments  # imported when used: this module imports no transformers

    return UnitScaleTrainingArguments


def recipe_parser(**kwargs: Any):
    """The `HfArgumentParser` over (`ModelArguments`, `DataArguments`, `UnitScaleTrainingArguments`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, DataArguments, _training_arguments_class()), **kwargs)


@functools.cache
def _field_types() -> dict[str, Any]:
    """{recipe key: its dataclass field's type, resolved}."""
    classes = (ModelArguments, DataArguments, _training_arguments_class())
    hints = {}
    for cls in classes:
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init})
    return hints


def _type_members(kind: Any) -> tuple[Any, ...]:
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return typing.get_args(kind) if union else (kind,)


def mapping_keys() -> frozenset[str]:
    """Recipe keys whose field type admits a dict (`lr_scheduler_kwargs`, `fsdp_config`, `deepspeed`, ...)."""
    return frozenset(
        key
        for key, kind in _field_types().items()
        if any(m is dict or typing.get_origin(m) is dict for m in _type_members(kind))
    )


def optional_keys() -> frozenset[str]:
    """Recipe keys whose field type admits None (YAML's `null`)."""
    return frozenset(key for key, kind in _field_types().items() if type(None) in _type_members(kind))


def list_valued_keys() -> frozenset[str]:
    """Recipe keys whose field type admits a list (`report_to: str | list[str] | None`)."""
    return frozenset(
        key for key, kind in _field_types().items() if list in {typing.get_origin(t) for t in _type_members(kind)}
    )


@dataclass
class Recipe:
    model: ModelArguments
    data: DataArguments
    training: Any  # UnitScaleTrainingArguments
    source: str | None = None


def _arguments_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{dataclass field name: the argparse action that parses it} (the `--no_*` complements skipped)."""
    actions = {}
    for action in parser._actions:
        if action.dest in ("help",) or not action.option_strings:
            continue
        if isinstance(action, argparse._StoreFalseAction):
            continue
        actions.setdefault(action.dest, action)
    return actions


def _describe(action: argparse.Action) -> str:
    kind = getattr(action.type, "__name__", None) or "a value"
    if action.choices:
        kind = f"one of {list(action.choices)}"
    elif kind == "string_to_bool":
        kind = "a boolean (true/false)"
    return f"a list of {kind}" if action.nargs == "+" else kind


def _coerce_one(value: Any, action: argparse.Action, key: str, where: str) -> Any:
    kind = action.type
    name = getattr(kind, "__name__", "")

    def wrong(reason: str = "") -> RecipeError:
        return RecipeError(
            f"{where}`{key}` should be {_describe(action)}, got {value!r} ({type(value).__name__}){reason}."
        )

    if value is None:
        return None
    if name == "string_to_bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return kind(value)
            except argparse.ArgumentTypeError:
                raise wrong() from None
        raise wrong()
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise wrong()
        try:
            return int(value)
        except ValueError:
            raise wrong() from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong()
        try:
            return float(value)  # YAML reads 5e-5 (no dot) as a string
        except ValueError:
            raise wrong() from None
    if action.choices:
        candidate = kind(value) if callable(kind) and isinstance(value, str) else value
        if candidate not in action.choices and value not in action.choices:
            if isinstance(value, bool):
                raise wrong('; YAML reads an unquoted no/yes/on/off as a boolean, so quote it: "no"')
            raise wrong()
        return value
    if kind is str:
        if isinstance(value, dict):
            return value  # `dict | str` fields (lr_scheduler_kwargs, fsdp_config, ...) take a mapping in a file
        if isinstance(value, (list, bool)):
            raise wrong()
        return str(value)
    return value


def _coerce(value: Any, action: argparse.Action, key: str, where: str) -> Any:
    if action.nargs == "+" and value is not None:
        values = value if isinstance(value, list) else [value]
        return [_coerce_one(v, action, key, where) for v in values]
    if isinstance(value, list) and action.nargs != "+":
        if key in list_valued_keys():
            return [_coerce_one(v, action, key, where) for v in value]  # `report_to: [tensorboard, wandb]`
        raise RecipeError(f"{where}`{key}` should be {_describe(action)}, got the list {value!r}.")
    return _coerce_one(value, action, key, where)


def check_recipe_values(values: dict[str, Any], *, source: str | None = None) -> dict[str, Any]:
    """Check every key of a flat recipe mapping and coerce its value to the field's type.

    Raises:
        RecipeError: naming the first unknown key (with the closest valid keys), a missing required
            key, or a key whose value has the wrong type.
    """
    where = f"Recipe {source}: " if source else "Recipe: "
    parser = recipe_parser()
    actions = _arguments_by_key(parser)
    unknown = [key for key in values if key not in actions]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(actions), n=3)
        hint = f" Did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
        more = f" (and {len(unknown) - 1} more unknown: {unknown[1:]})" if len(unknown) > 1 else ""
        raise RecipeError(
            f"{where}unknown key `{key}`{more}.{hint} Keys are the fields of ModelArguments, DataArguments and "
            "UnitScaleTrainingArguments; `hf-unitscale train --help` lists them."
        )
    missing = [dest for dest, action in actions.items() if action.required and values.get(dest) is None]
    if missing:
        raise RecipeError(f"{where}missing required key `{missing[0]}`: {actions[missing[0]].help}")
    return {key: _coerce(value, actions[key], key, where) for key, value in values.items()}


def packaged_recipes() -> list[str]:
    """The names of the recipes shipped in the package (`hf_unitscale/recipes/<name>.yaml`)."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """The recipe file `name_or_path` names: the file itself if it exists, else the packaged recipe of that name
    (`text_classification`, `text_classification.yaml` or `.yml` → `hf_unitscale/recipes/text_classification.yaml`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = Path(name_or_path)
    packaged = RECIPES_DIR / f"{name.stem}.yaml"
    if name.parent == Path(".") and name.suffix in ("", *RECIPE_SUFFIXES) and packaged.is_file():
        return packaged
    moved = (
        f" The recipes moved into the package: run `hf-unitscale train {name.stem}`, or copy {packaged} to edit it."
        if packaged.is_file()
        else ""
    )
    raise RecipeError(
        f"Recipe file {str(name_or_path)!r} does not exist, nor is it the name of a packaged recipe; give a YAML "
        f"file or one of {', '.join(packaged_recipes())} (e.g. `hf-unitscale train text_classification`).{moved}"
    )


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The flat mapping of a YAML (or JSON) recipe file, or of a packaged recipe given by name (`resolve_recipe`)."""
    import yaml

    path = resolve_recipe(path)
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe {path} should be a mapping of `key: value` lines, got a {type(values).__name__}.")
    nested = [k for k, v in values.items() if isinstance(v, dict) and k not in mapping_keys()]
    if nested:
        raise RecipeError(
            f"Recipe {path}: `{nested[0]}` is a section, but recipes are flat `key: value` files "
            "(HfArgumentParser); move its keys to the top level."
        )
    return values


def load_recipe(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply `overrides` (e.g. from the command line), check it and build the arguments.

    Args:
        path: a flat YAML recipe, or the name of a packaged recipe (`packaged_recipes()`); None to build from
            `overrides` alone.
        overrides: keys that replace the file's, same names and types (strings are converted).

    Raises:
        RecipeError: a key is unknown, missing or of the wrong type; the message names it.
    """
    path = resolve_recipe(path) if path is not None else None
    values = read_recipe_file(path) if path is not None else {}
    values.update(overrides or {})
    source = str(path) if path is not None else None
    values = check_recipe_values(values, source=source)
    parser = recipe_parser()
    try:
        model_args, data_args, training_args = parser.parse_dict(values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"Recipe {source or ''}: {err}") from err
    if model_args.task is not None and model_args.task not in TASKS:
        raise RecipeError(f"Recipe {source or ''}: `task` should be one of {TASKS}, got {model_args.task!r}.")
    if data_args.max_seq_length < 2:
        raise RecipeError(
            f"Recipe {source or ''}: `max_seq_length` should be at least 2, got {data_args.max_seq_length}."
        )
    for key, hint in (("max_train_samples", ""), ("max_eval_samples", "; `eval_split: null` skips evaluation")):
        count = getattr(data_args, key)
        if count is not None and count < 1:
            raise RecipeError(
                f"Recipe {source or ''}: `{key}` should be at least 1, or null for every row, got {count}{hint}."
            )
    if data_args.scale_plot_batches < 1:
        raise RecipeError(
            f"Recipe {source or ''}: `scale_plot_batches` should be at least 1, got {data_args.scale_plot_batches}; "
            "set `scale_plot: null` to skip the scale plot."
        )
    _check_metrics(data_args.metrics, source)
    return Recipe(model_args, data_args, training_args, source)


def _check_metrics(names: list[str], source: str | None) -> None:
    """Each metric is a shipped one (or the path of an `evaluate` metric script), checked before training starts."""
    from .metrics import METRICS

    for name in names or ():
        if name in METRICS or Path(name).exists():
            continue
        close = difflib.get_close_matches(name, METRICS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise RecipeError(
            f"Recipe {source or ''}: `metrics` should list shipped metrics, one of {list(METRICS)} (or paths of "
            f"`evaluate` metric scripts), got {name!r}.{hint}"
        )
