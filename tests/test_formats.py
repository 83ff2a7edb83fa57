"""Formats and casts: saturation on both FP8 formats, underflow to zero, and the counts of both."""

import pytest
import torch

from hf_unitscale.formats import FORMATS, CastCounter, all_finite, cast_to_format, get_format, round_trip


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_cast_saturates_instead_of_overflowing(name):
    fmt = get_format(name)
    x = torch.tensor([4 * fmt.max, -4 * fmt.max, fmt.max, -fmt.max, 1.0, 1.5 * fmt.max])
    counter = CastCounter()
    y = round_trip(x, fmt, counter)
    assert torch.isfinite(y).all(), f"{name}: cast overflowed to inf: {y}"
    assert y.tolist() == [fmt.max, -fmt.max, fmt.max, -fmt.max, 1.0, fmt.max], f"{name}: did not clamp: {y}"
    assert counter.as_dict()["saturated"] == 3
    assert counter.as_dict()["saturated_fraction"] == pytest.approx(0.5)


def test_format_names_are_case_insensitive_as_fp8_format_is():
    assert get_format("E4M3") is get_format("e4m3") is FORMATS["e4m3"]
    assert get_format("BF16") is FORMATS["bf16"]
    with pytest.raises(ValueError, match="Unknown low-precision format 'E3M4'"):
        get_format("E3M4")


def test_bf16_format_casts_fp16_values():
    # bf16's max (3.4e38) is no fp16 number: clamping an fp16 tensor to it raised
    x = torch.tensor([1.0, -65504.0, 3.0e-5], dtype=torch.float16)
    assert round_trip(x, get_format("bf16")).tolist() == x.bfloat16().half().tolist()


def test_e5m2_without_clamp_would_overflow():
    """Why cast_to_format clamps: torch's e5m2 cast turns values past its max into inf on CPU."""
    x = torch.tensor([60000.0, 1e6])
    assert torch.isinf(x.to(torch.float8_e5m2).float()).any()
    assert torch.isfinite(cast_to_format(x, FORMATS["e5m2"]).float()).all()


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_underflow_is_counted_over_nonzero_elements(name):
    fmt = get_format(name)
    tiny = fmt.smallest_subnormal / 4  # below half the smallest subnormal: rounds to 0
    x = torch.tensor([tiny, -tiny, 0.0, 0.0, 1.0, fmt.smallest_subnormal])
    counter = CastCounter()
    y = round_trip(x, fmt, counter)
    assert y[0] == 0 and y[1] == 0
    assert y[5].item() == fmt.smallest_subnormal, "the smallest subnormal itself must survive"
    stats = counter.as_dict()
    assert stats["underflowed"] == 2
    assert stats["nonzero"] == 4
    assert stats["underflow_fraction"] == pytest.approx(0.5)
    assert stats["seen"] == 6 and stats["saturated"] == 0


def test_counter_accumulates_and_resets():
    counter = CastCounter()
    fmt = FORMATS["e4m3"]
    for _ in range(3):
        cast_to_format(torch.tensor([1000.0, 1.0]), fmt, counter)
    assert counter.as_dict()["saturated"] == 3 and counter.as_dict()["seen"] == 6
    counter.reset()
    assert counter.as_dict()["seen"] == 0


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "bf16"])
def test_round_trip_keeps_representable_values(name):
    fmt = get_format(name)
    x = torch.tensor([0.0, 1.0, -2.0, 0.5, 0.25, 3.0])
    assert torch.equal(round_trip(x, fmt), x)
    assert cast_to_format(x, fmt).dtype == fmt.dtype


def test_fp8_relative_rounding_error_at_unit_scale():
    """A unit-RMS operand keeps the format's relative precision: ≤ 2^-4 (E4M3) and ≤ 2^-3 (E5M2)."""
    x = torch.randn(10_000)
    for name, bound in (("e4m3", 2.0**-4), ("e5m2", 2.0**-3)):
        y = round_trip(x, FORMATS[name])
        normal = x.abs() > 2.0**-6
        rel = ((y - x).abs() / x.abs())[normal].max().item()
        assert rel <= bound, f"{name}: relative rounding error {rel} exceeds {bound}"


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="e4m3"):
        get_format("e3m4")


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float8_e5m2,
        torch.float8_e4m3fn,
        torch.float8_e4m3fnuz,
    ],
)
def test_all_finite_agrees_with_isfinite(dtype):
    """Read from the bits: the largest finite values of both signs are finite, every nan is not, and an inf (where
    the cast keeps it: e4m3fn's saturates) is not."""
    largest, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    values = torch.tensor([0.0, -0.0, 1.0, largest, -largest, tiny], dtype=torch.float64)
    assert all_finite(values.to(dtype)) and all_finite(values[:0].to(dtype))
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        spoiled = values.clone()
        spoiled[3] = bad
        spoiled = spoiled.to(dtype)
        assert all_finite(spoiled) == bool(torch.isfinite(spoiled.double()).all()), (dtype, bad)
        assert all_finite(spoiled) == (dtype == torch.float8_e4m3fn and abs(bad) == float("inf")), (dtype, bad)
