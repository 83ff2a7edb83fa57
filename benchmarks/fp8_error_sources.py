"""Where the FP8 error of `fp8_quality.py` comes from: the E4M3 forward casts or the E5M2 gradient casts.

Two measurements at step 0, on the tasks, variants, seeds and calibration of `fp8_quality.py`:

1. Weight-gradient cosine to fp32, per layer, on a batch calibration never saw, with each cast on alone:

     fp8        E4M3 x and Ŵ, E5M2 output gradient g (fp8_quality.py's; E4M3 g in the *_e4m3 variants)
     g only     x and Ŵ exact, g/c cast to E5M2 (E4M3): the cast the static gradient scale c serves
     x, W only  x/a and Ŵ cast to E4M3 (in every GEMM that uses them), g exact

   For small independent errors 1 − cos adds up: (1 − cos_fp8) ≈ (1 − cos_g) + (1 − cos_xW).
   torchao's `Float8Linear` has no "g only": it requires both operands of a GEMM in one precision.
   `ours_headroom2`, `ours_budget` and `ours_e4m3` are `ours` calibrated with fp8_quality.py's
   `CALIBRATION_OPTIONS`, `ours_e4m3` with E4M3 output gradients (`FP8_FORMATS`), as is `torchao_e4m3`.

2. Forward error on held-out data: the mean over positions of KL(p_fp32 ‖ p_FP8) of the output
   distribution, how often the arg-max agrees, and the logits' relative error (MiniLM's fresh 2-way
   head gives a nearly flat distribution, so there the logits say more than the KL). `ours` is also
   run with every input scale a multiplied by the `--jitter` factors (operand RMS 1/f, inside
   [0.5, 2]): each is as valid a static scale as a = rms(x), so their spread is the resolution at
   which the variants' forward errors can be ranked.

    python benchmarks/fp8_error_sources.py --batch-size 16 --lm-steps 20 --lm-seq-len 64 --lm-eval-seq-len 32 \\
        --lm-eval-fraction 0.06 --lm-eval-batch-size 64   # the batches of fp8_quality.py's README run

Writes benchmarks/results/fp8_error_sources.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_quality import (  # noqa: E402
    TORCHAO,
    add_task_arguments,
    build_variant,
    gradient_fidelity,
    gradient_fidelity_reference,
    make_task,
    parse_task_arguments,
    start_batches,
    variant_formats,
)

from hf_unitscale.convert import matmul_layers  # noqa: E402
from hf_unitscale.precision import cast_statistics, set_precision, summarize_casts, track_casts  # noqa: E402

logger = logging.getLogger("fp8_error_sources")
VARIANTS = (
    "naive_fp8",
    "unit_uncal",
    "calib_raw",
    "ours",
    "ours_headroom2",
    "ours_budget",
    "ours_e4m3",
    "torchao_dynamic",
    "torchao_e4m3",
)


def cast_settings(variant):
    """(forward format, backward format) per setting of measurement 1, in the variant's formats."""
    forward, backward = variant_formats(variant)
    return {"fp8": (forward, backward), "g_only": (None, backward), "xw_only": (forward, None)}


def gradient_sources(task, args):
    """Per seed and variant: min and median over layers of the weight-gradient cosine, per cast setting."""
    rows = []
    for seed in range(args.seeds):
        calibration, batch = start_batches(task, seed, args.calibration_batches)
        reference = gradient_fidelity_reference(task.model(seed), batch)
        for variant in VARIANTS:
            model = build_variant(variant, task, seed, calibration, args.fp8_readout)
            settings = {"fp8": None} if variant in TORCHAO else cast_settings(variant)
            row = {"seed": seed, "variant": variant}
            for setting, formats in settings.items():
                if formats is not None:
                    set_precision(model, *formats, "simulate", full_precision_modules=[] if args.fp8_readout else None)
                    track_casts(model)
                cosines = [d["cosine"] for d in gradient_fidelity(model, reference, batch).values()]
                row[setting] = {"min": min(cosines), "median": statistics.median(cosines)}
                if setting == "g_only":
                    stats = cast_statistics(model)
                    row[setting]["g_underflow_pooled"] = summarize_casts(stats)["fp8/grad_output_underflow_fraction"]
                    row[setting]["g_underflow_worst"] = max(
                        s["grad_output"]["underflow_fraction"] for s in stats.values()
                    )
                if formats is not None:
                    track_casts(model, enabled=False)
            logger.info(f"  {task.name} seed {seed} {variant}: {row}")
            rows.append(row)
    return rows


@torch.no_grad()
def _logits(model, batches):
    model.eval()
    return [model(**batch).logits.float() for batch in batches]


def _forward_error(reference, got):
    """Mean KL(p_fp32 ‖ p_FP8) over output positions, arg-max agreement, and ‖Δlogits‖ / ‖logits‖."""
    kl = agree = count = diff_sq = ref_sq = 0.0
    for ref_logits, logits in zip(reference, got, strict=True):
        p, q = F.log_softmax(ref_logits, dim=-1), F.log_softmax(logits, dim=-1)
        kl += (p.exp() * (p - q)).sum(-1).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += p.shape[:-1].numel()
        diff_sq += (logits - ref_logits).square().sum().item()
        ref_sq += ref_logits.square().sum().item()
    return {"kl": kl / count, "top1_agreement": agree / count, "logit_rel_error": (diff_sq / ref_sq) ** 0.5}


