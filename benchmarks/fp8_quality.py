"""FP8 fine-tuning quality: static unit scales against fp32, naive FP8 and torchao's dynamic scaling.

Fine-tunes the real MiniLM (all-MiniLM-L6-v2 + a fresh 2-way head) on VADER's movie-review
sentiment snippets and, with `--tasks lm`, the real SmolLM2-135M on Jane Austen, under six variants:

  fp32             the model as loaded, no conversion
  naive_fp8        the same E4M3/E5M2 casts on raw weights W, a = c = 1 (no scales at all)
  unit_uncal       unit-scaled weights Ŵ = W/s, a = c = 1 (weight rescaling only)
  calib_raw        raw weights W with calibrated a, c (calibration only)
  ours             unit-scaled Ŵ + calibrated a, c, recalibrated every `--recalibrate-every` steps
  torchao_dynamic  torchao `Float8Linear`, dynamic per-tensor amax scaling (emulated on CPU)

and, only when named in `--variants`, ours with other `calibrate` options, gradient format or GEMM backend, and a peer:

  ours_headroom2   `headroom=2` (scales raised where a peak nears the format max)
  ours_budget      `grad_underflow_budget=1e-4, headroom=4` (c lowered where rms(g) would flush more than
                   0.01% of a layer's gradient elements, never so far that a peak comes within 4x of the max)
  ours_e4m3        output gradients cast to E4M3 instead of E5M2 (accelerate's `fp8_format="E4M3"`), with
                   `headroom=2`: E4M3's max, 448, is 2^8.8 above a unit-RMS gradient, E5M2's 2^15.8
  ours_rounding    `input_rounding_search=True` (each a chosen within √2 of rms(x) to minimize x's E4M3 rounding
                   error on the calibration batches)
  ours_scaled_mm   ours with backend "scaled_mm": the three GEMMs in `torch._scaled_mm` on FP8 tensors (which runs
                   on CPU in torch 2.13) instead of `simulate`'s cast-back-to-fp32 matmul
  torchao_e4m3     torchao_dynamic with E4M3 output gradients (`cast_config_grad_output`), its peer

Every variant runs the same plain training loop (AdamW, same seeds, same data order, same dropout
masks, no gradient clipping); the unit-scaled variants use the "equivalent" AdamW rule
(lr/s, eps·s, weight decay·s per weight, design.md §3), so with identity casts all six would
follow the same trajectory and any difference is numerics. Every FP8 variant, torchao's too, keeps
the readout (LM head / classifier) in fp32, the library's default (`--fp8-readout` casts it as well). The loop is deliberately not
`transformers.Trainer`, so the benchmark does not depend on `hf_unitscale.trainer`.

Reported per variant: weight-gradient fidelity at step 0 (per-layer cosine and relative error
to fp32 on one batch), cast underflow/saturation over training (our counters, on every `--count-every`-th step; n/a for torchao),
training-loss gap to fp32 (early phase = steps 41-110 of 300, scaled to `--steps`, and the whole
run), final eval loss/accuracy (mean ± std over seeds) with the FP8 forward and with the trained weights in
full precision, wall-time ratio to fp32.

    python benchmarks/fp8_quality.py                              # full: 300 steps, 3 seeds, 2000 eval
    python benchmarks/fp8_quality.py --steps 60 --seeds 2 --eval-size 500 --tasks classification

Writes benchmarks/results/fp8_quality.{json,md} and fp8_quality_loss.png; a task already in the results file
and not run again keeps its results (so `--tasks lm` redoes only the LM table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_unitscale import unit_scale, unit_scaled_modules  # noqa: E402
from hf_unitscale.calibrate import calibrate  # noqa: E402
from hf_unitscale.convert import matmul_layers, readout_modules, weight_scales  # noqa: E402
from hf_unitscale.formats import FORMATS, FP8_FORMAT_PAIRS  # noqa: E402
from hf_unitscale.precision import cast_statistics, full_precision, set_precision, summarize_casts, track_casts  # noqa: E402

logger = logging.getLogger("fp8_quality")
VARIANTS = ("fp32", "naive_fp8", "unit_uncal", "calib_raw", "ours", "torchao_dynamic")
# on request (--variants): ours with these `calibrate` options (at the start and at every recalibration)
CALIBRATION_OPTIONS = {
    "ours_headroom2": {"headroom": 2.0},
    "ours_budget": {"grad_underflow_budget": 1e-4, "headroom": 4.0},
    "ours_e4m3": {"headroom": 2.0},
    "ours_rounding": {"input_rounding_search": True},
}
# the library's `fp8_format` per variant: "HYBRID" (E5M2 output gradients) unless named here
FP8_FORMATS = {"ours_e4m3": "E4M3", "torchao_e4m3": "E4M3"}
# the GEMM backend per variant: "simulate" unless named here
BACKENDS = {"ours_scaled_mm": "scaled_mm"}
TORCHAO = ("torchao_dynamic", "torchao_e4m3")
CALIBRATED = ("calib_raw", "ours", *CALIBRATION_OPTIONS, *BACKENDS)
RECALIBRATED = ("ours", *CALIBRATION_OPTIONS, *BACKENDS)
KNOWN_VARIANTS = tuple(dict.fromkeys([*VARIANTS, *CALIBRATION_OPTIONS, *BACKENDS, *TORCHAO]))
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- tasks


class ClassificationTask:
    name = "minilm_sentiment"

    def __init__(self, args):
        from transformers import AutoTokenizer

        from hf_unitscale.embedded import load_sentiment, minilm_path

        self.path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.train = load_sentiment("train")
        self.test = load_sentiment("test").select(range(args.eval_size))
        self.batch_size, self.max_length = args.batch_size, args.max_length

    def model(self, seed):
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)  # the fresh classifier head
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2)

    def _collate(self, rows):
        batch = dict(
            self.tokenizer(rows["text"], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )
        batch["labels"] = torch.tensor(rows["label"])
        return batch

    def train_batches(self, seed, steps):
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
        for step in range(steps):
            idx = [order[(step * self.batch_size + i) % len(order)] for i in range(self.batch_size)]
            yield self._collate(self.train[idx])

    def eval_batches(self):
        for start in range(0, len(self.test), 128):
            yield self._collate(self.test[start : start + 128])

    @staticmethod
    def eval_metrics(outputs, batch):
        loss = F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum").item()
        correct = (outputs.logits.argmax(-1) == batch["labels"]).sum().item()
        return {"loss": loss, "correct": correct, "count": len(batch["labels"])}

    @staticmethod
    def finish_metrics(total):
        return {"eval_loss": total["loss"] / total["count"], "eval_accuracy": total["correct"] / total["count"]}


class LanguageModelTask:
    name = "smollm2_austen"

    def __init__(self, args):
        from transformers import AutoTokenizer

        from hf_unitscale.embedded import load_austen, smollm2_path

        self.path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.batch_size = args.lm_batch_size
        self.eval_batch_size = args.lm_eval_batch_size

        def blocks(dataset, limit, seq):
            ids = []
            for text in dataset["text"]:
                ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
                if len(ids) >= limit * seq:
                    break
            return torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)

        # the training blocks come from the start of the first novel, so the held-out fraction does not change them
        splits = {split: load_austen(split, eval_fraction=args.lm_eval_fraction) for split in ("train", "test")}
        self.train = blocks(splits["train"], args.lm_steps * self.batch_size + 64, args.lm_seq_len)
        self.test = blocks(splits["test"], args.lm_eval_size, args.lm_eval_seq_len)[: args.lm_eval_size]
        if len(self.test) < args.lm_eval_size:
            raise ValueError(
                f"the held-out {args.lm_eval_fraction:.0%} of each novel gives {len(self.test)} eval sequences of "
                f"{args.lm_eval_seq_len} tokens, fewer than --lm-eval-size {args.lm_eval_size}: raise "
                "--lm-eval-fraction or lower --lm-eval-seq-len"
            )

    def model(self, seed):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)

    def train_batches(self, seed, steps):
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        for step in range(steps):
            idx = order[(torch.arange(self.batch_size) + step * self.batch_size) % len(order)]
            ids = self.train[idx]
            yield {"input_ids": ids, "labels": ids}

    def eval_batches(self):
        for start in range(0, len(self.test), self.eval_batch_size):
            ids = self.test[start : start + self.eval_batch_size]
            yield {"input_ids": ids, "labels": ids}

    @staticmethod
    def eval_metrics(outputs, batch):
        tokens = batch["labels"][:, 1:].numel()
        return {"loss": outputs.loss.item() * tokens, "count": tokens}

    @staticmethod
    def finish_metrics(total):
        loss = total["loss"] / total["count"]
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}


# --------------------------------------------------------------------------- variants


@torch.no_grad()
def _raw_weights(model):
    """Undo the weight rescaling but keep the converted classes: weight = W, s = 1 (a tied weight multiplied once)."""
    done = set()
    for module in unit_scaled_modules(model).values():
        for name in module.unit_scaled_weights:
            weight = getattr(module, name)
            if id(weight) not in done:
                weight.mul_(module.scale_of(name).to(weight.dtype))
                done.add(id(weight))
            module.scale_of(name).fill_(1.0)


def build_variant(variant, task, seed, calibration_batches, fp8_readout):
    """The model of `variant`; unless `fp8_readout`, every FP8 variant (torchao too) keeps the readout in fp32."""
    model = task.model(seed)
    if variant == "fp32":
        return model
    if variant in TORCHAO:
        from torchao.float8 import CastConfig, Float8LinearConfig, convert_to_float8_training

        grad_dtype = FORMATS[variant_formats(variant)[1]].dtype
        readouts = {id(m) for m in readout_modules(model)}
        return convert_to_float8_training(
            model,
            config=Float8LinearConfig(emulate=True, cast_config_grad_output=CastConfig(target_dtype=grad_dtype)),
            module_filter_fn=None if fp8_readout else (lambda module, name: id(module) not in readouts),
        )
    unit_scale(model)
    if variant in ("naive_fp8", "calib_raw"):
        _raw_weights(model)
    # formats first: calibration's headroom and budget read them
    backend = BACKENDS.get(variant, "simulate")
    set_precision(model, *variant_formats(variant), backend, full_precision_modules=[] if fp8_readout else None)
    if variant in CALIBRATED:
        calibrate(model, calibration_batches, **CALIBRATION_OPTIONS.get(variant, {}), progress=False)
    return model


def variant_formats(variant):
    """(forward, backward) operand formats of a variant: those of its `fp8_format`."""
    return FP8_FORMAT_PAIRS[FP8_FORMATS.get(variant, "HYBRID")]


def optimizer_for(model, lr, weight_decay, eps=1e-8):
    """AdamW; a unit-scaled weight Ŵ (scale s) gets lr/s, eps·s, wd·s: the same updates of W = s·Ŵ."""
    scale_of = weight_scales(model)
    groups = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        s = scale_of.get(id(param), 1.0)
        wd = weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((s, wd), []).append(param)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr / s, "eps": eps * s, "weight_decay": wd * s} for (s, wd), ps in groups.items()]
    )


def _plain_weight_grads(model):
    """dL/dW per 2-D Linear weight (name → tensor): a unit-scaled Ŵ's gradient divided by its s."""
    scales = {name: float(m.weight_scale) for name, m in matmul_layers(model).items()}
    grads = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and weight.grad is not None:
            grads[name] = weight.grad.detach().double() / scales.get(name, 1.0)
    return grads


