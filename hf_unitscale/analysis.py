"""Scale statistics of a model's layers, before and after unit scaling and calibration, and their plot.

For every converted layer (weight W = s·Ŵ, input x, output gradient g, static scales a, c):

    rms(W) = s·rms(Ŵ)     the plain weight a naive FP8 cast sees      (s = rms(W) at conversion, or a power of two)
    rms(Ŵ)                the unit-scaled weight, 1 at conversion (within √2 of 1 for power-of-two s)
    rms(x), rms(g)        the layer input and output gradient with a = c = 1
    rms(x/a), rms(g/c)    the operands FP8 GEMMs see after calibration
    max|x/a|, max|g/c|    their largest elements: a static scale leaves 448/max|x/a| (E4M3) of headroom

Activations and gradients are measured with hooks on real batches, over non-zero elements
(padding zeroes gradient rows), in full precision, in eval mode, with the model's own loss — the
same statistic `calibrate` uses, sqrt(mean over batches of the non-zero mean square). The
operands are measured again after calibration (x/a and g/c taken inside the hooks), together with
the fraction of non-zero gradient elements an E5M2 cast flushes to zero before and after.

Pretrained output gradients are small (MiniLM's encoder layers, with its classification loss: 1.5e-6..2.6e-4),
around E5M2's smallest subnormal 2^-16 ≈ 1.5e-5: the plot shades the E4M3 and E5M2 ranges (smallest subnormal
to max) to show it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .convert import is_unit_scaled, unit_scale, unit_scaled_modules
from .formats import FORMATS, CastCounter, cast_to_format
from .modules import UnitScaledEmbedding, UnitScaledMatmulMixin
from .operand_stats import OperandRmsHooks, RmsAccumulator
from .ops import rms
from .precision import full_precision
from .training_loss import default_loss, model_inputs

__all__ = ["LayerScales", "ScaleReport", "format_scale_table", "plot_scale_report", "scale_report"]

logger = logging.get_logger(__name__)

NAN = float("nan")


@dataclass
class LayerScales:
    """The scale statistics of one converted layer (nan where a quantity does not apply or was not measured)."""

    name: str
    kind: str  # "matmul", "embedding" or "other"
    weight_rms: float  # rms(W) = rms(s·Ŵ)
    weight_scale: float  # s
    unit_weight_rms: float  # rms(Ŵ)
    input_rms: float  # rms(x), non-zero elements, a = 1
    grad_rms: float  # rms(g), non-zero elements, c = 1
    grad_flushed: float  # fraction of non-zero g that a cast to E5M2 flushes to zero
    input_scale: float = NAN  # a after calibration
    grad_scale: float = NAN  # c after calibration
    scaled_input_rms: float = NAN  # rms(x/a), measured after calibration
    scaled_grad_rms: float = NAN  # rms(g/c), measured after calibration
    scaled_grad_flushed: float = NAN  # fraction of non-zero g/c that E5M2 flushes to zero
    scaled_input_peak: float = NAN  # max|x/a|: headroom below E4M3's max is 448 / peak
    scaled_grad_peak: float = NAN  # max|g/c|: headroom below E5M2's max is 57344 / peak


# (attribute, table header, plot label, plot panel): panel 0 is what a naive FP8 cast sees, 1 after unit scaling
SERIES = (
    ("weight_rms", "rms(W)", "weight W", 0),
    ("input_rms", "rms(x)", "input x", 0),
    ("grad_rms", "rms(g)", "output gradient g", 0),
    ("unit_weight_rms", "rms(Ŵ)", "unit-scaled weight Ŵ", 1),
    ("scaled_input_rms", "rms(x/a)", "calibrated input x/a", 1),
    ("scaled_grad_rms", "rms(g/c)", "calibrated gradient g/c", 1),
)


@dataclass
class ScaleReport:
    """Per-layer `LayerScales` in `named_modules` order, and whether calibration ran."""

    layers: list[LayerScales]
    calibrated: bool
    num_batches: int

    def series(self) -> dict[str, list[float]]:
        """{table header: values per layer} for every plotted quantity — exactly what `plot_scale_report` draws."""
        return {header: [getattr(row, attr) for row in self.layers] for attr, header, _, _ in SERIES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nan (not applicable, or not measured) becomes None."""
        layers = [{k: _none_if_nan(v) for k, v in asdict(row).items()} for row in self.layers]
        return {"calibrated": self.calibrated, "num_batches": self.num_batches, "layers": layers}


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# --------------------------------------------------------------------------- measurement


