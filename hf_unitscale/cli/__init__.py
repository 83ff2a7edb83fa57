"""The `hf-unitscale` command: one small module per subcommand (accelerate / huggingface_hub style).

    hf-unitscale convert MODEL OUTPUT_DIR [--format unit-scaled|merged] [--weight-dtype float32|bfloat16|e4m3]
                         [--overwrite]
    hf-unitscale merge UNIT_SCALED_DIR OUTPUT_DIR [--overwrite]
    hf-unitscale report MODEL [--output scales.png] [--json scales.json]
    hf-unitscale train RECIPE.yaml|RECIPE_NAME [--any_recipe_key VALUE ...]

Each module exports `X_command_parser(subparsers)`, which adds the subcommand and binds
`X_command(args)` with `set_defaults(func=...)`; `main` parses and dispatches. The modules import torch and
transformers inside the command functions only, and `train` builds its recipe flags when it is used
(`DeferredParentParser`), so that `hf-unitscale --help` and argument errors print at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from .convert import convert_command_parser
from .deferred_parser import DeferredParentParser
from .merge import merge_command_parser
from .report import report_command_parser
from .train import train_command_parser
from .utils import CommandError

__all__ = ["CommandError", "build_parser", "main"]

TRACEBACK_VARIABLE = "HF_UNITSCALE_TRACEBACK"  # set to 1: errors raise with their traceback instead of one line

DESCRIPTION = """\
Unit scaling for pretrained Hugging Face models: every weight W is stored as s·Ŵ with s = rms(W)
and rms(Ŵ) = 1 (s a power of two for 16-bit weights), the scale moved into the computation, the
model's function unchanged.

commands:
  convert   load a model (folder, Hub id or embedded:minilm / embedded:smollm2), unit-scale it and
            save it as a unit-scaled checkpoint (Ŵ, s; bf16/FP8 storage possible) or a merged one
  merge     turn a unit-scaled checkpoint back into a plain transformers checkpoint (W = s·Ŵ)
  report    per-layer scale table (W, Ŵ, inputs x, output gradients g, and x/a, g/c after
            calibration) in the terminal and a log-scale PNG with the E4M3/E5M2 ranges shaded
  train     fine-tune with UnitScaleTrainer from a YAML recipe file or a packaged recipe's name
            (`hf-unitscale train text_classification`; `hf-unitscale train --help` lists them); any
            recipe key can be overridden on the command line, e.g. --max_steps 5 or --max-steps 5

Run `hf-unitscale COMMAND --help` for a command's options. Errors print one line (exit status 2);
HF_UNITSCALE_TRACEBACK=1 raises them with their traceback.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-unitscale", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # the command parsers can defer flags that take long to build (`train`'s recipe keys) until they are used
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=DeferredParentParser
    )
    for add in (convert_command_parser, merge_command_parser, report_command_parser, train_command_parser):
        add(subparsers)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, program: str, command: str | None, unknown: list[str]) -> str:
    """'unrecognized arguments' with the command's closest flag for each mistyped one."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [o for action in subparsers.choices[command]._actions for o in action.option_strings] if command else []
    hints = [
        f"{flag} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(flag, options, n=1)) else flag
        for flag in unknown
        if flag.startswith("--")
    ]
    return f"unrecognized arguments: {' '.join(hints or unknown)}; `{program} --help` lists them all"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-unitscale`; returns the exit status (0 on success)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        program = " ".join(filter(None, ["hf-unitscale", args.command]))
        print(f"{program}: error: {_unrecognized(parser, program, args.command, unknown)}", file=sys.stderr)
        return 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    from ..embedded.fetching import FetchError
    from ..recipe import RecipeError

    own_user_errors = (CommandError, RecipeError, FetchError)
    try:
        return args.func(args) or 0
    except (*own_user_errors, ValueError, OSError, ImportError) as err:
        # user errors (a bad name, path, column or value; a failed download; a package the checkpoint needs): the
        # message, no traceback. These may also come from a bug deeper down: say how to see where it was raised.
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        hint = "" if isinstance(err, own_user_errors) else f" (set {TRACEBACK_VARIABLE}=1 for the traceback)"
        print(f"hf-unitscale {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