def forward_sources(task, args):
    """KL(p_fp32 ‖ p_FP8) on held-out data per variant at seed 0, and for `ours` with input scales a·f."""
    first, _ = start_batches(task, 0, args.calibration_batches)
    batches = list(task.eval_batches())[: args.forward_batches]
    reference = _logits(task.model(0), batches)
    rows = {}
    for variant in VARIANTS:
        model = build_variant(variant, task, 0, first, args.fp8_readout)
        rows[variant] = _forward_error(reference, _logits(model, batches))
        logger.info(f"  {task.name} {variant}: {rows[variant]}")
        if variant != "ours":
            continue
        layers = [layer for layer in matmul_layers(model).values() if layer.precision is not None]
        calibrated = [layer.input_scale.clone() for layer in layers]
        for factor in args.jitter_list:
            for layer, a in zip(layers, calibrated, strict=True):
                layer.input_scale.copy_(a * factor)
            rows[f"ours, a × {factor:g}"] = _forward_error(reference, _logits(model, batches))
            logger.info(f"  {task.name} ours a×{factor:g}: {rows[f'ours, a × {factor:g}']}")
    return rows, sum(len(b["input_ids"]) for b in batches)


def _mean(values):
    return statistics.fmean(values)


def markdown(results):
    lines = [
        "# Where the FP8 error comes from",
        "",
        "Step 0, the models and calibration of `fp8_quality.py`; readout in fp32 unless the command says otherwise.",
    ]
    for task_name, result in results.items():
        lines += [
            "",
            f"## {task_name}",
            "",
            f"Command: `{result['command']}` ({result['minutes']:.1f} min, {result['threads']} CPU threads).",
            "",
            f"Weight-gradient cosine to fp32 per layer on one held-out batch per seed (seeds {result['seeds']}): "
            "the worst layer for each seed / the median layer (mean over seeds). x and Ŵ in E4M3; g in E5M2, "
            "in E4M3 for ours_e4m3 and torchao_e4m3.",
            "",
            "| variant | x, W + g | g only | x, W only | g-only underflow (pooled / worst layer) |",
            "|---|---|---|---|---|",
        ]
        for variant in dict.fromkeys(r["variant"] for r in result["gradients"]):  # a task run before a variant existed
            rows = [r for r in result["gradients"] if r["variant"] == variant]

            def cell(setting, rows=rows):
                if setting not in rows[0]:
                    return "n/a"
                worst = ", ".join(f"{r[setting]['min']:.3f}" for r in rows)
                return f"{worst} / {_mean(r[setting]['median'] for r in rows):.3f}"

            underflow = "n/a"
            if "g_only" in rows[0]:
                pooled = _mean(r["g_only"]["g_underflow_pooled"] for r in rows)
                worst = max(r["g_only"]["g_underflow_worst"] for r in rows)
                underflow = f"{100 * pooled:.3f}% / {100 * worst:.3f}%"
            lines.append(f"| {variant} | {cell('fp8')} | {cell('g_only')} | {cell('xw_only')} | {underflow} |")
        lines += [
            "",
            f"Forward error on {result['forward_examples']} held-out examples (seed 0): mean KL(p_fp32 ‖ p_FP8) "
            "over output positions, arg-max agreement with fp32, and the logits' relative error ‖Δ‖ / ‖fp32‖.",
            "",
            "| variant | KL | top-1 agreement | logits rel. error |",
            "|---|---|---|---|",
        ]
        for variant, row in result["forward"].items():
            lines.append(
                f"| {variant} | {row['kl']:.3g} | {row['top1_agreement']:.4f} | {row['logit_rel_error']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser)
    parser.add_argument(
        "--forward-batches", "--forward_batches", type=int, default=4, help="held-out eval batches for the KL"
    )
    parser.add_argument("--jitter", default="0.7,0.85,1.2,1.4", help="factors f for ours' input scales a·f")
    args, argv = parse_task_arguments(parser, argv)
    args.jitter_list = [float(f) for f in args.jitter.split(",") if f]
    results_path = args.out / "fp8_error_sources.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for task_key in args.tasks.split(","):
        start = time.perf_counter()
        task, task_args = make_task(task_key, args, parser)
        gradients = gradient_sources(task, task_args)
        forward, examples = forward_sources(task, task_args)
        results[task.name] = {
            "command": f"python benchmarks/fp8_error_sources.py {' '.join(argv)}",
            "minutes": (time.perf_counter() - start) / 60,
            "threads": torch.get_num_threads(),
            "seeds": list(range(args.seeds)),
            "args": {k: str(v) for k, v in vars(task_args).items()},
            "gradients": gradients,
            "forward": forward,
            "forward_examples": examples,
        }
        # written after every task, so a finished task survives a later one being interrupted
        results_path.write_text(json.dumps(results, indent=1))
        (args.out / "fp8_error_sources.md").write_text(markdown(results))
    print((args.out / "fp8_error_sources.md").read_text())


if __name__ == "__main__":
    main()
