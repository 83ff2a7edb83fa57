"""How much of an FP8-forward eval comparison is where the E4M3 grid happens to sit under the weights?

Ŵ → m·Ŵ with s → s/m leaves every weight W = s·Ŵ, and so the fp32 function, unchanged (to fp32 rounding); only
the values the static forward rounds Ŵ to move. E4M3's grid repeats every factor 2, so m = 2^(k/K), k = 0..K−1,
are K draws of the same rounding at the same error budget (k = 0 is the model as it stands). For `ours` of
`fp8_quality.py` (or another unit-scaled variant, `--variant`; same seeds, data, calibration and training), at
step 0 and after training, this evaluates the FP8-forward eval loss at every shift, beside the same weights with
every GEMM in fp32 and with torchao's dynamic E4M3 forward. Where the shifts spread wider than a gap between
ours and torchao, one grid position cannot settle that gap: the mean over the shifts is the static forward's
typical loss. Seeds that start from the same pretrained weights start from the same draw.

    python benchmarks/e4m3_weight_grid.py --tasks lm --seeds 1 --calibration-batches 4 --recalibrate-every 50 \\
        --count-every 10 --lm-steps 20 --lm-batch-size 8 --lm-seq-len 64 --lm-eval-size 2000 \\
        --lm-eval-seq-len 32 --lm-eval-batch-size 64 --lm-eval-fraction 0.06 --threads 2

Writes benchmarks/results/e4m3_weight_grid.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_forward_swap import _TrainedWeights, plain_state_dict  # noqa: E402
from fp8_quality import (  # noqa: E402
    RECALIBRATED,
    add_task_arguments,
    add_training_arguments,
    build_variant,
    evaluate,
    evaluate_in_full_precision,
    logger,
    make_task,
    parse_task_arguments,
    start_batches,
    train_one,
)

from hf_unitscale import unit_scaled_modules  # noqa: E402
from hf_unitscale.convert import matmul_layers  # noqa: E402


@contextlib.contextmanager
def weight_grid_shifted(model, factor):
    """Inside: Ŵ → factor·Ŵ and s → s/factor for every weight a low-precision matmul layer casts (a tied weight
    once, every scale of it divided), so W = s·Ŵ is unchanged; restored exactly on exit."""
    cast = {id(layer.weight) for layer in matmul_layers(model).values() if layer.precision is not None}
    weights, scales = {}, []
    for module in unit_scaled_modules(model).values():
        for name in module.unit_scaled_weights:
            weight = getattr(module, name)
            if id(weight) in cast:
                weights.setdefault(id(weight), (weight, weight.clone()))
                scales.append((module.scale_of(name), module.scale_of(name).clone()))
    with torch.no_grad():
        for weight, _ in weights.values():
            weight.mul_(factor)
        for scale, _ in scales:
            scale.div_(factor)
    try:
        yield model
    finally:
        with torch.no_grad():
            for tensor, original in [*weights.values(), *scales]:
                tensor.copy_(original)


def grid_sweep(model, task, seed, calibration_batches, args):
    """Eval losses of `args.variant`'s weights: every GEMM in fp32, torchao's dynamic forward, and the variant's
    static forward per shift."""
    row = {"fp32_gemms": evaluate_in_full_precision(args.variant, model, task, seed)["eval_loss"]}
    weights = _TrainedWeights(task, plain_state_dict(args.variant, model))
    torchao = build_variant("torchao_dynamic", weights, seed, calibration_batches, args.fp8_readout)
    row["torchao_forward"] = evaluate(torchao, task)["eval_loss"]
    del torchao
    row["shifts"] = []
    for k in range(args.grid_shifts):
        with weight_grid_shifted(model, 2 ** (k / args.grid_shifts)):
            row["shifts"].append(evaluate(model, task)["eval_loss"])
    logger.info(f"  {task.name} seed {seed}: {row}")
    return row


def sweep_one_seed(task, seed, args):
    """{"step 0": row, "trained": row} for `args.variant` on `seed` (see `grid_sweep`)."""
    calibration_batches, _ = start_batches(task, seed, args.calibration_batches)
    untrained = build_variant(args.variant, task, seed, calibration_batches, args.fp8_readout)
    rows = {"step 0": grid_sweep(untrained, task, seed, calibration_batches, args)}
    del untrained
    result, trained = train_one(args.variant, task, seed, args)
    rows["trained"] = grid_sweep(trained, task, seed, calibration_batches, args)
    rows["trained"]["train_eval_loss"] = result["eval_loss"]  # fp8_quality.py's figure: must equal shift 0
    return rows


def markdown(result):
    shifts = result["grid_shifts"]
    lines = [
        "# Where the E4M3 grid sits under the weights",
        "",
        f"Eval loss of `{result['variant']}`' weights (step 0: converted and calibrated; trained: after"
        " `fp8_quality.py`'s run) with every GEMM in fp32, with torchao's dynamic E4M3 forward, and with its own"
        f" static E4M3 forward after Ŵ → m·Ŵ, s → s/m, m = 2^(k/{shifts}) (k = 0 is the model as it stands; the"
        " fp32 function is the same at every m). Spread: the largest minus the smallest static-forward loss over"
        " the shifts.",
    ]
    for task_name, task_result in result["tasks"].items():
        header = " | ".join(f"k = {k}" for k in range(shifts))
        lines += [
            "",
            f"## {task_name}",
            "",
            f"Command: `{task_result['command']}` ({task_result['minutes']:.1f} min, {result['threads']} CPU threads).",
            "",
            f"| seed, stage | GEMMs in fp32 | torchao forward | {header} | spread |",
            "|---|" + "---|" * (shifts + 3),
        ]
        for seed, rows in task_result["seeds"].items():
            for stage, row in rows.items():
                cells = [f"{row['fp32_gemms']:.4f}", f"{row['torchao_forward']:.4f}"]
                cells += [f"{loss:.4f}" for loss in row["shifts"]]
                spread = max(row["shifts"]) - min(row["shifts"])
                lines.append(f"| {seed}, {stage} | " + " | ".join(cells) + f" | {spread:.4f} |")
        gaps = [
            row["shifts"][0] - row["torchao_forward"] for rows in task_result["seeds"].values() for row in rows.values()
        ]
        lines += [
            "",
            f"Static forward at k = 0 minus torchao's forward, mean over rows: {statistics.fmean(gaps):+.4f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--variant", default="ours", choices=RECALIBRATED, help="the unit-scaled variant to shift")
    parser.add_argument("--grid-shifts", "--grid_shifts", type=int, default=8, help="shifts m = 2^(k/N), k < N")
    parser.add_argument(
        "--first-seed", "--first_seed", type=int, default=0, help="run seeds first-seed … first-seed + seeds − 1"
    )
    args, argv = parse_task_arguments(parser, argv)
    if args.grid_shifts < 2:
        parser.error(f"--grid-shifts must be at least 2 (k = 0 is the model as it stands), got {args.grid_shifts}")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    result = {"variant": args.variant, "grid_shifts": args.grid_shifts, "threads": torch.get_num_threads(), "tasks": {}}
    for task_key in args.tasks.split(","):
        start = time.perf_counter()
        task, task_args = make_task(task_key, args, parser)
        task_result = result["tasks"][task.name] = {
            "command": f"python benchmarks/e4m3_weight_grid.py {' '.join(argv)}",
            "seeds": {},
        }
        for seed in args.seed_list:
            task_result["seeds"][str(seed)] = sweep_one_seed(task, seed, task_args)
            task_result["minutes"] = (time.perf_counter() - start) / 60
            # written after every seed, so finished seeds survive an interrupted run
            (args.out / "e4m3_weight_grid.json").write_text(json.dumps(result, indent=1))
            (args.out / "e4m3_weight_grid.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
