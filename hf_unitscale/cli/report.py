"""`hf-unitscale report`: per-layer scale table in the terminal and a log-scale PNG (see `analysis.py`).

Real text or seeded random token ids, with labels that make the loss the model's training loss: see
`report_batches.py`, which imports torch only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .utils import CommandError, add_model_class_argument, load_model, load_tokenizer

logger = logging.getLogger(__name__)  # the standard library's: `hf-unitscale --help` does not load transformers


def report_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="per-layer scale table and PNG plot (W, Ŵ, x, g, x/a, g/c vs the FP8 ranges)",
        description="Measure, per unit-scaled layer, rms(W) and rms(Ŵ), and with hooks on real batches the RMS of "
        "layer inputs x and output gradients g (non-zero elements), then calibrate a, c (a checkpoint's own when it "
        "has calibrated ones) and measure the FP8 operands x/a and g/c. Prints a table and writes a log-scale PNG "
        "with the E4M3/E5M2 ranges shaded.",
    )
    parser.add_argument("model", help="model folder, Hub id, or embedded:minilm / embedded:smollm2")
    parser.add_argument(
        "--output",
        "-o",
        default="scales.png",
        help="PNG to write; .png is added to a name without a suffix (default: %(default)s)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write the table as JSON to this file")
    add_model_class_argument(parser)
    parser.add_argument(
        "--text-file", "--text_file", dest="text_file", default=None, help="text to measure on, one example per line"
    )
    parser.add_argument(
        "--num-batches",
        "--num_batches",
        dest="num_batches",
        type=int,
        default=1,
        help="batches to measure on (and as many to calibrate on) (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=8,
        help="examples per batch (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        "--max_length",
        dest="max_length",
        type=int,
        default=64,
        help="tokens per example (default: %(default)s)",
    )
    parser.add_argument(
        "--no-calibrate",
        "--no_calibrate",
        dest="calibrate",
        action="store_false",
        help="skip calibration (no x/a, g/c)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of a newly initialized head and of the random batches and labels (default: %(default)s)",
    )
    parser.set_defaults(func=report_command)
    return parser


def report_command(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from ..analysis import format_scale_table, plot_scale_report, scale_report
    from ..tasks import position_limit
    from .report_batches import label_kind, report_batches, warn_about_short_texts

    if args.num_batches < 1 or args.batch_size < 1 or args.max_length < 2:
        raise CommandError("--num-batches and --batch-size should be ≥ 1 and --max-length ≥ 2.")
    if args.text_file and not Path(args.text_file).is_file():
        raise CommandError(f"--text-file {args.text_file} does not exist; give a text file, one example per line.")
    for flag, path, example in (("--output", args.output, "scales.png"), ("--json", args.json_path, "scales.json")):
        if path is not None and Path(path).is_dir():  # before measuring, not after the PNG is written
            raise CommandError(f"{flag} {path} is a folder; give a file to write, e.g. {Path(path) / example}.")
    output = Path(args.output)
    if not output.suffix:  # matplotlib would add its default format's, and we would name the file without it
        output = output.with_name(f"{output.name}.png")
    # a head the checkpoint lacks (a classifier on a bare encoder) is initialized from torch's global RNG
    set_seed(args.seed)
    model = load_model(args.model, args.model_class)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None and args.text_file:
        raise CommandError(
            f"--text-file needs a tokenizer, and {args.model!r} has no tokenizer files; save the model's tokenizer "
            "into it, or leave out --text-file to measure on random token ids."
        )
    limit = position_limit(model.config, tokenizer)
    if limit is not None and args.max_length > limit:  # as `train` clamps `max_seq_length`
        logger.warning(
            f"--max-length {args.max_length} is more than the model takes ({limit} positions); using {limit}."
        )
        args.max_length = limit
    if tokenizer is None:
        print(f"{args.model} has no tokenizer: measuring on random token ids (seeded by --seed), not on text.")
    batches = report_batches(model, tokenizer, args)
    warn_about_short_texts(model, tokenizer, batches, args)
    measure, calibration = batches[: args.num_batches], batches[args.num_batches :]
    if label_kind(model) is None:
        print(f"{type(model).__name__} has no loss head: gradients come from the proxy loss sum(logits²)/2/rows.")
    report = scale_report(model, measure, calibrate=args.calibrate, calibration_batches=calibration)
    print(format_scale_table(report))
    plot_scale_report(report, output, title=f"{args.model}: tensor scales against the FP8 ranges")
    print(f"Wrote {output}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
        print(f"Wrote {args.json_path}")
    return 0