def gradient_fidelity(model, reference, batch):
    """Per-layer cosine and relative error of this model's dL/dW against the fp32 reference on `batch`."""
    model.train()
    torch.manual_seed(1234)  # same dropout masks as the reference
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = _plain_weight_grads(model)
    model.zero_grad(set_to_none=True)
    layers = {}
    for name, ref in reference.items():
        got = grads[name]
        cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        rel = ((got - ref).norm() / ref.norm()).item()
        layers[name] = {"cosine": cos, "relative_error": rel}
    return layers


def start_batches(task, seed, calibration_batches):
    """(calibration batches, fidelity batch) of `seed`: its first `calibration_batches` training batches calibrate,
    the next one, which calibration never saw, measures step-0 gradient fidelity."""
    first = list(task.train_batches(seed, calibration_batches + 1))
    return first[:-1], first[-1]


def train_one(variant, task, seed, args):
    """Train `variant` on `task` for `args.steps` and evaluate it; returns (results, the trained model).

    On the first seed, also the step-0 gradient fidelity: fp32's reference gradients, every other variant's
    cosine to `args.reference_grads` (skipped without them: fp8_forward_swap.py trains no fp32 model).
    """
    calibration_batches, fidelity_batch = start_batches(task, seed, args.calibration_batches)
    model = build_variant(variant, task, seed, calibration_batches, args.fp8_readout)
    result = {"variant": variant, "seed": seed}
    counted = variant not in ("fp32", *TORCHAO)
    if seed == args.seed_list[0] and (variant == "fp32" or getattr(args, "reference_grads", None) is not None):
        if variant == "fp32":
            result["reference_grads"] = gradient_fidelity_reference(model, fidelity_batch)
        else:
            if counted:
                track_casts(model)
            result["fidelity"] = gradient_fidelity(model, args.reference_grads, fidelity_batch)
            if counted:
                result["fidelity_casts"] = cast_statistics(model, reset=True)
    counters = track_casts(model) if counted else {}
    layers = matmul_layers(model) if counted else {}
    optimizer = optimizer_for(model, args.lr, args.weight_decay)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / (args.steps - warmup)))
    )
    losses, saturated_by_interval = [], []

    def counted_casts():  # the counters hold every sampled step, whether or not this step was sampled
        for name, layer in layers.items():
            layer.cast_counters = counters[name]
        return cast_statistics(model)

    model.train()
    torch.manual_seed(seed + 1000)  # dropout masks: identical across variants
    start = time.perf_counter()
    for step, batch in enumerate(task.train_batches(seed, args.steps), start=1):
        sampled = step % args.count_every == 0  # counting costs ~2x an FP8 step on CPU: sample steps
        for name, layer in layers.items():
            layer.cast_counters = counters[name] if sampled else None
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if counted and step % args.recalibrate_every == 0:
            saturated_by_interval.append(summarize_casts(counted_casts()))
            if variant in RECALIBRATED:
                rng = torch.get_rng_state()
                # eval mode: no dropout RNG used
                calibrate(model, calibration_batches, **CALIBRATION_OPTIONS.get(variant, {}), progress=False)
                torch.set_rng_state(rng)
        if step % max(1, args.steps // 10) == 0:
            logger.info(f"  {task.name} {variant} seed {seed} step {step}: loss {statistics.fmean(losses[-10:]):.4f}")
    result["train_seconds"] = time.perf_counter() - start
    result["losses"] = losses
    if counted:
        stats = counted_casts()
        result["train_casts"] = summarize_casts(stats)
        result["train_casts_by_interval"] = saturated_by_interval
        result["train_grad_underflow_by_layer"] = {k: v["grad_output"]["underflow_fraction"] for k, v in stats.items()}
        track_casts(model, enabled=False)  # evaluation runs uncounted (counting doubles an FP8 GEMM's cost)
    result.update(evaluate(model, task))
    if variant != "fp32":
        result["eval_loss_full_precision"] = evaluate_in_full_precision(variant, model, task, seed)["eval_loss"]
    logger.info(
        f"  {task.name} {variant} seed {seed}: eval loss {result['eval_loss']:.4f}, {result['train_seconds']:.0f}s"
    )
    return result, model


@torch.no_grad()
def evaluate(model, task):
    model.eval()
    total = {}
    for batch in task.eval_batches():
        for key, value in task.eval_metrics(model(**batch), batch).items():
            total[key] = total.get(key, 0) + value
    return task.finish_metrics(total)


@contextlib.contextmanager
def in_full_precision(variant, model, task, seed):
    """`model`'s trained weights with every GEMM in fp32: what the merged export gives a user who serves in fp32."""
    if variant in TORCHAO:  # Float8Linear keeps the plain weight and bias: load them into nn.Linear
        plain = task.model(seed)
        plain.load_state_dict(model.state_dict())
        yield plain
    else:
        with full_precision(model):
            yield model


def evaluate_in_full_precision(variant, model, task, seed):
    with in_full_precision(variant, model, task, seed) as served:
        return evaluate(served, task)


def gradient_fidelity_reference(model, batch):
    model.train()
    torch.manual_seed(1234)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = _plain_weight_grads(model)
    model.zero_grad(set_to_none=True)
    return grads


# --------------------------------------------------------------------------- report


def _mean_std(values):
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(task_name, runs, args):
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in args.variant_list}
    fp32_runs = {r["seed"]: r for r in by_variant["fp32"]}
    early = (round(40 * args.steps / 300), max(round(110 * args.steps / 300), round(40 * args.steps / 300) + 1))
    summary = {}
    for variant, vruns in by_variant.items():
        row = {"seeds": [r["seed"] for r in vruns]}
        fid = next((r["fidelity"] for r in vruns if "fidelity" in r), None)
        if fid:
            cos = [v["cosine"] for v in fid.values()]
            rel = [v["relative_error"] for v in fid.values()]
            row["grad_cosine_min"], row["grad_cosine_median"] = min(cos), statistics.median(cos)
            row["grad_relerr_median"], row["grad_relerr_max"] = statistics.median(rel), max(rel)
            row["grad_cosine_worst_layer"] = min(fid, key=lambda k: fid[k]["cosine"])
            row["fidelity_by_layer"] = fid
        fc = next((r["fidelity_casts"] for r in vruns if "fidelity_casts" in r), None)
        if fc:
            row["start_casts"] = summarize_casts(fc)
            row["start_grad_underflow_by_layer"] = {k: v["grad_output"]["underflow_fraction"] for k, v in fc.items()}
        if "train_casts" in vruns[0]:
            row["train_casts_seed0"] = vruns[0]["train_casts"]
            row["train_grad_underflow_by_layer_seed0"] = vruns[0]["train_grad_underflow_by_layer"]
            row["train_casts_by_interval_seed0"] = vruns[0]["train_casts_by_interval"]
        gaps_early, gaps_all = [], []
        for r in vruns:
            ref = fp32_runs[r["seed"]]["losses"]
            e0, e1 = early
            gaps_early.append(statistics.fmean(r["losses"][e0:e1]) / statistics.fmean(ref[e0:e1]) - 1)
            gaps_all.append(statistics.fmean(r["losses"]) / statistics.fmean(ref) - 1)
            row.setdefault("early_train_loss", []).append(statistics.fmean(r["losses"][e0:e1]))
        row["early_steps"] = [early[0] + 1, early[1]]
        row["early_loss_gap"], row["whole_loss_gap"] = _mean_std(gaps_early), _mean_std(gaps_all)
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity", "eval_loss_full_precision"):
            if key in vruns[0]:
                row[key] = _mean_std([r[key] for r in vruns])
        # medians over seeds: one run slowed by other work on a shared machine does not skew the ratio
        fp32_time = statistics.median(r["train_seconds"] for r in by_variant["fp32"])
        row["time_ratio"] = statistics.median(r["train_seconds"] for r in vruns) / fp32_time
        summary[variant] = row
    return summary


