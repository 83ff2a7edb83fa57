"""Unit-scaled layers: the original module, re-classed, holding Ŵ, s, a and c.

Conversion swaps a module's class in place (`module.__class__ = UnitScaledLinear`), so the module
keeps its parameters, hooks and attributes, `isinstance(module, nn.Linear)` still holds for
transformers/peft/accelerate code, and tied weights stay one Parameter. Each class adds

    weight_scale  s   fp32 scalar buffer, rms of the original weight
    input_scale   a   fp32 scalar buffer, static input scale (1 until calibrated)      [matmuls only]
    grad_scale    c   fp32 scalar buffer, static output-gradient scale (1 until calibrated)

and a forward that calls the math in `ops.py`. `precision` (a `MatmulPrecision` or None) and
`cast_counters` are plain attributes (class defaults None) set by `set_precision` and `track_casts`, not state.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .ops import MatmulPrecision, OperandCounters, apply_scale, scaled_embedding, scaled_linear

__all__ = [
    "EMBEDDING_CLASSES",
    "MATMUL_CLASSES",
    "SCALE_SUFFIX",
    "UnitScaledConv1D",
    "UnitScaledEmbedding",
    "UnitScaledLinear",
    "UnitScaledMatmulMixin",
    "UnitScaledModuleMixin",
    "generic_unit_scaled_class",
]

logger = logging.get_logger(__name__)

SCALE_SUFFIX = "_scale"


class UnitScaledModuleMixin:
    """Marks a converted module; `base_class` is the class it had before conversion."""

    base_class: type[nn.Module]
    unit_scaled_weights: tuple[str, ...] = ("weight",)

    def scale_of(self, weight_name: str) -> torch.Tensor:
        return getattr(self, weight_name + SCALE_SUFFIX)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would round the fp32 scales (s to 3 significant digits):
        # they follow the module's device but keep their own dtype
        scales = {name: buf for name, buf in self._buffers.items() if name.endswith(SCALE_SUFFIX) and buf is not None}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        scales = ", ".join(f"{n}{SCALE_SUFFIX}={self.scale_of(n).item():.4g}" for n in self.unit_scaled_weights)
        return f"{super().extra_repr()}, {scales}"


class UnitScaledMatmulMixin(UnitScaledModuleMixin):
    """A converted matmul layer: also carries the static operand scales a, c and the GEMM precision."""

    input_scale: torch.Tensor
    grad_scale: torch.Tensor
    precision: MatmulPrecision | None = None
    cast_counters: OperandCounters | None = None
    _scales_checked: tuple[bool, ...] = ()  # with a backward or not: checked at the layer's first such GEMM

    def _warn_if_uncalibrated(self, backward: bool) -> None:
        """Once per layer at its first low-precision GEMM, forward-only (evaluate, predict) and with a backward:
        a = c = 1 means no calibration has run. Then inputs far from unit RMS saturate or flush in E4M3, and in a
        backward most of a pretrained model's output gradients (RMS ~1e-6–1e-4) flush to zero in E5M2. One warning
        per process and consequence."""
        self._scales_checked = (*self._scales_checked, backward)
        if float(self.input_scale) != 1.0 or float(self.grad_scale) != 1.0:
            return
        consequences = []
        forward, gradient = self.precision.forward, self.precision.backward
        if forward is not None and forward.is_fp8:
            flushed = math.log2(forward.smallest_subnormal / 2)
            consequences.append(
                f"inputs are cast to {forward.name.upper()} as they are, so where a layer's inputs are far from unit "
                f"RMS they saturate beyond ±{forward.max:g} or flush to zero below 2^{flushed:g}"
            )
        if backward and gradient is not None and gradient.is_fp8:
            consequences.append(
                "most output gradients (RMS ~1e-6–1e-4 in a pretrained model) flush to zero in " + gradient.name.upper()
            )
        if consequences:
            logger.warning_once(
                f"FP8 GEMMs run with uncalibrated static scales (a = c = 1): {'; '.join(consequences)}. Call "
                "`hf_unitscale.calibrate(model, batches)` first (`UnitScaleTrainer` with `fp8=True` calibrates at "
                "train begin)."
            )

    def _scaled_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # once both kinds of GEMM are checked (len 2), every later call skips this
        if self.precision is not None and len(self._scales_checked) < 2 and not torch.compiler.is_compiling():
            backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            if backward not in self._scales_checked:
                self._warn_if_uncalibrated(backward)
        return scaled_linear(
            x,
            weight,
            self.bias,
            self.weight_scale,
            self.input_scale,
            self.grad_scale,
            self.precision,
            self.cast_counters,
        )


class UnitScaledLinear(UnitScaledMatmulMixin, nn.Linear):
    """nn.Linear with weight = Ŵ: y = s·a·(q(x/a) @ q(Ŵ)ᵀ) + b."""

    base_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scaled_linear(x, self.weight)


class UnitScaledConv1D(UnitScaledMatmulMixin, Conv1D):
    """transformers' Conv1D (weight stored in × out) with weight = Ŵ: y = s·a·(q(x/a) @ q(Ŵ)) + b."""

    base_class = Conv1D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scaled_linear(x, self.weight.t())


class UnitScaledEmbedding(UnitScaledModuleMixin, nn.Embedding):
    """nn.Embedding with weight = Ŵ: y = s·Ŵ[ids]."""

    base_class = nn.Embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return scaled_embedding(
            ids,
            self.weight,
            self.weight_scale,
            padding_idx=self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )


class _GenericUnitScaled(UnitScaledModuleMixin):
    """Any module whose weights are rescaled: forward runs the original forward with each
    converted weight replaced by s·Ŵ (one weight-sized multiply per call)."""

    def forward(self, *args, **kwargs):
        scaled = {name: apply_scale(getattr(self, name), self.scale_of(name)) for name in self.unit_scaled_weights}
        with _reparametrize_module(self, scaled):
            return super().forward(*args, **kwargs)


_GENERIC_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def generic_unit_scaled_class(base: type[nn.Module]) -> type[nn.Module]:
    """The (cached) class `UnitScaled<base>` that runs `base.forward` on s·Ŵ weights."""
    if base not in _GENERIC_CLASSES:
        _GENERIC_CLASSES[base] = type(f"UnitScaled{base.__name__}", (_GenericUnitScaled, base), {"base_class": base})
    return _GENERIC_CLASSES[base]


MATMUL_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: UnitScaledLinear,
    Conv1D: UnitScaledConv1D,
}
EMBEDDING_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Embedding: UnitScaledEmbedding}
