"""Why `calib_raw` trains below fp32 on SmolLM2 in `fp8_quality.py`: weights on E4M3 rounding midpoints.

The SmolLM2 weights we ship are dequantized from a Q4_1 GGUF, W = d·q + m with 16 levels per block
of 32. Many of those values are exact E4M3 rounding midpoints, where round-to-nearest-even picks one
neighbour; any update, however small, that points at the other neighbour moves q(W) a whole E4M3
step (≈ 2⁻⁹ for the raw weights against an Adam step of lr). So with raw weights in E4M3 the first
updates jump far further than AdamW asked, a bigger effective learning rate on a few % of the weights.
Unit scaling divides by s = rms(W), not a power of two, which moves the grid off the midpoints.
torchao's dynamic scale 448/max|W| is not a power of two either; (1) counts what it leaves on midpoints.

Measured here, on the real SmolLM2 and Austen text:
  1. the fraction of matmul weights exactly on an E4M3 midpoint (and within lr of one): raw W, Ŵ = W/s
     and torchao's W·448/max|W|;
  2. one AdamW step of fp32, `calib_raw`, `ours` and `torchao_dynamic` (the variants of `fp8_quality.py`): the loss on
     two held-out batches before and after, with the FP8 forward and with every GEMM in fp32, and for
     `calib_raw` also with the weights that sat on a midpoint held at their old value.

    python benchmarks/e4m3_midpoints.py

Writes benchmarks/results/e4m3_midpoints.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8_quality  # noqa: E402

from hf_unitscale.convert import matmul_layers  # noqa: E402
from hf_unitscale.formats import get_format, round_trip  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
E4M3 = get_format("e4m3")


def e4m3(t: torch.Tensor) -> torch.Tensor:
    """t rounded to E4M3 (the library's saturating cast, as the FP8 forward applies it), in t's dtype."""
    return round_trip(t, E4M3)


def on_midpoint(w: torch.Tensor) -> torch.Tensor:
    """True where the E4M3 value of w changes between the next float below and the next float above it."""
    up = torch.nextafter(w, torch.full_like(w, float("inf")))
    down = torch.nextafter(w, torch.full_like(w, float("-inf")))
    return e4m3(up) != e4m3(down)


def midpoint_fractions(model, lr):
    """Over the matmul weights (not the embedding): fraction exactly on a midpoint and within one Adam step of one,
    for raw W, Ŵ = W/s and torchao's W·k (its dynamic per-tensor scale k = 448 / max|W|, as torchao rounds it)."""
    counts = {"raw": [0, 0], "unit": [0, 0], "torchao": [0, 0]}
    total = 0
    for name, param in model.named_parameters():
        if param.dim() != 2 or "embed" in name:
            continue
        w = param.detach().float()
        s = w.square().mean().sqrt()
        k = (E4M3.max / w.abs().max().double()).float()
        for key, weights, step in (("raw", w, lr), ("unit", w / s, lr / s), ("torchao", w * k, lr * k)):
            counts[key][0] += on_midpoint(weights).sum().item()
            counts[key][1] += (e4m3(weights + step) != e4m3(weights - step)).sum().item()
        total += w.numel()
    return {
        f"{key}_{what}": value / total
        for key, (exact, near) in counts.items()
        for what, value in (("on_midpoint", exact), ("within_one_step", near))
    }


@torch.no_grad()
def losses(model, batches):
    model.eval()
    return [model(**batch).loss.item() for batch in batches]


def losses_in_fp32(variant, model, task, batches):
    with fp8_quality.in_full_precision(variant, model, task, 0) as served:
        return losses(served, batches)


def one_step(variant, task, calibration, step_batch, held_out, lr):
    model = fp8_quality.build_variant(variant, task, 0, calibration, fp8_readout=False)
    result = {"before": losses(model, held_out), "before_fp32_gemms": losses_in_fp32(variant, model, task, held_out)}
    layers = {f"{name}.weight" for name in matmul_layers(model)}  # empty for torchao: it is not unit-scaled
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in layers}
    optimizer = fp8_quality.optimizer_for(model, lr, weight_decay=0.01)
    model.train()
    model(**step_batch).loss.backward()
    optimizer.step()
    result["after"] = losses(model, held_out)
    result["after_fp32_gemms"] = losses_in_fp32(variant, model, task, held_out)
    if variant == "calib_raw":
        moved = [(e4m3(p.detach()) != e4m3(before[n])) for n, p in model.named_parameters() if n in layers]
        result["fraction_of_e4m3_values_moved"] = sum(m.sum().item() for m in moved) / sum(m.numel() for m in moved)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in layers:
                    held = on_midpoint(before[name])
                    param[held] = before[name][held]
        result["after_midpoint_weights_held"] = losses(model, held_out)
    return result


