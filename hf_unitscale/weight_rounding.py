"""Where a forward format's grid sits under Ŵ: the weight-cast scale d of `calibrate(..., weight_rounding_search=True)`.

A converted matmul casts q(Ŵ/d) and multiplies its GEMM output by d (`ops.py`), so d changes nothing but which
format values Ŵ's elements round to. Within a factor √2 of rms(Ŵ) every d keeps the cast operand at unit scale,
and FP8 rounding is scale-free on average, but not for one fixed tensor: the rounding errors
ΔŴ(d) = d·q(Ŵ/d) − Ŵ of a given Ŵ change with d, and so does the layer's output error
ΔY = X·ΔŴᵀ (rows of X the layer's input tokens). Its expected square,

    Σ_t ‖ΔŴ x_t‖² = tr(ΔŴ Σₓ ΔŴᵀ),    Σₓ = Σ_t x_t x_tᵀ,

is what the search minimizes, with Σₓ replaced by its diagonal f_j = Σ_t x_tj² (measured on the calibration
batches):

    err(d) = Σ_ij f_j · ΔŴ_ij(d)²,    d ∈ {rms(Ŵ)·2^(k/J − 1/2) : k = 0 … J−1}.

Weighting by f_j puts the precision where the inputs are large (transformers' outlier features): on SmolLM2 at
step 0 (one seed, 256 held-out sequences) it moved the FP8 forward's next-token KL to the fp32 forward from 0.0477
to 0.0449 (torchao's dynamic per-tensor scaling: 0.0439; the full Σₓ: 0.0466). The diagonal needs one number per
input feature and J casts of Ŵ, where Σₓ would need in² numbers per layer.
"""

from __future__ import annotations

import torch

from .formats import LowPrecisionFormat, round_trip
from .ops import rms

__all__ = ["best_weight_cast_scale"]


@torch.no_grad()
def best_weight_cast_scale(
    weight: torch.Tensor, feature_squares: torch.Tensor, fmt: LowPrecisionFormat, steps: int = 32
) -> float:
    """The d within a factor √2 of rms(`weight`) (a grid of `steps` per octave) minimizing
    Σ_ij f_j (d·q(Ŵ_ij/d) − Ŵ_ij)², for Ŵ = `weight` (out × in) and f = `feature_squares` (in,)."""
    weight = weight.detach().float()
    if weight.shape[-1] != feature_squares.shape[-1]:
        raise ValueError(
            f"The input has {feature_squares.shape[-1]} features but the weight {tuple(weight.shape)} reads "
            f"{weight.shape[-1]}."
        )
    center = float(rms(weight))
    if not center > 0:
        return 1.0
    importance = feature_squares.to(weight.device, torch.float32)
    candidates = [center * 2.0 ** (k / steps - 0.5) for k in range(steps)]
    errors = [float(((round_trip(weight / d, fmt) * d - weight).square() * importance).sum()) for d in candidates]
    return candidates[min(range(steps), key=errors.__getitem__)]
