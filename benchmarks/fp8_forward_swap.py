"""Whose FP8 forward, whose weights: why torchao's FP8-forward eval on SmolLM2 is ahead of ours while its weights are not.

In `fp8_quality.py`'s LM table, torchao's trained weights evaluate better than ours with each variant's own FP8
forward, and worse with every GEMM in fp32. This trains `ours` and `torchao_dynamic` exactly as that script does
(same seeds, data, steps, calibration) and evaluates each one's trained weights (merged W = s·Ŵ for ours) with
every forward: fp32 GEMMs, ours' static unit-scaled E4M3 (unit-scaled again and calibrated on the run's
calibration batches) and torchao's dynamic E4M3. Weights that are simply better score better in every column;
weights adapted to one FP8 grid score well only in their own forward.

    python benchmarks/fp8_forward_swap.py --tasks lm --seeds 3 --calibration-batches 4 --recalibrate-every 50 \\
        --count-every 10 --lm-steps 20 --lm-batch-size 8 --lm-seq-len 64 --lm-eval-size 2000 \\
        --lm-eval-seq-len 32 --lm-eval-batch-size 64 --lm-eval-fraction 0.06 --threads 2

Writes benchmarks/results/fp8_forward_swap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_quality import (  # noqa: E402
    TORCHAO,
    add_task_arguments,
    add_training_arguments,
    build_variant,
    evaluate,
    logger,
    make_task,
    parse_task_arguments,
    start_batches,
    train_one,
)

from hf_unitscale.checkpoint import merged_state_dict  # noqa: E402

TRAINED = ("ours", "torchao_dynamic")
FORWARDS = ("fp32", *TRAINED)


class _TrainedWeights:
    """`task` whose `model(seed)` is the task's model holding `state_dict` (plain transformers names)."""

    def __init__(self, task, state_dict):
        self.task, self.state_dict = task, state_dict

    def model(self, seed):
        model = self.task.model(seed)
        model.load_state_dict(self.state_dict)
        return model


def plain_state_dict(variant, model):
    """The trained weights under transformers' names: W = s·Ŵ for ours (any unit-scaled variant), Float8Linear's
    own weights for torchao."""
    state = model.state_dict() if variant in TORCHAO else merged_state_dict(model)
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def swap_one_seed(task, seed, args):
    """{trained variant: {forward: eval loss}}; the own forward and fp32 come from `train_one`'s evaluation."""
    calibration_batches, _ = start_batches(task, seed, args.calibration_batches)  # train_one's calibration
    losses = {}
    for variant in TRAINED:
        result, model = train_one(variant, task, seed, args)
        weights = _TrainedWeights(task, plain_state_dict(variant, model))
        losses[variant] = {"fp32": result["eval_loss_full_precision"], variant: result["eval_loss"]}
        for forward in TRAINED:
            if forward != variant:
                swapped = build_variant(forward, weights, seed, calibration_batches, args.fp8_readout)
                losses[variant][forward] = evaluate(swapped, task)["eval_loss"]
        logger.info(f"  seed {seed} weights of {variant}: {losses[variant]}")
    return losses


def markdown(result):
    seeds = result["seeds"]
    lines = [
        "# Whose FP8 forward, whose weights (SmolLM2 on Austen)",
        "",
        f"Command: `{result['command']}` ({result['minutes']:.1f} min, {result['threads']} CPU threads).",
        "",
        f"Eval loss on {result['eval']} of the weights each variant trained (seeds {seeds}, per seed and mean), "
        "evaluated with each forward.",
        "",
        "| weights trained by | " + " | ".join(f"{f} forward" for f in FORWARDS) + " |",
        "|---|" + "---|" * len(FORWARDS),
    ]
    for variant in TRAINED:
        cells = []
        for forward in FORWARDS:
            values = [result["losses"][str(seed)][variant][forward] for seed in seeds]
            cells.append(", ".join(f"{v:.4f}" for v in values) + f" / {statistics.fmean(values):.4f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser)
    add_training_arguments(parser)
    args, argv = parse_task_arguments(parser, argv)
    if args.tasks != "lm":
        parser.error("--tasks must be lm: the question is about SmolLM2's FP8-forward eval")
    task, args = make_task("lm", args, parser)
    args.seed_list = list(range(args.seeds))
    start = time.perf_counter()
    result = {"command": f"python benchmarks/fp8_forward_swap.py {' '.join(argv)}", "seeds": [], "losses": {}}
    result["eval"] = f"{args.eval_size} held-out sequences × {args.lm_eval_seq_len} tokens"
    for seed in args.seed_list:
        result["losses"][str(seed)] = swap_one_seed(task, seed, args)
        result["seeds"].append(seed)
        result.update(minutes=(time.perf_counter() - start) / 60, threads=torch.get_num_threads())
        # written after every seed, so finished seeds survive an interrupted run
        (args.out / "fp8_forward_swap.json").write_text(json.dumps(result, indent=1))
        (args.out / "fp8_forward_swap.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