def markdown(all_summaries, all_settings):
    lines = [
        "# FP8 fine-tuning quality",
        "",
        "Same loop, data order, seeds and dropout masks for all variants; `simulate` backend (`scaled_mm` for "
        "ours_scaled_mm), E4M3 forward, E5M2 backward (E4M3 for ours_e4m3 and torchao_e4m3).",
        "",
    ]
    for task_name, summary in all_summaries.items():
        metric = "eval_accuracy" if "eval_accuracy" in summary["fp32"] else "eval_perplexity"
        settings = all_settings[task_name]
        lines += [
            f"## {task_name}",
            "",
            f"Command: `{settings['command']}` ({settings['minutes']:.1f} min, {settings['threads']} CPU threads).",
            "",
            f"Steps {settings['steps']}, seeds {settings['seeds']}, batch {settings['batch_size']}, "
            f"{settings['eval']}, lr {settings['lr']}, {settings['calibration_batches']} calibration batches, "
            f"{_recalibration(settings)}, readout layer in {settings['readout']} for every variant.",
            "",
            "| variant | grad cos min / median (step 0) | grad rel. err median | g underflow step 0 (pooled / worst layer) "
            "| g underflow over training, seed 0 | saturation over training, seed 0 (x / g) | early loss gap "
            "| whole-run loss gap "
            f"| eval loss | {metric} | eval loss, GEMMs in fp32 | time ÷ fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, row in summary.items():
            start = row.get("start_casts", {})
            train = row.get("train_casts_seed0", {})

            def pct(d, key):
                return f"{100 * d[key]:.3f}%" if key in d else "n/a"

            fid = (
                f"{row['grad_cosine_min']:.4f} / {row['grad_cosine_median']:.4f}" if "grad_cosine_min" in row else "ref"
            )
            rel = f"{row['grad_relerr_median']:.3f}" if "grad_relerr_median" in row else "ref"
            full_eval = row["eval_loss"] if variant == "fp32" else row.get("eval_loss_full_precision")
            full = f"{full_eval[0]:.4f} ± {full_eval[1]:.4f}" if full_eval else "not run"
            lines.append(
                f"| {variant} | {fid} | {rel} "
                f"| {pct(start, 'fp8/grad_output_underflow_fraction')} / "
                f"{pct(start, 'fp8/grad_output_max_layer_underflow_fraction')} "
                f"| {pct(train, 'fp8/grad_output_underflow_fraction')} "
                f"| {pct(train, 'fp8/input_saturated_fraction')} / {pct(train, 'fp8/grad_output_saturated_fraction')} "
                f"| {100 * row['early_loss_gap'][0]:+.2f}% ± {100 * row['early_loss_gap'][1]:.2f} "
                f"| {100 * row['whole_loss_gap'][0]:+.2f}% ± {100 * row['whole_loss_gap'][1]:.2f} "
                f"| {row['eval_loss'][0]:.4f} ± {row['eval_loss'][1]:.4f} "
                f"| {row[metric][0]:.4f} ± {row[metric][1]:.4f} | {full} | {row['time_ratio']:.2f} |"
            )
        lines += [
            "",
            "Loss gap: mean training loss of the variant ÷ fp32's on the same seed, minus 1 (early = steps "
            f"{summary['fp32']['early_steps'][0]}–{summary['fp32']['early_steps'][1]}). Underflow: non-zero "
            "elements of g/c flushed to zero ÷ non-zero elements; saturation: elements clipped to the format max. "
            "torchao scales dynamically and has no counters here (n/a). Time: median training time over seeds ÷ "
            "fp32's (emulated FP8 on CPU: not FP8 speed); our variants' times include the cast counting of every "
            "counted step and the recalibration passes, which fp32 and torchao do not run. Eval loss, GEMMs in "
            "fp32: the same trained weights evaluated with every matmul in full precision, as a user serving the "
            "merged export in fp32 gets them.",
            "",
        ]
    return "\n".join(lines)


def _recalibration(settings):
    every, steps = settings["recalibrate_every"], settings["steps"]
    if every and every < steps:
        return f"recalibration every {every} steps"
    return f"calibrated once (no recalibration: {steps} steps, recalibrate every {every})"


def _previous_results(path):
    """Runs, summaries and settings per task from an earlier results file: a run of one task keeps the others."""
    if not path.exists():
        return {}, {}, {}
    previous = json.loads(path.read_text())
    logger.info(f"Keeping the results of {sorted(previous['settings'])} from {path} for tasks this run does not redo")
    return previous["runs"], previous["summary"], previous["settings"]


def plot(all_runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(7 * len(all_runs), 4.5), squeeze=False)
    for ax, (task_name, runs) in zip(axes[0], all_runs.items(), strict=True):
        variants = dict.fromkeys(r["variant"] for r in runs)
        for variant in variants:
            curves = [r["losses"] for r in runs if r["variant"] == variant]
            mean = [statistics.fmean(v) for v in zip(*curves, strict=True)]
            window = max(1, len(mean) // 30)
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
            ax.plot(range(1, len(smooth) + 1), smooth, label=variant, lw=1.2)
        ax.set_title(f"{task_name}: training loss (mean over seeds, moving avg)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_task_arguments(parser):
    """The options that define the two tasks' models, data and FP8 setup (shared with fp8_error_sources.py)."""
    parser.add_argument("--tasks", default="classification,lm", help="comma list of classification, lm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-size", "--eval_size", type=int, default=2000)
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32)
    parser.add_argument("--max-length", "--max_length", type=int, default=64)
    parser.add_argument("--calibration-batches", "--calibration_batches", type=int, default=4)
    parser.add_argument("--lm-steps", "--lm_steps", type=int, default=60)
    parser.add_argument("--lm-batch-size", "--lm_batch_size", type=int, default=8)
    parser.add_argument("--lm-seq-len", "--lm_seq_len", type=int, default=128)
    parser.add_argument("--lm-eval-size", "--lm_eval_size", type=int, default=256, help="eval sequences (LM)")
    parser.add_argument(
        "--lm-eval-seq-len", "--lm_eval_seq_len", type=int, default=None, help="tokens per eval sequence (LM)"
    )
    parser.add_argument(
        "--lm-eval-batch-size",
        "--lm_eval_batch_size",
        type=int,
        default=32,
        help="eval sequences per forward (LM); FP8 weights are cast once per forward",
    )
    parser.add_argument(
        "--lm-eval-fraction",
        "--lm_eval_fraction",
        type=float,
        default=0.05,
        help="last fraction of each novel's paragraphs held out for eval (LM)",
    )
    parser.add_argument(
        "--fp8-readout", "--fp8_readout", action="store_true", help="cast the readout (output head) to FP8 too"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)


def add_training_arguments(parser):
    """The options of `train_one`'s loop (shared with fp8_forward_swap.py)."""
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", "--weight_decay", type=float, default=0.01)
    parser.add_argument("--recalibrate-every", "--recalibrate_every", type=int, default=100)
    parser.add_argument("--count-every", "--count_every", type=int, default=5, help="count casts every N steps")


def parse_task_arguments(parser, argv):
    """Parse `argv` (default sys.argv[1:]), set up logging, threads and the output folder; returns (args, argv)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lm_eval_seq_len = args.lm_eval_seq_len or args.lm_seq_len
    args.out.mkdir(parents=True, exist_ok=True)
    return args, argv


def make_task(task_key, args, parser):
    """The task called `task_key` and the args it runs with (an LM task's steps, batch and eval size are its own)."""
    if task_key == "classification":
        return ClassificationTask(args), args
    if task_key == "lm":
        task = LanguageModelTask(args)
        args = copy.copy(args)
        args.steps, args.batch_size, args.eval_size = args.lm_steps, args.lm_batch_size, args.lm_eval_size
        return task, args
    parser.error(f"unknown task {task_key!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args, argv = parse_task_arguments(parser, argv)
    args.seed_list = list(range(args.seeds))
    args.variant_list = [v for v in args.variants.split(",") if v]
    if "fp32" not in args.variant_list:
        parser.error("--variants must include fp32 (the reference)")
    unknown = sorted(set(args.variant_list) - set(KNOWN_VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(KNOWN_VARIANTS)}")
    args.variant_list = ["fp32"] + [v for v in args.variant_list if v != "fp32"]
    results_path = args.out / "fp8_quality.json"
    all_runs, all_summaries, all_settings = _previous_results(results_path)
    for task_key in args.tasks.split(","):
        task_start = time.perf_counter()
        task, args = make_task(task_key, args, parser)
        runs = []
        for seed in args.seed_list:
            for variant in args.variant_list:
                result, _ = train_one(variant, task, seed, args)
                if "reference_grads" in result:
                    args.reference_grads = result.pop("reference_grads")
                runs.append(result)
        all_runs[task.name] = runs
        all_summaries[task.name] = summarize(task.name, runs, args)
        if task_key == "classification":
            batch_desc, eval_desc = f"{args.batch_size}", f"{args.eval_size} eval examples"
        else:
            batch_desc = f"{args.batch_size} × {args.lm_seq_len} tokens"
            eval_desc = (
                f"{args.eval_size} eval sequences × {args.lm_eval_seq_len} tokens "
                f"(the last {args.lm_eval_fraction:.0%} of each novel's paragraphs)"
            )
        all_settings[task.name] = {
            "command": f"python benchmarks/fp8_quality.py {' '.join(argv)}",
            "minutes": (time.perf_counter() - task_start) / 60,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "seeds": args.seed_list,
            "batch_size": batch_desc,
            "eval": eval_desc,
            "lr": args.lr,
            "calibration_batches": args.calibration_batches,
            "recalibrate_every": args.recalibrate_every,
            "readout": "FP8" if args.fp8_readout else "fp32",
            "args": {k: str(v) for k, v in vars(args).items() if k != "reference_grads"},  # defaults included
        }
        # written after every task, so a finished task's table survives a later task being interrupted
        results_path.write_text(
            json.dumps({"settings": all_settings, "summary": all_summaries, "runs": all_runs}, indent=1)
        )
        (args.out / "fp8_quality.md").write_text(markdown(all_summaries, all_settings))
        plot(all_runs, args.out / "fp8_quality_loss.png")
    print((args.out / "fp8_quality.md").read_text())


if __name__ == "__main__":
    main()