class _FlushCountingAccumulator(RmsAccumulator):
    """An operand's pooled RMS, plus how much of it a cast to E5M2 flushes to zero."""

    def __init__(self) -> None:
        super().__init__()
        self.flush = CastCounter()

    def add(self, t: torch.Tensor) -> None:
        super().add(t)
        cast_to_format(t.detach().float(), FORMATS["e5m2"], self.flush)

    def flushed(self) -> float:
        counts = self.flush.as_dict()
        return counts["underflow_fraction"] if counts["nonzero"] else NAN


def _measure(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], *, divide_by_scales: bool
) -> dict[str, tuple[float, float, float, float, float]]:
    """{layer: (rms of input operand, rms of gradient operand, fraction of it E5M2 flushes, max|input|,
    max|gradient|)} over `batches`.

    With `divide_by_scales` the operands are x/a and g/c (a calibrated matmul's FP8 operands), else x and g.
    """
    modules = unit_scaled_modules(model)
    hooks = OperandRmsHooks(modules, divide_by_scales=divide_by_scales, grad_accumulator=_FlushCountingAccumulator)
    with hooks, full_precision(model), torch.enable_grad():
        for batch in batches:
            inputs = model_inputs(model, batch)
            hooks.backward(default_loss(hooks.forward(model, inputs), inputs))

    return {
        name: (
            hooks.inputs[name].value(),
            hooks.grads[name].value(),
            hooks.grads[name].flushed(),
            hooks.inputs[name].peak(),
            hooks.grads[name].peak(),
        )
        for name in modules
    }


def _weight_rows(model: nn.Module) -> list[tuple[str, str, str, nn.Module, str]]:
    """(row name, module name, kind, module, weight name) for every unit-scaled weight."""
    rows = []
    for name, module in unit_scaled_modules(model).items():
        kind = (
            "matmul"
            if isinstance(module, UnitScaledMatmulMixin)
            else "embedding"
            if isinstance(module, UnitScaledEmbedding)
            else "other"
        )
        weights = module.unit_scaled_weights
        for weight_name in weights:
            row_name = name if len(weights) == 1 else f"{name}.{weight_name}"
            rows.append((row_name, name, kind, module, weight_name))
    return rows


@torch.no_grad()
def _weight_stats(module: nn.Module, weight_name: str) -> tuple[float, float, float]:
    unit = getattr(module, weight_name).detach()
    s = float(module.scale_of(weight_name))
    return float(rms(unit)) * s, s, float(rms(unit))


