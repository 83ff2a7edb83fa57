"""Every benchmark runs end to end at toy sizes, as a user runs it, and its results hold together.

Each script runs as `python benchmarks/<name>.py …` with `--out` a temp folder (the committed results stay
untouched). Toy sizes make the figures meaningless as measurements; what is checked is what must hold at
any size: a finite figure for every variant, the invariants a script's README claims rest on (fp32's gap to
itself is zero, a swap of forwards reproduces each variant's own eval, the same function in fp32 scores the
same), and the written tables. A benchmark broken by a library change (as `e4m3_midpoints.py` once was)
fails here, not at its next hour-long run. Nothing is timed, except the CPU's FP8 kernel, to decide whether
the real-kernel variant can run at all (`smoke_variants`).
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from fp8_quality import BACKENDS, KNOWN_VARIANTS  # noqa: E402  every variant fp8_quality.py accepts, a new one included

# the smallest runs of fp8_quality.py's two tasks: 1 seed, 2 steps, a few eval examples
TASK_OPTIONS = ["--seeds", "1", "--eval-size", "16", "--batch-size", "4", "--calibration-batches", "1"]
TASK_OPTIONS += ["--lm-steps", "2", "--lm-batch-size", "2", "--lm-seq-len", "16", "--lm-eval-size", "4"]
TRAINING_OPTIONS = ["--steps", "2", "--count-every", "1", "--recalibrate-every", "1"]
TASKS = ("minilm_sentiment", "smollm2_austen")


def run_benchmark(name: str, out: Path, *options: str) -> dict:
    """Run benchmarks/`name`.py with `options`, writing into `out`; returns the JSON results it wrote."""
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), *options, "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, f"{' '.join(command)} exited {finished.returncode}:\n{finished.stderr[-4000:]}"
    assert (out / f"{name}.md").read_text().strip(), f"{name}.md is empty"
    return json.loads((out / f"{name}.json").read_text())


def assert_finite(value, what: str):
    assert isinstance(value, float) and math.isfinite(value), f"{what} = {value!r}"


def fp8_kernel_slowdown() -> float:
    """How many times slower `torch._scaled_mm` is here than an fp32 matmul of the same 256×256×256 GEMM.

    torch sends this E4M3 @ E4M3 GEMM to oneDNN on CPUs with AMX-INT8 and runs an fp32 matmul elsewhere. On the
    CPU of an earlier run, training `ours_scaled_mm` took 1.45× as long as fp32; on a Xeon with AMX-BF16/INT8 but
    no AMX-FP16, oneDNN runs its reference kernel (`ref:any` under ONEDNN_VERBOSE=1), 700–3300× slower than
    fp32 at this size on one thread.
    """
    a = torch.randn(256, 256).to(torch.float8_e4m3fn)
    b = torch.randn(256, 256).to(torch.float8_e4m3fn).t()
    one = torch.ones(())

    def seconds(gemm, repeats: int) -> float:
        """The fastest of `repeats` timed calls after a warm-up: a stall (another process on the cores) only
        ever adds time."""
        gemm()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gemm()
            times.append(time.perf_counter() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP barriers crawl when another process holds a core: one thread only shares it
    try:
        # ~1 s per call with the reference kernel; the best of 3, so one stall cannot drop the variant
        fp8 = seconds(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.float32), repeats=3)
        return fp8 / seconds(lambda: a.float() @ b.float(), repeats=20)
    finally:
        torch.set_num_threads(threads)


@functools.cache
def smoke_variants() -> list[str]:
    """Every variant, but the real-kernel one (`BACKENDS`) only where the CPU's FP8 kernel is usable: with the
    reference kernel, a real model's training step takes minutes. tests/test_ops.py and tests/test_compile.py
    run the `scaled_mm` backend everywhere."""
    slowdown = fp8_kernel_slowdown()
    if slowdown >= 50:
        warnings.warn(
            f"torch._scaled_mm runs {slowdown:.0f}x slower than an fp32 matmul here (oneDNN's reference kernel): "
            f"the benchmark smoke test skips {sorted(BACKENDS)}.",
            stacklevel=1,
        )
        return [variant for variant in KNOWN_VARIANTS if variant not in BACKENDS]
    return list(KNOWN_VARIANTS)


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    """fp8_quality.py on both tasks with every smoke variant; the folder also takes fp8_forward_swap.py's results."""
    out = tmp_path_factory.mktemp("fp8_quality")
    options = ["--tasks", "classification,lm", "--variants", ",".join(smoke_variants())]
    return out, run_benchmark("fp8_quality", out, *options, *TASK_OPTIONS, *TRAINING_OPTIONS)


