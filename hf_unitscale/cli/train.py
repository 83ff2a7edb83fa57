"""`hf-unitscale train RECIPE.yaml` (or a packaged recipe's name): fine-tune with `UnitScaleTrainer` from a recipe.

    recipe (flat YAML) + command-line overrides → ModelArguments, DataArguments, UnitScaleTrainingArguments
    → evaluate the untrained model (baseline) → train (progress bar) → evaluate → save the model, metrics and
    trainer state → per-layer scale table and PNG (`analysis.py`) in `output_dir`

Every recipe key is also a flag (`--max_steps 5` or `--max-steps 5`), built from the dataclass
fields' help metadata by `HfArgumentParser`; flags given on the command line override the recipe, and
`null`/`none` is None for an optional key (YAML's `null`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

NULLS = ("null", "none")  # YAML's null on the command line, case-insensitive
# keys for which the string "none" means something (no integrations), and None does not
_NONE_IS_A_VALUE = ("report_to",)


class _NullableChoices(tuple):
    """Choices that also admit None (`--task null`), listed without it in `--help`."""

    def __contains__(self, item: object) -> bool:
        return item is None or tuple.__contains__(self, item)


def _names_a_recipe(text: str) -> bool:
    """A recipe file's path (`*.yaml`, `*.yml`) or a packaged recipe's name (`text_classification`)."""
    from ..recipe import RECIPE_SUFFIXES, packaged_recipes

    return text.lower().endswith(RECIPE_SUFFIXES) or text in packaged_recipes()


def _flag_type(action: argparse.Action, nullable: bool):
    """`action.type`, plus `null`/`none` → None for an optional key, and a clear error when a flag that
    takes a variable number of values swallows the recipe path."""
    convert = action.type
    flag = action.option_strings[0]

    def parse(text: str) -> Any:
        if nullable and text.lower() in NULLS:
            return None
        if action.nargs in ("?", "+", "*") and _names_a_recipe(text):
            raise argparse.ArgumentTypeError(
                f"took the recipe {text!r} as its value; put the recipe first: `hf-unitscale train {text} {flag} ...`"
            )
        return text if convert is None else convert(text)

    parse.__name__ = getattr(convert, "__name__", "str")  # argparse's "invalid int value" names the type
    return parse


def _override_parser() -> argparse.ArgumentParser:
    """The recipe's flags, with no defaults and nothing required: only what the user types is returned.

    An optional key also takes `null` (or `none`) for None, as in YAML, and a `str | list[str]` key takes
    one value or several.
    """
    from ..recipe import list_valued_keys, optional_keys, recipe_parser

    parser = recipe_parser(add_help=False)
    nullable = optional_keys() - set(_NONE_IS_A_VALUE)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
        if not action.option_strings or isinstance(action, argparse._StoreFalseAction):
            continue
        if action.dest in list_valued_keys() and action.nargs is None:
            action.nargs = "+"  # `str | list[str]` fields: `--report_to tensorboard wandb`, as in a recipe
        action.type = _flag_type(action, action.dest in nullable)
        if action.choices is not None and action.dest in nullable:
            action.choices = _NullableChoices(action.choices)
    return parser


def train_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..recipe import RECIPES_DIR, packaged_recipes

    parser = subparsers.add_parser(
        "train",
        deferred_parent=_override_parser,  # a DeferredParentParser (see `build_parser`): built when `train` runs
        help="fine-tune with UnitScaleTrainer from a YAML recipe",
        description="Fine-tune with UnitScaleTrainer from a flat YAML recipe: a file, or a packaged recipe by name "
        "(see `recipe` below). Prints evaluation metrics before and after training and writes the model and a scale "
        "plot to `output_dir`. Every recipe key below can also be given as a flag after the recipe, which overrides "
        "the recipe; `null` (or `none`) gives an optional key the value None, as in YAML.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a mistyped key (`--lr_rul`) is an error, not a prefix of `--lr_rule`
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help=f"a YAML recipe file, or the name of one in {RECIPES_DIR} (copy one out to edit it): "
        f"{', '.join(packaged_recipes())}",
    )
    parser.set_defaults(func=train_command)

    def one_line_error(message: str) -> None:  # argparse's own prints the usage of every recipe key first
        parser.exit(2, f"hf-unitscale train: error: {message}; `hf-unitscale train --help` lists every key\n")

    parser.error = one_line_error
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {k: v for k, v in vars(args).items() if k not in ("recipe", "func", "command")}
    return {k: None if isinstance(v, list) and None in v else v for k, v in overrides.items()}  # `--label_names null`


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    return "—" if value is None else str(value)


def metrics_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """Evaluation metrics before and after training, side by side (runtime bookkeeping left out)."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "preparation_time")
    keys = [k for k in after if not k.endswith(skip)]
    rows = [("metric", "before training", "after training")]
    rows += [(k.removeprefix("eval_"), _fmt((before or {}).get(k)), _fmt(after[k])) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_recipe(recipe) -> dict[str, Any]:
    """Train and evaluate one parsed recipe; returns {"before", "after", "train", "scale_plot", "seconds"}."""
    from transformers import set_seed

    from ..checkpoint import operand_scales
    from ..precision import full_precision
    from ..tasks import add_perplexity, setup_task
    from ..trainer import UnitScaleTrainer

    start = time.perf_counter()
    training = recipe.training
    set_seed(training.seed)
    setup = setup_task(recipe.model, recipe.data, seed=training.seed)
    evaluate = setup.eval_dataset is not None and len(setup.eval_dataset) > 0
    trainer = UnitScaleTrainer(
        model=setup.model,
        args=training,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset if evaluate else None,
        data_collator=setup.data_collator,
        processing_class=setup.tokenizer,
        compute_metrics=setup.compute_metrics if evaluate else None,
        preprocess_logits_for_metrics=setup.preprocess_logits_for_metrics if evaluate else None,
    )
    causal = setup.task == "causal-lm"
    say = print if trainer.is_world_process_zero() else (lambda *a, **k: None)  # one copy of each line
    before = None
    if evaluate and recipe.data.baseline_eval:
        # FP8 scales are calibrated when training starts; with a = c = 1 the GEMMs would be naive FP8 casts
        uncalibrated = training.fp8 and not operand_scales(trainer.model)
        note = " in full precision (FP8 scales are calibrated when training starts)" if uncalibrated else ""
        say(f"Evaluating the untrained model on {len(setup.eval_dataset)} examples (baseline){note}…")
        with full_precision(trainer.model) if uncalibrated else contextlib.nullcontext():
            before = trainer.evaluate()
        if causal:
            add_perplexity(before)
    say(
        f"Training on {len(setup.train_dataset)} examples ({setup.task}, lr rule `{training.lr_rule}`, "
        f"fp8={training.fp8})…"
    )
    train_output = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = {}
    if evaluate:
        after = trainer.evaluate()
        if causal:
            add_perplexity(after)
        say(metrics_table(before, after))
    output_dir = Path(training.output_dir)
    trainer.save_model(str(output_dir))  # in `save_format`: merged (plain W = s·Ŵ) or unit-scaled (Ŵ, s, a, c)
    # as run_glue/run_clm: train_results.json, eval_results.json, all_results.json and trainer_state.json
    trainer.save_metrics("train", train_output.metrics)
    if after:
        trainer.save_metrics("eval", after)
    trainer.save_state()
    plot_path = None
    if recipe.data.scale_plot:
        # every rank measures: calibration averages its statistics over ranks (a collective)
        plot_path = _scale_plot(trainer.model, setup, recipe, output_dir, write=trainer.is_world_process_zero())
    result = {
        "task": setup.task,
        "before": before,
        "after": after,
        "train": train_output.metrics,
        "scale_plot": str(plot_path) if plot_path else None,
        "seconds": time.perf_counter() - start,
    }
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe_results.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return result


def _scale_plot(model, setup, recipe, output_dir: Path, *, write: bool = True) -> Path | None:
    from ..analysis import format_scale_table, plot_scale_report, scale_report
    from ..tasks import scale_batches

    count, size = recipe.data.scale_plot_batches, recipe.training.per_device_eval_batch_size
    measure = scale_batches(setup, count, size)
    calibration = scale_batches(setup, count, size, from_train=True)
    report = scale_report(model, measure, calibration_batches=calibration)
    if not write:
        return None
    path = output_dir / recipe.data.scale_plot
    plot_scale_report(report, path, title=f"{recipe.model.model_name_or_path} after fine-tuning: scales vs FP8 ranges")
    (path.with_suffix(".json")).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    print(format_scale_table(report))
    print(f"Wrote the scale plot {path} (table: {path.with_suffix('.json')})")
    return path


def train_command(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe
    from .utils import check_local_path, check_model_path, check_not_a_file

    recipe = load_recipe(args.recipe, _overrides(args))
    check_not_a_file(recipe.training.output_dir, "`output_dir`")  # not after training, when the model is saved
    check_model_path(recipe.model.model_name_or_path, "`model_name_or_path`")
    if recipe.model.tokenizer_name:
        check_local_path(recipe.model.tokenizer_name, "`tokenizer_name`")
    result = run_recipe(recipe)
    if recipe.training.process_index == 0:  # one line under DDP, as every other print
        print(f"Done in {result['seconds']:.0f} s; model and results in {recipe.training.output_dir}")
    return 0