def scale_report(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    calibrate: bool = True,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
) -> ScaleReport:
    """Measure the scale statistics of every unit-scaled weight of `model` (module docstring).

    Args:
        model: a plain or unit-scaled model; it is not modified (the measurement runs on a copy,
            converted with the default `UnitScaleConfig` if it is plain).
        batches: dicts of model inputs, with `labels` for the real training gradients (without,
            gradients come from the proxy loss sum(logits²)/2/rows, right up to an O(1) factor).
        calibrate: also measure x/a and g/c: with the model's own a, c where it has calibrated ones (a model
            trained in FP8, a checkpoint's), else after calibrating the copy's matmul layers.
        calibration_batches: the batches to calibrate an uncalibrated copy on (default: `batches`).

    Returns:
        a `ScaleReport`; `format_scale_table` and `plot_scale_report` show it.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty; the scale report needs at least one batch of inputs.")
    model = copy.deepcopy(model)
    if not is_unit_scaled(model):
        unit_scale(model)
    model.eval()
    rows = []
    measured = _measure(model, batches, divide_by_scales=False)
    for row_name, module_name, kind, module, weight_name in _weight_rows(model):
        input_rms, grad_rms, flushed, _, _ = measured[module_name]
        rows.append(LayerScales(row_name, kind, *_weight_stats(module, weight_name), input_rms, grad_rms, flushed))
    if calibrate:
        from .calibrate import calibrate as run_calibration
        from .checkpoint import operand_scales

        if not operand_scales(model):  # the model's own a, c when it has calibrated ones (FP8-trained, a checkpoint)
            calibration_batches = batches if calibration_batches is None else list(calibration_batches)
            run_calibration(model, calibration_batches, progress=False)
        after = _measure(model, batches, divide_by_scales=True)
        for row, (_, module_name, _, module, _) in zip(rows, _weight_rows(model), strict=True):
            if isinstance(module, UnitScaledMatmulMixin):
                row.input_scale, row.grad_scale = float(module.input_scale), float(module.grad_scale)
                (
                    row.scaled_input_rms,
                    row.scaled_grad_rms,
                    row.scaled_grad_flushed,
                    row.scaled_input_peak,
                    row.scaled_grad_peak,
                ) = after[module_name]
    return ScaleReport(rows, calibrated=calibrate, num_batches=len(batches))


# --------------------------------------------------------------------------- table


def _fmt(value: float, percent: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.3e}"


TABLE_COLUMNS = (
    ("weight_rms", "rms(W)"),
    ("unit_weight_rms", "rms(Ŵ)"),
    ("input_rms", "rms(x)"),
    ("grad_rms", "rms(g)"),
    ("grad_flushed", "g→0 e5m2"),
    ("input_scale", "a"),
    ("grad_scale", "c"),
    ("scaled_input_rms", "rms(x/a)"),
    ("scaled_grad_rms", "rms(g/c)"),
    ("scaled_grad_flushed", "g/c→0 e5m2"),
    ("scaled_input_peak", "max|x/a|"),
    ("scaled_grad_peak", "max|g/c|"),
)


def format_scale_table(report: ScaleReport) -> str:
    """The report as a fixed-width text table, one line per layer (values to 4 significant digits)."""
    header = ["layer", *[h for _, h in TABLE_COLUMNS]]
    lines = [
        [row.name, *[_fmt(getattr(row, attr), percent=attr.endswith("flushed")) for attr, _ in TABLE_COLUMNS]]
        for row in report.layers
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    e4m3, e5m2 = FORMATS["e4m3"], FORMATS["e5m2"]
    footer = (
        f"E4M3 range {e4m3.smallest_subnormal:.3g}..{e4m3.max:g} (forward operands); "
        f"E5M2 range {e5m2.smallest_subnormal:.3g}..{e5m2.max:g} (gradients). "
        "g→0: fraction of non-zero gradient elements a cast to E5M2 flushes to zero; max|x/a|, max|g/c|: the "
        "largest calibrated operands (headroom below the format's max)."
    )
    rule = "-" * len(render(header))
    return "\n".join([render(header), rule, *[render(line) for line in lines], rule, footer])


# --------------------------------------------------------------------------- plot


def plot_scale_report(report: ScaleReport, path: str | Path | None = None, *, title: str | None = None):
    """Draw the report on a log scale with the E4M3/E5M2 ranges shaded; save a PNG to `path` if given.

    Left panel: what a naive FP8 cast sees (W, x, g); right: after unit scaling and calibration
    (Ŵ, x/a, g/c). Each plotted line carries its table header as `gid`, so its y-data can be
    checked against `report.series()`. Returns the matplotlib Figure.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas on save

    e4m3, e5m2 = FORMATS["e4m3"], FORMATS["e5m2"]
    n = len(report.layers)
    x = list(range(n))
    fig = Figure(figsize=(max(10.0, 0.22 * n + 6), 5.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panel_titles = ("as stored: plain W, raw x and g", "unit-scaled: Ŵ, calibrated x/a and g/c")
    styles = {0: ("o", "tab:blue"), 1: ("s", "tab:green"), 2: ("v", "tab:red")}
    values = [v for vs in report.series().values() for v in vs if v is not None and math.isfinite(v) and v > 0]
    low = min([e5m2.smallest_subnormal, *values]) / 4
    high = max([e5m2.max, *values]) * 4
    for panel, ax in enumerate(axes):
        ax.axhspan(e5m2.smallest_subnormal, e5m2.max, color="tab:orange", alpha=0.10, label="E5M2 range (gradients)")
        ax.axhspan(e4m3.smallest_subnormal, e4m3.max, color="tab:blue", alpha=0.10, label="E4M3 range (forward)")
        ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        for i, (attr, header, label, _panel) in enumerate(s for s in SERIES if s[3] == panel):
            marker, color = styles[i]
            ys = [getattr(row, attr) for row in report.layers]
            ax.plot(x, ys, marker=marker, linestyle="none", color=color, markersize=4, label=label, gid=header)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.set_title(panel_titles[panel], fontsize=10)
        ax.set_xticks(x, [row.name for row in report.layers], rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("RMS over non-zero elements")
    if not report.calibrated:
        axes[1].text(0.5, 0.5, "not calibrated", transform=axes[1].transAxes, ha="center", color="0.4")
    fig.suptitle(title or "Why unit scaling matters: tensor scales against the FP8 ranges", fontsize=11)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