def test_fp8_quality(quality_run):
    out, results = quality_run
    table = (out / "fp8_quality.md").read_text()
    assert (out / "fp8_quality_loss.png").stat().st_size > 0
    for task in TASKS:
        assert sorted(results["summary"][task]) == sorted(smoke_variants())
        assert results["summary"][task]["fp32"]["whole_loss_gap"][0] == 0.0
        for run in results["runs"][task]:
            where = f"{task} {run['variant']}"
            assert len(run["losses"]) == 2, where
            for loss in run["losses"]:
                assert_finite(loss, f"{where} training loss")
            assert_finite(run["eval_loss"], f"{where} eval loss")
            assert f"| {run['variant']} |" in table, f"no row for {where} in fp8_quality.md"
        # ours_budget is left out: it lowers c toward the format max for less underflow, and here, calibrated on one
        # batch of 32 tokens, SmolLM2 saturated 4e-7 of its output-gradient elements
        for variant in {"ours", "ours_headroom2", "ours_e4m3", *BACKENDS} & set(smoke_variants()):
            casts = results["summary"][task][variant]["train_casts_seed0"]
            assert casts["fp8/input_saturated_fraction"] == casts["fp8/grad_output_saturated_fraction"] == 0.0


def test_fp8_forward_swap_reproduces_each_variants_own_eval(quality_run):
    out, quality = quality_run
    swap = run_benchmark("fp8_forward_swap", out, "--tasks", "lm", *TASK_OPTIONS, *TRAINING_OPTIONS)
    runs = {run["variant"]: run for run in quality["runs"]["smollm2_austen"]}
    for weights in ("ours", "torchao_dynamic"):
        losses = swap["losses"]["0"][weights]
        assert sorted(losses) == sorted(["fp32", "ours", "torchao_dynamic"])
        assert losses[weights] == pytest.approx(runs[weights]["eval_loss"], rel=1e-6), weights
        assert losses["fp32"] == pytest.approx(runs[weights]["eval_loss_full_precision"], rel=1e-6), weights


def test_fp8_error_sources(tmp_path):
    options = ["--tasks", "classification,lm", "--forward-batches", "1", "--jitter", "0.7"]
    results = run_benchmark("fp8_error_sources", tmp_path, *options, *TASK_OPTIONS)
    for task in TASKS:
        for row in results[task]["gradients"]:
            for setting in ("fp8", "g_only", "xw_only"):  # torchao has only "fp8": it casts both operands or none
                if setting in row:
                    assert -1.0 <= row[setting]["min"] <= row[setting]["median"] <= 1.0, (task, row["variant"], setting)
        forward = results[task]["forward"]
        assert "ours, a × 0.7" in forward
        for variant, errors in forward.items():
            assert errors["kl"] >= 0.0 and 0.0 <= errors["top1_agreement"] <= 1.0, (task, variant)
        # the output-gradient format cannot touch the forward
        assert forward["torchao_e4m3"] == forward["torchao_dynamic"], task


def test_e4m3_midpoints(tmp_path):
    results = run_benchmark("e4m3_midpoints", tmp_path)
    midpoints = results["midpoints"]
    assert all(0.0 <= fraction <= 1.0 for fraction in midpoints.values()), midpoints
    assert midpoints["unit_on_midpoint"] < midpoints["raw_on_midpoint"]
    reference = results["steps"]["fp32"]["before"]
    for variant, losses in results["steps"].items():
        # before the step every variant holds the same function; with fp32 GEMMs it scores the same
        assert losses["before_fp32_gemms"] == pytest.approx(reference, rel=1e-5), variant
        assert_finite(losses["after"][0], f"{variant} loss after the step")


