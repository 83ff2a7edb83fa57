"""`hf-unitscale convert`: model folder / Hub id → unit-scaled or merged checkpoint folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .utils import (
    add_model_class_argument,
    add_overwrite_argument,
    check_output_dir,
    load_model,
    write_model_folder,
)


def convert_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="unit-scale a model and save it (unit-scaled or merged format)",
        description="Load a model (any checkpoint format), unit-scale it (s = rms(W), a power of two for 16-bit "
        "weights; Ŵ = W/s; the function is unchanged) and save it. `unit-scaled` stores Ŵ, s and the operand scales "
        "a, c exactly (Ŵ may be stored in bf16 or FP8 since it has unit scale); `merged` stores a plain "
        "transformers checkpoint W = s·Ŵ with the scales recorded in config.json. Load either with "
        "`hf_unitscale.from_pretrained`.",
    )
    parser.add_argument("model", help="model folder, Hub id, or embedded:minilm / embedded:smollm2")
    parser.add_argument("output_dir", help="folder to write the converted checkpoint to")
    parser.add_argument(
        "--format",
        "--checkpoint-format",
        "--checkpoint_format",
        dest="checkpoint_format",
        choices=("unit-scaled", "merged"),
        default="unit-scaled",
        help="checkpoint format to write (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-dtype",
        "--weight_dtype",
        dest="weight_dtype",
        choices=("float32", "bfloat16", "e4m3"),
        help="storage dtype of Ŵ in the unit-scaled format (default: float32); a merged checkpoint is written in the "
        "model's dtype, which this may only name (nothing is cast)",
    )
    add_overwrite_argument(parser)
    add_model_class_argument(parser)
    parser.set_defaults(func=convert_command)
    return parser


def convert_command(args: argparse.Namespace) -> int:
    from ..checkpoint import read_weight_dtype
    from ..convert import unit_scaled_modules
    from ..hub import save_pretrained

    check_output_dir(args.model, args.output_dir, args.overwrite)
    model = load_model(args.model, args.model_class)
    tokenizer = write_model_folder(
        args,
        lambda: save_pretrained(
            model, args.output_dir, checkpoint_format=args.checkpoint_format, weight_dtype=args.weight_dtype
        ),
    )
    config = json.loads((Path(args.output_dir).expanduser() / "config.json").read_text(encoding="utf-8"))
    stored_dtype = read_weight_dtype(config)  # as saved: None for merged (the model's dtype)
    print(
        f"Converted {type(model).__name__} ({len(unit_scaled_modules(model))} unit-scaled modules) → "
        f"{args.output_dir} [{args.checkpoint_format}"
        f"{', Ŵ in ' + stored_dtype if stored_dtype else ''}"
        f"{', with tokenizer' if tokenizer is not None else ''}]"
    )
    return 0
