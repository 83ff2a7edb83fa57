"""Scale statistics over the tiny table: weights before/after conversion, hooked activations and
gradients, calibrated operands; the table and the plot show the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hf_unitscale import is_unit_scaled, unit_scale
from hf_unitscale.analysis import (
    SERIES,
    format_scale_table,
    plot_scale_report,
    scale_report,
)
from hf_unitscale.formats import FORMATS
from hf_unitscale.ops import rms

from tiny_models import CASES_BY_ID, TINY_CASES


def plotted_series(fig) -> dict[str, list[float]]:
    """{table header: y-data} of every series line `plot_scale_report` drew (each carries its header as `gid`)."""
    return {
        line.get_gid(): [float(v) for v in line.get_ydata()] for ax in fig.axes for line in ax.lines if line.get_gid()
    }


def _batches(case, n=2, batch_size=4, seq_len=12):
    model = case.model()
    batches = []
    for i in range(n):
        batch = case.batch(batch_size=batch_size, seq_len=seq_len, seed=10 + i)
        if type(model).__name__.endswith("ForSequenceClassification"):
            batch["labels"] = torch.arange(batch_size) % 2
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_weight_rms_before_and_after_conversion(case):
    model = case.model()
    original = {
        name: float(rms(m.weight))
        for name, m in model.named_modules()
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() >= 2
    }
    report = scale_report(model, _batches(case, n=1), calibrate=False)
    assert not is_unit_scaled(model), "scale_report must not convert the caller's model"
    assert report.layers, "no layer reported"
    for row in report.layers:
        assert row.weight_rms == pytest.approx(original[row.name], rel=1e-5), row.name  # rms(W) = s
        assert row.weight_scale == pytest.approx(original[row.name], rel=1e-6)
        assert row.unit_weight_rms == pytest.approx(1.0, rel=1e-5), row.name  # rms(Ŵ) = 1


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_calibrated_operands_have_unit_rms(case):
    batches = _batches(case)
    report = scale_report(case.model(), batches)  # calibrated on the measured batches: exactly 1
    matmuls = [row for row in report.layers if row.kind == "matmul"]
    assert matmuls
    for row in matmuls:
        assert row.input_scale == pytest.approx(row.input_rms, rel=1e-6)
        assert row.grad_scale == pytest.approx(row.grad_rms, rel=1e-6)
        assert row.scaled_input_rms == pytest.approx(1.0, rel=1e-5), row.name
        assert row.scaled_grad_rms == pytest.approx(1.0, rel=1e-5), row.name
    # held-out batches: near 1, not exactly
    held_out = scale_report(case.model(), batches[:1], calibration_batches=batches[1:])
    for row in (r for r in held_out.layers if r.kind == "matmul"):
        assert 0.5 < row.scaled_input_rms < 2 and 0.2 < row.scaled_grad_rms < 5, row


def test_hooked_rms_matches_a_direct_measurement():
    """rms(x) and rms(g) of one layer, measured by hand on the unconverted model, over non-zero elements."""
    case = CASES_BY_ID["bert"]
    batch = _batches(case, n=1)[0]
    model = case.model()
    layer = model.bert.encoder.layer[1].output.dense
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))

    def keep_grad(module, args, out):
        out.register_hook(lambda g: seen.__setitem__("g", g))

    layer.register_forward_hook(keep_grad)
    model(**batch).loss.backward()
    row = {r.name: r for r in scale_report(case.model(), [batch], calibrate=False).layers}[
        "bert.encoder.layer.1.output.dense"
    ]
    assert row.input_rms == pytest.approx(float(rms(seen["x"], nonzero_only=True)), rel=1e-5)
    assert row.grad_rms == pytest.approx(float(rms(seen["g"], nonzero_only=True)), rel=1e-5)


def test_without_labels_the_proxy_loss_sets_the_gradients():
    """No `labels` (a bare encoder, or `report` on one): the loss is sum(logits²)/2/rows, whose gradient at the
    output layer is logits/rows, so the classifier's output-gradient RMS is rms(logits)/rows."""
    case = CASES_BY_ID["bert"]
    batch = case.batch(batch_size=4, seq_len=12, seed=10)  # input ids and mask, no labels
    with torch.no_grad():
        logits = case.model().eval()(**batch).logits
    row = {r.name: r for r in scale_report(case.model(), [batch], calibrate=False).layers}["classifier"]
    assert row.grad_rms == pytest.approx(float(rms(logits)) / 4, rel=1e-5)


def test_already_converted_model_is_left_alone():
    case = CASES_BY_ID["gpt2"]
    model = unit_scale(case.model())
    scales = {n: b.clone() for n, b in model.named_buffers()}
    scale_report(model, _batches(case, n=1))
    assert all(torch.equal(b, scales[n]) for n, b in model.named_buffers())