def test_autocast_rounding(tmp_path):
    results = run_benchmark("autocast_rounding", tmp_path, "--sentences", "4", "--batch-size", "2")
    assert results["sentences"] == 4
    assert results["plain_autocast_vs_fp32"]["all"] > 0, "autocast rounded nothing"
    for scales, pairs in results["converted"].items():
        for pair, figures in pairs.items():
            for key, value in figures.items():
                assert_finite(value, f"{scales} {pair} {key}")
    # a power-of-two s is exact in bf16: the converted model rounds as the plain one does under autocast
    power_of_two = next(pairs for scales, pairs in results["converted"].items() if scales.startswith("2^"))
    assert power_of_two["converted_autocast_vs_plain_autocast"]["all"] == 0.0


def test_conversion_overhead(tmp_path):
    results = run_benchmark("conversion_overhead", tmp_path, "--repeats", "1", "--seq-len", "8")
    assert results["command"] == "python benchmarks/conversion_overhead.py --repeats 1 --seq-len 8 --out " + str(
        tmp_path
    )
    assert results["conversion_seconds_smollm2_135m"] > 0
    assert len(results["forward_backward"]) == 2
    for row in results["forward_backward"]:
        assert_finite(row["ratio"], f"{row['model']} ratio")


@pytest.mark.parametrize("flag", [[], ["--torch-compile"], ["--bf16"]], ids=["eager", "compiled", "bf16"])
def test_trainer_overhead(tmp_path, flag):
    options = ["--repeats", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "8", *flag]
    results = run_benchmark("trainer_overhead", tmp_path, *options)
    final_loss = results["throughput"]["final_loss"]
    # same model, data and AdamW: the drop-in trainer ends where Trainer does (in bf16, to its rounding)
    assert final_loss["unit_scaled"] == pytest.approx(final_loss["plain"], rel=1e-2 if flag == ["--bf16"] else 1e-5)
    assert ("bf16" in results["model"]) == (flag == ["--bf16"])
    assert set(results["memory"]) == {"plain", "unit_scaled"}


def test_weight_grid_shift_keeps_the_fp32_function_moves_the_fp8_rounding_and_restores_the_weights():
    from e4m3_weight_grid import weight_grid_shifted

    from hf_unitscale import set_precision, unit_scale
    from hf_unitscale.precision import full_precision

    from tiny_models import CASES_BY_ID

    case = CASES_BY_ID["llama-tied"]  # lm_head casts the embedding's weight
    model, batch = case.model(), case.batch()
    unit_scale(model)
    set_precision(model, full_precision_modules=[])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        with full_precision(model):
            fp32 = model(**batch).logits
        fp8 = model(**batch).logits
        with weight_grid_shifted(model, 2**0.5):
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert float(model.lm_head.weight_scale) == pytest.approx(float(before["lm_head.weight_scale"]) / 2**0.5)
            assert float(model.model.embed_tokens.weight_scale) == float(model.lm_head.weight_scale)
            with full_precision(model):
                torch.testing.assert_close(model(**batch).logits, fp32, rtol=1e-5, atol=1e-5)
            shifted = model(**batch).logits
        assert (shifted - fp8).abs().max() > 1e-3  # the E4M3 forward rounded Ŵ elsewhere
        assert torch.equal(model(**batch).logits, fp8)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_e4m3_weight_grid(tmp_path):
    options = ["--tasks", "classification,lm", "--grid-shifts", "2", "--first-seed", "1"]
    results = run_benchmark("e4m3_weight_grid", tmp_path, *options, *TASK_OPTIONS, *TRAINING_OPTIONS)
    assert sorted(results["tasks"]) == sorted(TASKS)
    for task, task_results in results["tasks"].items():
        assert list(task_results["seeds"]) == ["1"]
        rows = task_results["seeds"]["1"]
        assert sorted(rows) == ["step 0", "trained"]
        for stage, row in rows.items():
            assert len(row["shifts"]) == 2, (task, stage)
            for value in (row["fp32_gemms"], row["torchao_forward"], *row["shifts"]):
                assert_finite(value, f"{task} {stage}")
        # shift k = 0 is ours as fp8_quality.py trains and evaluates it
        assert rows["trained"]["shifts"][0] == pytest.approx(rows["trained"]["train_eval_loss"], rel=1e-6), task
