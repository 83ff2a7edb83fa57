"""RMS statistics of GEMM operands, shared by calibration (`calibrate.py`) and scale reports (`analysis.py`).

An operand's scale is its RMS over non-zero elements (padding zeroes whole gradient rows, ReLU
zeroes inputs; zeros are exact in every format). Over several batches the per-batch mean squares
are averaged, then rooted:

    rms = sqrt( mean_b  ( Σ_{t≠0} t² / #{t≠0} )_b )

so one outlier batch does not dominate as a max would, and several tensors seen in one batch
(a layer called twice) pool into that batch's mean square. Each accumulator also keeps the peak
max|t| (how a static scale sits against a format's largest value); `ExponentHistogramAccumulator`
adds a histogram of the binary exponents of the non-zero |t| (what a scale flushes to zero), and
`RoundingErrorAccumulator` the error of casting t to a format at scales across one octave (which scale
near the RMS rounds t best).

`OperandRmsHooks` measures them on real batches: a forward pre-hook records each layer's input x,
a forward hook keeps its output, and the loss is differentiated with `torch.autograd.grad` with
respect to those outputs, which gives each layer's output gradient g without creating or changing
any parameter `.grad`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .formats import LowPrecisionFormat, round_trip
from .modules import UnitScaledMatmulMixin
from .ops import rms

__all__ = [
    "ExponentHistogramAccumulator",
    "OperandRmsHooks",
    "RmsAccumulator",
    "RoundingErrorAccumulator",
]

# |t| = m·2^e with m in [0.5, 1) (torch.frexp); bin e + EXPONENT_OFFSET counts the |t| in [2^(e-1), 2^e).
# fp32 exponents run from -148 (smallest subnormal) to 128.
EXPONENT_OFFSET = 160
EXPONENT_BINS = 320


class RmsAccumulator:
    """Running sqrt(mean over batches of the non-zero mean square) of one operand, and its peak max|t|
    over every batch (what a static scale must leave room for below a format's max)."""

    def __init__(self) -> None:
        self.sum_sq = self.count = 0.0  # the current batch
        self.ms_total = 0.0  # Σ over finished batches of their mean square
        self.batches = 0
        self.absmax = 0.0  # max|t| over every batch

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        count = float((t != 0).sum())
        # rms over non-zero elements, squared back to a sum so several tensors per batch pool correctly
        self.sum_sq += float(rms(t, nonzero_only=True)) ** 2 * count
        self.count += count
        if t.numel():
            self.absmax = max(self.absmax, float(t.abs().max()))

    def end_batch(self) -> None:
        if self.count:
            self.ms_total += self.sum_sq / self.count
            self.batches += 1
        self.sum_sq = self.count = 0.0

    def value(self) -> float:
        """The pooled RMS; nan when no batch saw a non-zero element."""
        return math.sqrt(self.ms_total / self.batches) if self.batches else math.nan

    def peak(self) -> float:
        """max|t| over every batch; nan when no batch saw a non-zero element."""
        return self.absmax if self.batches else math.nan


class ExponentHistogramAccumulator(RmsAccumulator):
    """An `RmsAccumulator` that also counts, over every batch, the binary exponents of the non-zero
    elements: how much of the operand a scale would flush to zero."""

    def __init__(self) -> None:
        super().__init__()
        self.exponent_counts = torch.zeros(EXPONENT_BINS, dtype=torch.float64)

    def add(self, t: torch.Tensor) -> None:
        super().add(t)
        t = t.detach()
        bins = (torch.frexp(t.float()).exponent[t != 0] + EXPONENT_OFFSET).clamp_(0, EXPONENT_BINS - 1)
        self.exponent_counts += torch.bincount(bins, minlength=EXPONENT_BINS).to("cpu", torch.float64)

    def largest_scale_flushing_at_most(self, fraction: float, smallest_subnormal: float) -> float:
        """The largest scale c, to within a factor 2, at which at most `fraction` of the non-zero elements seen
        flush to zero when cast as t/c to a format whose smallest subnormal is m.

        A cast flushes |t/c| < m/2. With T = 2^e the largest power of two such that
        #{0 < |t| < T} ≤ fraction·#{t ≠ 0} (read off the exponent histogram), c = 2T/m. nan when no
        batch saw a non-zero element.
        """
        if not self.batches:
            return math.nan
        below = torch.cumsum(self.exponent_counts, 0)  # below[i] = #{0 < |t| < 2^(i - EXPONENT_OFFSET)}
        allowed = fraction * float(below[-1])
        index = int((below <= allowed).nonzero().max())
        return 2.0 ** (index - EXPONENT_OFFSET) * 2 / smallest_subnormal


class RoundingErrorAccumulator(RmsAccumulator):
    """An `RmsAccumulator` that also sums, over every batch, the squared error of casting the operand to
    `fmt` at each scale of a grid across one octave: which scale within a factor √2 of the RMS rounds it best.

    A scale 2^(k + j/J) (J = `steps`) keeps the operand's mantissas where the scale 2^(j/J) puts them, so
    away from the format's ends (saturation, subnormals) the error of casting t/a is periodic in log2(a)
    with period 1. Each tensor is divided by 2^e, e = round(log2(rms(t))) (exact: a power of two), and cast
    at the J scales 2^(j/J); the errors, multiplied back by 4^e, add up over tensors, batches and ranks.
    Where some elements keep the same values from batch to batch (outlier features), the grid point that
    puts them nearest to format values lowers the error well below what any scale gives on average.
    """

    def __init__(self, fmt: LowPrecisionFormat, steps: int = 32) -> None:
        super().__init__()
        self.fmt = fmt
        self.steps = steps
        self.squared_errors = torch.zeros(steps, dtype=torch.float64)

    def add(self, t: torch.Tensor) -> None:
        super().add(t)
        t = t.detach().float()
        value = float(rms(t, nonzero_only=True))
        if not (math.isfinite(value) and value > 0):
            return
        exponent = round(math.log2(value))
        t = t * 2.0**-exponent
        errors = []
        for j in range(self.steps):
            scale = 2.0 ** (j / self.steps)
            errors.append((round_trip(t / scale, self.fmt) * scale - t).double().square().sum())
        self.squared_errors += torch.stack(errors).to("cpu") * 4.0**exponent

    def best_scale_near(self, value: float) -> float:
        """The grid scale 2^(k + j/J) with the least summed cast error, k chosen so it lies within a factor √2
        of `value` (the pooled RMS); `value` itself when nothing was seen."""
        if not (self.batches and math.isfinite(value) and value > 0):
            return value
        offset = int(torch.argmin(self.squared_errors)) / self.steps
        return 2.0 ** (round(math.log2(value) - offset) + offset)


class OperandRmsHooks:
    """Hooks on `layers` that pool, per layer, rms(x) of its input and rms(g) of its output gradient.

    Used as a context manager (the hooks are removed on exit), one `forward` and one `backward` per batch:

        with OperandRmsHooks(layers) as hooks, torch.enable_grad():
            for batch in batches:
                inputs = model_inputs(model, batch)
                outputs = hooks.forward(model, inputs)
                hooks.backward(default_loss(outputs, inputs))
        rms_x, rms_g = hooks.inputs[name].value(), hooks.grads[name].value()

    Only calls inside `forward` are recorded (not, e.g., activation-checkpoint recomputation
    inside backward). A layer whose floating-point input does not require grad (a frozen front,
    or a fully frozen model) gets it as a leaf that does, so the graph reaches every layer output.

    Args:
        layers: {name: module}; a module's first positional argument is its input x.
        divide_by_scales: record x/a and g/c for converted matmul layers (the operands their FP8
            GEMMs see, with the static scales a, c at entry), else x and g.
        grad_accumulator: makes the accumulator of each layer's gradient operand.
        input_accumulators: {name: accumulator} for the inputs of some layers (default a new `RmsAccumulator`).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        *,
        divide_by_scales: bool = False,
        grad_accumulator: Callable[[], RmsAccumulator] = RmsAccumulator,
        input_accumulators: Mapping[str, RmsAccumulator] | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.divide_by_scales = divide_by_scales
        chosen = input_accumulators or {}
        self.inputs = {name: chosen.get(name) or RmsAccumulator() for name in self.layers}
        self.grads = {name: grad_accumulator() for name in self.layers}
        self._scales: dict[str, tuple[float, float]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._recording = False
        self._handles: list[Any] = []

    def accumulators(self) -> list[RmsAccumulator]:
        """Every input accumulator, then every gradient accumulator, in `layers` order."""
        return [*self.inputs.values(), *self.grads.values()]

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]):
            x = args[0] if args else None
            if not (self._recording and isinstance(x, torch.Tensor) and x.is_floating_point()):
                return None
            self.inputs[name].add(x.detach() / self._scales[name][0])
            if not x.requires_grad:  # a frozen front: let the graph reach this layer's output
                return (x.detach().requires_grad_(True), *args[1:])
            return None

        return hook

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any):
            if self._recording and isinstance(output, torch.Tensor) and output.requires_grad:
                self._outputs.setdefault(name, []).append(output)

        return hook

    def __enter__(self) -> OperandRmsHooks:
        for name, layer in self.layers.items():
            scaled = self.divide_by_scales and isinstance(layer, UnitScaledMatmulMixin)
            self._scales[name] = (float(layer.input_scale), float(layer.grad_scale)) if scaled else (1.0, 1.0)
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._recording = False
        self._outputs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def forward(self, model: nn.Module, inputs: Mapping[str, Any]) -> Any:
        """`model(**inputs)`, recording every layer's input and keeping its output for `backward`."""
        return self.record(lambda: model(**inputs))

    def record(self, run: Callable[[], Any]) -> Any:
        """`run()` (a forward, or a forward and its loss), recording as `forward` does."""
        self._outputs.clear()
        self._recording = True
        try:
            return run()
        finally:
            self._recording = False

    def backward(self, loss: torch.Tensor) -> None:
        """Record g = ∂loss/∂output of every layer output kept by `forward`, then close the batch."""
        names = [name for name, outs in self._outputs.items() for _ in outs]
        tensors = [t for outs in self._outputs.values() for t in outs]
        self._outputs.clear()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors else ()
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                self.grads[name].add(grad.detach() / self._scales[name][1])
        for acc in self.accumulators():
            acc.end_batch()
