"""The scaled matmul and embedding: all the math of a unit-scaled layer.

A converted weight W is stored as a unit-scale tensor Ŵ = W / s with s a stored scalar: rms(W), or the power of
two nearest it (`UnitScaleConfig.power_of_two_scales`).
A linear layer with input x, output gradient g and static operand scales a (input) and c
(output gradient), both 1 until calibrated, computes three GEMMs:

    forward      y   = (s·a) · ( q_f(x/a) @ q_f(Ŵ)ᵀ ) + b
    grad-input   ∂x  = (s·c) · ( q_b(g/c) @ q_f(Ŵ) )
    grad-weight  ∂Ŵ  = (s·a·c) · ( q_b(g/c)ᵀ @ q_f(x/a) )          (= s·∂W)

q_f, q_b are saturating casts to a low-precision format (E4M3 forward, E5M2 backward, or bf16);
every operand they see has unit scale when a = rms(x) and c = rms(g), so FP8 needs no dynamic
amax scaling. The scalar products are applied to the fp32 GEMM output: `torch._scaled_mm`
takes exactly these per-tensor scales (backend "scaled_mm"); backend "simulate" runs the same GEMM
in fp32 on the cast values, which runs everywhere. Both round once to the input's dtype (under autocast,
its dtype), and both divide x/a and g/c in fp32.

Without casts the three GEMMs are mathematically x @ Wᵀ + b, so the full-precision path is
F.linear(s·x, Ŵ, b) when in < out and s·F.linear(x, Ŵ, b/s) otherwise: one multiply over the
smaller activation (a weight-sized multiply would re-allocate an LM head's 50k×d weight every
step), autograd for the rest; a 16-bit activation is multiplied in fp32 and rounded once (`apply_scale`).
The bias stays inside the GEMM, as in nn.Linear, so with a power-of-two s every rounding is the original
layer's, scaled by a power of two: the output is bit for bit x @ Wᵀ + b.
Embeddings: y = s · Ŵ[ids]; their lookups are not GEMMs and stay in the compute dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .formats import CastCounter, LowPrecisionFormat, cast_to_format

__all__ = ["BACKENDS", "MatmulPrecision", "OperandCounters", "apply_scale", "rms", "scaled_embedding", "scaled_linear"]

BACKENDS = ("simulate", "scaled_mm")
# torch._scaled_mm on CUDA needs the inner dimension K and the output width N of its GEMMs to be multiples of 16
SCALED_MM_ALIGNMENT = 16


def check_backend(backend: Any, option: str = "backend") -> None:
    """Refuse a GEMM backend that is not one of `BACKENDS`; errors name `option`, the argument that gave it."""
    if backend not in BACKENDS:
        raise ValueError(f"`{option}` must be one of {BACKENDS}, got {backend!r}.")


@dataclass(frozen=True)
class MatmulPrecision:
    """How a converted layer runs its GEMMs: forward/backward operand formats (None = no cast) and backend."""

    forward: LowPrecisionFormat | None = None
    backward: LowPrecisionFormat | None = None
    backend: str = "simulate"

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.backend == "scaled_mm" and not all(f is not None and f.is_fp8 for f in (self.forward, self.backward)):
            raise ValueError("The `scaled_mm` backend needs FP8 formats for both forward and backward operands.")

    def __str__(self) -> str:
        forward, backward = (f.name if f is not None else "full" for f in (self.forward, self.backward))
        return f"{forward} forward, {backward} backward ({self.backend})"


@dataclass
class OperandCounters:
    """Saturation/underflow counts of the three low-precision operands of one layer."""

    input: CastCounter
    weight: CastCounter
    grad_output: CastCounter

    @classmethod
    def new(cls) -> OperandCounters:
        return cls(CastCounter(), CastCounter(), CastCounter())


def rms(x: torch.Tensor, *, nonzero_only: bool = False) -> torch.Tensor:
    """sqrt(mean(x²)) in fp64 (0-d); over non-zero elements only when asked (padding zeroes gradient rows)."""
    x = x.detach().double()
    if nonzero_only:
        count = (x != 0).sum()
        return (x.square().sum() / count.clamp(min=1)).sqrt()
    return x.square().mean().sqrt()


def apply_scale(t: torch.Tensor, scale: torch.Tensor, *, divide: bool = False) -> torch.Tensor:
    """t·s (t/s with `divide`) in t's dtype, computed in fp32 for a 16-bit t and rounded once: s rounded to
    bf16 would scale a whole tensor, or a whole layer's outputs, by one wrong factor (up to 2^-9)."""
    op = torch.div if divide else torch.mul
    if t.dtype in (torch.float16, torch.bfloat16):
        return op(t.float(), scale.float()).to(t.dtype)
    return op(t, scale.to(t.dtype))


def _cast(x: torch.Tensor, fmt: LowPrecisionFormat | None, counter: CastCounter | None) -> torch.Tensor:
    return x if fmt is None else cast_to_format(x, fmt, counter)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _scale_and_cast(
    x: torch.Tensor, scale: torch.Tensor, fmt: LowPrecisionFormat | None, counter: CastCounter | None, dtype
) -> torch.Tensor:
    """q(x/scale), dividing in fp32: the GEMM output is multiplied back by the fp32 scale, and a scale rounded to a
    16-bit x's dtype on one side only would bias every output of the layer by the same factor (up to ~1% in bf16)."""
    scaled = _at_least_fp32(x) / scale
    return scaled.to(dtype) if fmt is None else cast_to_format(scaled, fmt, counter)


