"""Low-precision number formats and saturating casts.

A cast to format F maps x to the nearest value representable in F after clamping to
[-F.max, F.max]: torch's float8_e4m3fn cast already saturates on CPU, but float8_e5m2
overflows to inf, so every cast clamps first. A cast can also *underflow*: a non-zero
x with |x| below half of F's smallest subnormal becomes 0. `CastCounter` counts both,
so a run can show that unit-scaled operands neither saturate nor flush to zero.

    format  max      smallest subnormal  use
    e4m3    448      2^-9                forward operands (activations, weights); gradients too under "E4M3"
    e5m2    57344    2^-16               backward operands (output gradients) under "HYBRID"
    bf16    3.4e38   2^-133              either

`FP8_FORMAT_PAIRS` names the (forward, gradient) pairs as accelerate's and Transformer Engine's
`fp8_format` does: "HYBRID" (E4M3 forward, E5M2 gradients) and "E4M3" (E4M3 for both). With
static unit scales (g/c at unit RMS), E4M3 gradients flush the elements below ~2^-10·rms(g),
which carry next to nothing of g^T x, and its extra mantissa bit brings the weight gradients
closer to fp32 (benchmarks/fp8_error_sources.py); trained, both pairs end at the same eval loss
(benchmarks/results/e4m3_gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "FORMATS",
    "FP8_FORMAT_PAIRS",
    "CastCounter",
    "LowPrecisionFormat",
    "all_finite",
    "cast_to_format",
    "get_format",
    "round_trip",
]


@dataclass(frozen=True)
class LowPrecisionFormat:
    """A floating-point storage format: its torch dtype, largest finite value and smallest subnormal."""

    name: str
    dtype: torch.dtype
    max: float
    smallest_subnormal: float

    @property
    def is_fp8(self) -> bool:
        return self.dtype.itemsize == 1

    @property
    def dynamic_range(self) -> float:
        """max / smallest subnormal: how far apart two magnitudes both held in this format can be (e4m3 2^17.8,
        e5m2 2^31.8). An operand whose peak sits at max/h keeps its RMS representable only if h·peak/RMS stays
        within it."""
        return self.max / self.smallest_subnormal


FORMATS: dict[str, LowPrecisionFormat] = {
    "e4m3": LowPrecisionFormat("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-9),
    "e5m2": LowPrecisionFormat("e5m2", torch.float8_e5m2, 57344.0, 2.0**-16),
    "bf16": LowPrecisionFormat(
        "bf16", torch.bfloat16, torch.finfo(torch.bfloat16).max, torch.finfo(torch.bfloat16).smallest_normal * 2.0**-7
    ),
}

# accelerate's / Transformer Engine's `fp8_format` names → (forward operand format, output-gradient format)
FP8_FORMAT_PAIRS: dict[str, tuple[str, str]] = {"HYBRID": ("e4m3", "e5m2"), "E4M3": ("e4m3", "e4m3")}


def get_format(name: str) -> LowPrecisionFormat:
    """The format called `name` in any case ("e4m3", "E4M3", as `fp8_format` takes), or a ValueError listing the
    known ones."""
    try:
        return FORMATS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unknown low-precision format {name!r}; choose one of {sorted(FORMATS)}.") from None


COUNTS = ("seen", "nonzero", "saturated", "underflowed")


@dataclass
class CastCounter:
    """Running counts over casts: elements seen, non-zero inputs, saturated (|x| > max) and underflowed
    (x != 0 but cast to 0), in one int64 tensor `counts` (in `COUNTS` order).

    Counting never synchronizes a GPU, and it adds in place, so `torch.compile` traces it into the
    graph (rebinding a Python attribute inside an autograd.Function would break the graph at every layer).
    """

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(len(COUNTS), dtype=torch.int64))

    def update(self, x: torch.Tensor, fmt: LowPrecisionFormat) -> None:
        """Count the elements of x that a cast to `fmt` saturates (|x| > max) or flushes to zero. Rounding is to
        nearest-even, so a non-zero x becomes 0 exactly when |x| <= smallest_subnormal / 2: comparing |x| with that
        bound counts the same elements as `cast == 0` without reading the low-precision tensor back."""
        if self.counts.device != x.device:  # the model moved after `track_casts`
            self.counts = self.counts.to(x.device)
        magnitude = x.detach().abs()
        nonzero = (magnitude > 0).sum()
        seen = torch.full((), x.numel(), dtype=torch.int64, device=x.device)
        saturated = (magnitude > fmt.max).sum()
        underflowed = nonzero - (magnitude > fmt.smallest_subnormal / 2).sum()
        self.counts.add_(torch.stack([seen, nonzero, saturated, underflowed]))

    def as_dict(self) -> dict[str, float]:
        """Counts and the fractions a log wants: saturated / seen and underflowed / non-zero."""
        counts = dict(zip(COUNTS, self.counts.tolist(), strict=True))
        return {
            **counts,
            "saturated_fraction": counts["saturated"] / max(counts["seen"], 1),
            "underflow_fraction": counts["underflowed"] / max(counts["nonzero"], 1),
        }

    def reset(self) -> None:
        self.counts.zero_()


def cast_to_format(x: torch.Tensor, fmt: LowPrecisionFormat, counter: CastCounter | None = None) -> torch.Tensor:
    """x cast to `fmt.dtype`, saturating at ±fmt.max. Counts into `counter` when given."""
    # clamp: casting to float8_e5m2 overflows to inf instead of saturating
    limit = min(fmt.max, torch.finfo(x.dtype).max)  # bf16's max does not fit an fp16 x's clamp
    cast = x.clamp(-limit, limit).to(fmt.dtype)
    if counter is not None:
        counter.update(x, fmt)
    return cast


def round_trip(x: torch.Tensor, fmt: LowPrecisionFormat, counter: CastCounter | None = None) -> torch.Tensor:
    """x cast to `fmt` and back to x's dtype: the rounding error of storing x in `fmt`."""
    return cast_to_format(x, fmt, counter).to(x.dtype)


# {float dtype: (integer dtype of its width, the smallest sign-cleared bit pattern that is inf or nan)}: an IEEE float's
# bits, read as an integer with the sign bit cleared, grow with |x|, and inf (all-ones exponent, zero mantissa) and the
# nans sit above every finite value; float8_e4m3fn has no inf, its only nan is S.1111.111
_NON_FINITE_FROM = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float8_e5m2: (torch.uint8, 0x7C),
    torch.float8_e4m3fn: (torch.uint8, 0x7F),
}


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite, as `torch.isfinite(t).all()`: for the IEEE dtypes (and
    e4m3fn), max over the bits with the sign cleared < the first non-finite pattern. One integer reduction, no bool
    tensor and no fp32 copy of an FP8 tensor (on SmolLM2's 106M E4M3 values: 0.01 s against 5 s warm)."""
    if t.numel() == 0:
        return True
    if t.dtype not in _NON_FINITE_FROM:  # the fnuz float8 variants (nan is -0's pattern), …: isfinite, upcast
        return bool(torch.isfinite(t.float() if t.itemsize == 1 else t).all())  # (float8 lacks it on some devices)
    bits, non_finite_from = _NON_FINITE_FROM[t.dtype]
    magnitude = t.view(bits).bitwise_and((1 << (8 * t.itemsize - 1)) - 1)  # the sign bit cleared
    return int(magnitude.max()) < non_finite_from