def test_a_calibrated_model_is_reported_with_its_own_scales():
    """A model trained in FP8 (or loaded from a checkpoint) has its a, c: the report shows x/a and g/c as those
    scales make them, not as a fresh default calibration would."""
    from test_checkpoint import distinct_operand_scales

    from hf_unitscale.convert import matmul_layers

    case = CASES_BY_ID["bert"]
    model = unit_scale(case.model())
    distinct_operand_scales(model)  # scales no default calibration gives, as a checkpoint would restore them
    layers = matmul_layers(model)
    report = scale_report(model, _batches(case, n=1))
    rows = {row.name: row for row in report.layers if row.name in layers}
    assert set(rows) == set(layers)
    for name, layer in layers.items():
        assert (rows[name].input_scale, rows[name].grad_scale) == (float(layer.input_scale), float(layer.grad_scale))


def test_calibration_rescues_gradients_from_e5m2_underflow():
    """Tiny BERT's attention gradients flush to zero in E5M2 without c and survive with it."""
    report = scale_report(CASES_BY_ID["bert"].model(), _batches(CASES_BY_ID["bert"]))
    matmuls = [row for row in report.layers if row.kind == "matmul"]
    below = [row for row in matmuls if row.grad_rms < FORMATS["e5m2"].smallest_subnormal]
    assert below, "expected some raw gradients below E5M2's smallest subnormal"
    assert sum(r.grad_flushed for r in matmuls) / len(matmuls) > 0.3
    assert max(r.scaled_grad_flushed for r in matmuls) < 0.05
    # the largest calibrated operands: at least their RMS, and inside E4M3's / E5M2's range on these batches
    assert all(r.scaled_input_rms <= r.scaled_input_peak < FORMATS["e4m3"].max for r in matmuls)
    assert all(r.scaled_grad_rms <= r.scaled_grad_peak < FORMATS["e5m2"].max for r in matmuls)


@pytest.mark.parametrize("case_id", ["bert", "llama-untied"])
def test_plot_draws_exactly_the_table(case_id, tmp_path):
    case = CASES_BY_ID[case_id]
    report = scale_report(case.model(), _batches(case))
    path = tmp_path / "plot.png"
    fig = plot_scale_report(report, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    drawn = plotted_series(fig)
    assert set(drawn) == {header for _, header, _, _ in SERIES}
    for header, values in report.series().items():
        assert _same(drawn[header], values), header
    # and the printed table shows those numbers (4 significant digits)
    lines = {line.split()[0]: line.split() for line in format_scale_table(report).splitlines()[2:-2]}
    for i, row in enumerate(report.layers):
        cells = lines[row.name]
        for column, header in (
            (1, "rms(W)"),
            (2, "rms(Ŵ)"),
            (3, "rms(x)"),
            (4, "rms(g)"),
            (8, "rms(x/a)"),
            (9, "rms(g/c)"),
        ):
            value = drawn[header][i]
            assert cells[column] == "—" if math.isnan(value) else float(cells[column]) == pytest.approx(value, rel=5e-4)
    # the two FP8 ranges are shaded on both panels
    for ax in fig.axes:
        spans = sorted(patch.get_label() for patch in ax.patches)
        assert spans == ["E4M3 range (forward)", "E5M2 range (gradients)"]
        assert ax.get_yscale() == "log"


def test_uncalibrated_report_has_no_operand_columns():
    case = CASES_BY_ID["llama-tied"]
    report = scale_report(case.model(), _batches(case, n=1), calibrate=False)
    assert all(math.isnan(row.scaled_grad_rms) and math.isnan(row.input_scale) for row in report.layers)
    plot_scale_report(report)  # draws without the right-hand data


def test_empty_batches_is_an_error():
    with pytest.raises(ValueError, match="at least one batch"):
        scale_report(CASES_BY_ID["bert"].model(), [])


@pytest.mark.slow
def test_real_minilm_gradients_sit_below_e5m2():
    """The design's claim on a pretrained BERT: output gradients below E5M2's smallest subnormal; after calibration ~1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_unitscale.embedded import load_sentiment, minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_sentiment("test").select(range(32))
    batches = []
    for start in (0, 16):
        rows = data.select(range(start, start + 16))
        batch = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch["labels"] = torch.tensor(list(rows["label"]))
        batches.append(dict(batch))
    report = scale_report(model, batches[:1], calibration_batches=batches[1:])
    encoder = [row for row in report.layers if ".encoder." in row.name]
    below = sum(row.grad_rms < FORMATS["e5m2"].smallest_subnormal for row in encoder)
    assert below / len(encoder) > 0.8, f"only {below}/{len(encoder)} below E5M2"
    assert all(0.5 < row.scaled_grad_rms < 2 for row in encoder)