def _pad_to_alignment(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to a multiple of SCALED_MM_ALIGNMENT (itself if already one)."""
    missing = -t.shape[dim] % SCALED_MM_ALIGNMENT
    if missing == 0:
        return t
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = missing  # F.pad lists the last dimension first
    return F.pad(t, pad)


@functools.cache
def scaled_mm_runs_on(device: torch.device) -> bool:
    """Whether this torch has a `torch._scaled_mm` kernel for `device`: CPU has one in torch 2.13, none in 2.6;
    CUDA needs compute capability 8.9 or higher. Probed once per device with a 16 × 16 E4M3 GEMM."""
    square = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        torch._scaled_mm(square, square.t(), one, one, out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _check_scaled_mm_runs_on(device: torch.device) -> None:
    if torch.compiler.is_compiling() or scaled_mm_runs_on(device):
        return
    raise NotImplementedError(
        f"backend='scaled_mm' needs a torch._scaled_mm kernel for {device}, and torch {torch.__version__} has none "
        "there (CPU has one in torch 2.13, none in 2.6; CUDA needs compute capability 8.9 or higher). Use "
        "backend='simulate' (`set_precision(..., backend='simulate')`), which applies the same casts and scales "
        "around a full-precision matmul, or move the model to a device that has the kernel."
    )


def _gemm(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """scale · (a @ b) for a (M × K), b (K × N), possibly in a low-precision dtype; result in `out_dtype`, rounded
    once (autocast is off inside: it would round the simulated fp32 product to bf16 before the scale).

    `scaled_mm` zero-pads K and N to multiples of SCALED_MM_ALIGNMENT (zeros add nothing to a dot product; the
    padded columns are cut off): CUDA's FP8 GEMM refuses other shapes, and K of the weight-gradient GEMM is the
    token count, which no batch shape guarantees.
    """
    with torch.autocast(a.device.type, enabled=False):
        if backend == "scaled_mm":
            _check_scaled_mm_runs_on(a.device)
            n = b.shape[1]
            a = _pad_to_alignment(a, 1).contiguous()  # row-major
            b = _pad_to_alignment(_pad_to_alignment(b, 0), 1).t().contiguous().t()  # column-major
            # scales are fp32 scalars applied to the fp32 accumulator
            one = torch.ones((), dtype=torch.float32, device=a.device)
            out = torch._scaled_mm(a, b, scale.float(), one, out_dtype=out_dtype)
            return out if out.shape[1] == n else out[:, :n]
        # as `_scaled_mm`: an fp32 GEMM (exact products of FP8 values, fp32 accumulation), the fp32 scale applied
        # to it, one rounding to `out_dtype`
        return (_at_least_fp32(a) @ _at_least_fp32(b) * scale).to(out_dtype)


class _ScaledMatmul(torch.autograd.Function):
    """The three GEMMs of the module docstring on 2-D x (tokens × in) and Ŵ (out × in); bias outside."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, input_scale, grad_scale, precision, counters):
        fwd = precision.forward
        x_cast = _scale_and_cast(x, input_scale, fwd, counters and counters.input, x.dtype)
        w_cast = _cast(weight, fwd, counters and counters.weight)
        ctx.save_for_backward(x_cast, w_cast, weight_scale, input_scale, grad_scale)
        ctx.precision, ctx.counters, ctx.dtypes = precision, counters, (x.dtype, weight.dtype)
        return _gemm(x_cast, w_cast.t(), input_scale * weight_scale, x.dtype, precision.backend)

    @staticmethod
    def backward(ctx, grad_output):
        x_cast, w_cast, weight_scale, input_scale, grad_scale = ctx.saved_tensors
        precision, counters = ctx.precision, ctx.counters
        x_dtype, w_dtype = ctx.dtypes
        g_cast = _scale_and_cast(
            grad_output, grad_scale, precision.backward, counters and counters.grad_output, x_dtype
        )
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(g_cast, w_cast, grad_scale * weight_scale, x_dtype, precision.backend)
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(g_cast.t(), x_cast, grad_scale * input_scale * weight_scale, x_dtype, precision.backend)
            grad_w = grad_w.to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None


def scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    grad_scale: torch.Tensor,
    precision: MatmulPrecision | None = None,
    counters: OperandCounters | None = None,
) -> torch.Tensor:
    """y = s·(x @ Ŵᵀ) + b for x of shape (..., in) and Ŵ of shape (out, in).

    `precision=None` is the full-precision path (s multiplies the smaller activation), for which a and c do not
    matter; otherwise the three GEMMs of the module docstring with casts to `precision`'s formats.
    """
    if precision is None:
        out_features, in_features = weight.shape
        if in_features < out_features:
            return F.linear(apply_scale(x, weight_scale), weight, bias)
        unscaled_bias = None if bias is None else apply_scale(bias, weight_scale, divide=True)
        return apply_scale(F.linear(x, weight, unscaled_bias), weight_scale)
    if torch.is_autocast_enabled(x.device.type):  # as F.linear under autocast: compute and return in its dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    out = _ScaledMatmul.apply(
        x.reshape(-1, x.shape[-1]), weight, weight_scale, input_scale, grad_scale, precision, counters
    )
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


def scaled_embedding(ids: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, **kwargs) -> torch.Tensor:
    """y = s · Ŵ[ids]; kwargs are F.embedding's padding_idx, scale_grad_by_freq and sparse. Not max_norm: it
    would renormalize rows of Ŵ, not of W, so conversion leaves embeddings with a max_norm unconverted."""
    return apply_scale(F.embedding(ids, weight, **kwargs), weight_scale)