def markdown(result, command):
    f = result["midpoints"]
    lines = [
        "# E4M3 rounding midpoints in the SmolLM2 weights",
        "",
        f"`{command}` (SmolLM2-135M dequantized from Q4_1, Austen text, batch 8 × 64 tokens, one AdamW step at "
        f"lr {result['lr']}).",
        "",
        "| matmul weights | exactly on an E4M3 rounding midpoint | within one Adam step of one |",
        "|---|---|---|",
        f"| raw W | {100 * f['raw_on_midpoint']:.4g}% | {100 * f['raw_within_one_step']:.4g}% |",
        f"| unit-scaled Ŵ = W/s | {100 * f['unit_on_midpoint']:.4g}% | {100 * f['unit_within_one_step']:.4g}% |",
        f"| torchao's W·448/max\\|W\\| | {100 * f['torchao_on_midpoint']:.4g}% "
        f"| {100 * f['torchao_within_one_step']:.4g}% |",
        "",
        "Loss on two held-out batches (mean), before and after one step:",
        "",
        "| variant | before | after | change | after, every GEMM in fp32 | change, GEMMs in fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in result["steps"].items():

        def mean(key, r=r):
            return sum(r[key]) / len(r[key])

        lines.append(
            f"| {variant} | {mean('before'):.4f} | {mean('after'):.4f} | {mean('after') - mean('before'):+.4f} "
            f"| {mean('after_fp32_gemms'):.4f} | {mean('after_fp32_gemms') - mean('before_fp32_gemms'):+.4f} |"
        )
    raw = result["steps"]["calib_raw"]
    held = sum(raw["after_midpoint_weights_held"]) / 2
    lines += [
        "",
        f"`calib_raw`: the step changed the E4M3 value of {raw['fraction_of_e4m3_values_moved']:.3%} of the matmul "
        f"weights. With the weights that sat on a midpoint held at their old value, the loss after the step is "
        f"{held:.4f} (change {held - sum(raw['before']) / 2:+.4f}).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=2.5e-5, help="fp8_quality's first step: lr 5e-5 at warmup 1/2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task_parser = argparse.ArgumentParser()
    fp8_quality.add_task_arguments(task_parser)  # the task's other options at their defaults
    task_args = task_parser.parse_args(["--lm-seq-len", "64", "--lm-eval-seq-len", "64", "--lm-batch-size", "8"])
    task_args.lm_steps, task_args.lm_eval_size = 1, 1  # 1·8 + 64 = 72 training blocks to draw the 7 batches from
    task = fp8_quality.LanguageModelTask(task_args)
    batches = list(task.train_batches(0, 7))
    calibration, step_batch, held_out = batches[:4], batches[4], batches[5:]
    result = {
        "lr": args.lr,
        "midpoints": midpoint_fractions(task.model(0), args.lr),
        "steps": {
            v: one_step(v, task, calibration, step_batch, held_out, args.lr)
            for v in ("fp32", "calib_raw", "ours", "torchao_dynamic")
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e4m3_midpoints.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python benchmarks/e4m3_midpoints.py" + (" " + " ".join(argv) if argv else "")
    (args.out / "e4m3_midpoints.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main(sys.argv[1:])
