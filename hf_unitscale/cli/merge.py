"""`hf-unitscale merge`: unit-scaled checkpoint folder → plain transformers checkpoint (W = s·Ŵ)."""

from __future__ import annotations

import argparse

from .utils import (
    add_model_class_argument,
    add_overwrite_argument,
    check_model_path,
    check_output_dir,
    load_model,
    write_model_folder,
)


def merge_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="turn a unit-scaled checkpoint into a plain transformers one",
        description="Load a unit-scaled (or merged) checkpoint, multiply every scale back in (W = s·Ŵ), restore the "
        "original layer classes and save a plain transformers checkpoint with no trace of hf_unitscale: any "
        "transformers install loads it with `from_pretrained` and gets the same function.",
    )
    parser.add_argument("model", help="unit-scaled checkpoint folder or Hub id")
    parser.add_argument("output_dir", help="folder to write the plain checkpoint to")
    add_overwrite_argument(parser)
    add_model_class_argument(parser)
    parser.set_defaults(func=merge_command)
    return parser


def merge_command(args: argparse.Namespace) -> int:
    from ..convert import merge_unit_scale
    from ..hub import remove_stale_weights
    from ..model_card import remove_model_card_section

    check_model_path(args.model, "model")  # before the config read below takes a missing folder for a Hub id
    check_output_dir(args.model, args.output_dir, args.overwrite)
    model = _stored_weights_model(args.model, args.model_class)
    if model is None:
        model = load_model(args.model, args.model_class)
        merge_unit_scale(model)

    def save() -> None:
        remove_stale_weights(args.output_dir, "merged")  # transformers' own save replaces only its own shards
        model.save_pretrained(args.output_dir)
        remove_model_card_section(args.output_dir)  # the source's card, or an earlier convert's, says "unit-scaled"

    tokenizer = write_model_folder(args, save)
    with_tokenizer = ", with tokenizer" if tokenizer is not None else ""
    print(f"Merged {type(model).__name__} → {args.output_dir} [plain transformers checkpoint{with_tokenizer}]")
    return 0


def _stored_weights_model(name_or_path: str, model_class: str | None):
    """A merged or plain checkpoint already stores W: loaded as plain transformers loads it, without its
    `unit_scaling` block (a round trip through W/s·s would move ~1 in 7 fp32 weights by one ulp). None for the
    formats that store Ŵ."""
    from transformers import AutoConfig

    from ..checkpoint import read_checkpoint_format
    from ..config import CONFIG_KEY
    from ..embedded import resolve_model_path
    from ..hub import concrete_model_class, resolve_model_class

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if read_checkpoint_format(config.to_dict()) not in (None, "merged"):
        return None
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return concrete_model_class(resolve_model_class(config, model_class), config).from_pretrained(path, config=config)
