"""The scaled matmul: its three GEMMs against autograd of F.linear, the backends against each other."""

import pytest
import torch
import torch.nn.functional as F

from hf_unitscale.formats import FORMATS
from hf_unitscale.ops import (
    MatmulPrecision,
    OperandCounters,
    rms,
    scaled_embedding,
    scaled_linear,
    scaled_mm_runs_on,
)

E4M3, E5M2 = FORMATS["e4m3"], FORMATS["e5m2"]


def _operands(dtype=torch.float32, seed=0, tokens=(3, 5), in_features=24, out_features=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_features, generator=g, dtype=dtype) * 0.3
    w_hat = torch.randn(out_features, in_features, generator=g, dtype=dtype)  # unit-scaled weight Ŵ
    bias = torch.randn(out_features, generator=g, dtype=dtype)
    s = torch.tensor(0.02)  # weight scale
    a = torch.tensor(0.3)  # input scale
    c = torch.tensor(1e-5)  # output-gradient scale
    grad_out = torch.randn(*tokens, out_features, generator=g, dtype=dtype) * 1e-5
    return x, w_hat, bias, s, a, c, grad_out


def _run(fn, x, w_hat, bias, grad_out):
    x = x.clone().requires_grad_(True)
    w_hat = w_hat.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    y = fn(x, w_hat, bias)
    y.backward(grad_out)
    return y.detach(), x.grad, w_hat.grad, bias.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("precision", [None, MatmulPrecision(None, None)], ids=["no-precision", "identity-casts"])
def test_three_gemms_match_autograd_of_linear(precision):
    """With identity casts, y, ∂x, ∂b equal those of F.linear(x, s·Ŵ, b) and ∂Ŵ = s·∂W, for any a, c."""
    x, w_hat, bias, s, a, c, grad_out = _operands(torch.float64)
    ref = _run(lambda x, w, b: F.linear(x, w * s.double(), b), x, w_hat, bias, grad_out)
    ours = _run(lambda x, w, b: scaled_linear(x, w, b, s, a, c, precision), x, w_hat, bias, grad_out)
    for name, got, want in zip(("y", "grad_x", "grad_w_hat", "grad_bias"), ours, ref, strict=True):
        # float64 operands; the scalar products s·a, s·c, s·a·c are formed in fp32 (rounding ≤ 2^-24)
        assert _rel(got, want) <= 1e-7, f"{name} differs: relative error {_rel(got, want)}"


def test_identity_casts_go_through_the_custom_function():
    """MatmulPrecision(None, None) is allowed and takes the three-GEMM path (it has a custom grad_fn)."""
    x, w_hat, bias, s, a, c, _ = _operands()
    y = scaled_linear(x.requires_grad_(True), w_hat, None, s, a, c, MatmulPrecision(None, None))
    assert "ScaledMatmul" in type(y.grad_fn).__name__ or "ScaledMatmul" in str(y.grad_fn.next_functions)


def test_gradcheck_of_scaled_matmul_with_identity_casts():
    x, w_hat, bias, s, a, c, _ = _operands(torch.float64)
    x = x[:1, :2, :6].clone().requires_grad_(True)
    w = w_hat[:4, :6].clone().requires_grad_(True)
    b = bias[:4].clone().requires_grad_(True)
    fn = lambda x, w, b: scaled_linear(x, w, b, s, a, torch.tensor(0.7), MatmulPrecision(None, None))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_fp8_gemms_are_close_to_fp32_when_operands_are_unit_scale():
    """With a = rms(x), c = rms(g) the E4M3/E5M2 GEMMs stay within FP8 rounding of fp32."""
    x, w_hat, bias, s, _, _, grad_out = _operands()
    a, c = rms(x).float(), rms(grad_out).float()
    precision = MatmulPrecision(E4M3, E5M2)
    ref = _run(lambda x, w, b: scaled_linear(x, w, b, s, a, c, None), x, w_hat, bias, grad_out)
    ours = _run(lambda x, w, b: scaled_linear(x, w, b, s, a, c, precision), x, w_hat, bias, grad_out)
    for name, got, want in zip(("y", "grad_x", "grad_w_hat"), ours[:3], ref[:3], strict=True):
        assert _rel(got, want) < 0.1, f"{name}: relative error {_rel(got, want):.3f} too large for FP8"


def test_16_bit_operands_meet_the_same_fp32_scales():
    """bf16 x, Ŵ, g: the casts see x/a and g/c computed in fp32 and the GEMMs multiply back by the fp32 scales, so
    every output is the fp32 run's rounded to bf16. A scale rounded to bf16 on one side only biased a whole layer's
    output or gradient by up to 1%, which rounding noise does not average out."""
    x, w_hat, bias, _, _, _, grad_out = _operands(tokens=(16, 32), in_features=64, out_features=48)
    s, a, c = torch.tensor(0.0301), torch.tensor(0.3 * 1.0117), torch.tensor(1.0039e-5)
    x, w_hat, bias, grad_out = (t.bfloat16().float() for t in (x, w_hat, bias, grad_out))  # on the bf16 grid
    precision = MatmulPrecision(E4M3, E5M2)

    def run(dtype):
        return _run(
            lambda x, w, b: scaled_linear(x, w, b, s, a, c, precision),
            *(t.to(dtype) for t in (x, w_hat, bias, grad_out)),
        )

    for name, got, want in zip(
        ("y", "grad_x", "grad_w_hat"), run(torch.bfloat16)[:3], run(torch.float32)[:3], strict=True
    ):
        ratio = float((got.double() * want).sum() / (want.double() * want).sum())
        assert abs(ratio - 1) < 2e-4, f"{name}: bf16 run is {ratio - 1:+.2e} off the fp32 run's scale"
        assert _rel(got.float(), want) < 2**-8, f"{name}: {_rel(got.float(), want):.2e} from the fp32 run"


@pytest.mark.parametrize("backend", ["simulate", "scaled_mm"])
def test_fp8_under_autocast_computes_and_returns_the_autocast_dtype(backend):
    """Under bf16 autocast the GEMMs still accumulate in fp32 and round once to bf16: the same result as bf16
    inputs without autocast (autocast inside the GEMM rounded the simulated product to bf16 first)."""
    if backend == "scaled_mm" and not scaled_mm_runs_on(torch.device("cpu")):
        pytest.skip("torch._scaled_mm has no CPU kernel in this torch")
    x, w_hat, bias, s, a, c, grad_out = _operands(tokens=(16, 32), in_features=64, out_features=48)
    precision = MatmulPrecision(E4M3, E5M2, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grad_x, grad_w, _ = _run(
            lambda x, w, b: scaled_linear(x, w, b, s, a, c, precision), x, w_hat, bias, grad_out
        )
    assert y.dtype == torch.bfloat16  # as F.linear there: not promoted back to fp32 by the input or the bias
    assert grad_x.dtype == torch.float32
    bf16_x = x.bfloat16()
    want = _run(lambda x, w, b: scaled_linear(x, w, b, s, a, c, precision), bf16_x, w_hat, bias, grad_out.bfloat16())
    assert torch.equal(y, want[0])
    torch.testing.assert_close(grad_x, want[1].float(), rtol=0, atol=0)
    torch.testing.assert_close(grad_w, want[2], rtol=0, atol=0)


def test_unscaled_gradients_flush_to_zero_in_e5m2():
    """Naive FP8 (c = 1) on gradients of RMS 1e-5: most of g is below E5M2's subnormals (2^-16 ≈ 1.5e-5)."""
    x, w_hat, bias, s, a, _, grad_out = _operands()
    counters = {"naive": OperandCounters.new(), "scaled": OperandCounters.new()}
    for name, c in (("naive", torch.tensor(1.0)), ("scaled", rms(grad_out).float())):
        precision = MatmulPrecision(E4M3, E5M2)
        _run(
            lambda x, w, b, c=c, p=precision, n=name: scaled_linear(x, w, b, s, a, c, p, counters[n]),
            x,
            w_hat,
            bias,
            grad_out,
        )
    naive = counters["naive"].grad_output.as_dict()["underflow_fraction"]
    scaled = counters["scaled"].grad_output.as_dict()["underflow_fraction"]
    assert naive > 0.3 and scaled < 1e-3, f"underflow naive {naive:.3f}, scaled {scaled:.5f}"


def test_counters_see_saturation_of_each_operand():
    x, w_hat, bias, s, a, c, grad_out = _operands()
    counters = OperandCounters.new()
    precision = MatmulPrecision(E4M3, E5M2)
    # a, c far too small: x/a beyond 448 and g/c beyond 57344 saturate instead of becoming inf
    y = scaled_linear(x.requires_grad_(True), w_hat, bias, s, a * 1e-4, c * 1e-6, precision, counters)
    y.backward(grad_out)
    assert torch.isfinite(x.grad).all()
    assert counters.input.as_dict()["saturated_fraction"] > 0.5
    assert counters.grad_output.as_dict()["saturated_fraction"] > 0.5
    assert counters.weight.as_dict()["saturated"] == 0


# relative (Frobenius). Both backends multiply the same FP8 values: in fp32 only summation order differs; a bf16
# model's outputs are rounded to bf16 once by _scaled_mm, and before and after the scale multiply by `simulate`
SCALED_MM_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


@pytest.fixture
def scaled_mm_checked_as_on_cuda(monkeypatch):
    """torch._scaled_mm with CUDA's shape checks, which CPU skips: K and N of (M × K) @ (K × N) multiples of 16."""
    scaled_mm_runs_on(torch.device("cpu"))  # probe (cached) before the patch, so only the layer's GEMMs are recorded
    real = torch._scaled_mm
    shapes = []

    def checked(mat1, mat2, *args, **kwargs):
        assert mat1.shape[1] % 16 == 0 and mat2.shape[0] % 16 == 0 and mat2.shape[1] % 16 == 0, (
            f"CUDA's _scaled_mm refuses {tuple(mat1.shape)} @ {tuple(mat2.shape)}"
        )
        shapes.append((tuple(mat1.shape), tuple(mat2.shape)))
        return real(mat1, mat2, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    return shapes


@pytest.mark.skipif(
    not scaled_mm_runs_on(torch.device("cpu")), reason=f"torch {torch.__version__} has no CPU torch._scaled_mm kernel"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backward", [E5M2, E4M3], ids=["hybrid", "e4m3"])
@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features"),
    [((3, 5), 24, 16), ((1, 1), 32, 2), ((4, 16), 48, 64)],
    ids=["unaligned", "one-token-two-outputs", "aligned"],
)
def test_scaled_mm_and_simulate_agree(dtype, backward, tokens, in_features, out_features, scaled_mm_checked_as_on_cuda):
    """Any token count, layer width and model dtype: `scaled_mm` pads K and N for CUDA and computes what `simulate` does."""
    x, w_hat, bias, s, _, _, grad_out = _operands(
        dtype, tokens=tokens, in_features=in_features, out_features=out_features
    )
    a, c = rms(x).float(), rms(grad_out).float()
    results = {}
    for backend in ("simulate", "scaled_mm"):
        precision = MatmulPrecision(E4M3, backward, backend)
        results[backend] = _run(
            lambda x, w, b, p=precision: scaled_linear(x, w, b, s, a, c, p), x, w_hat, bias, grad_out
        )
    for name, sim, mm in zip(
        ("y", "grad_x", "grad_w_hat", "grad_bias"), results["simulate"], results["scaled_mm"], strict=True
    ):
        assert mm.shape == sim.shape and mm.dtype == sim.dtype == dtype, name
        error = _rel(mm.float(), sim.float())
        assert error <= SCALED_MM_TOLERANCE[dtype], f"{name}: scaled_mm vs simulate relative error {error}"
    assert len(scaled_mm_checked_as_on_cuda) == 3  # forward, grad-input, grad-weight


def test_scaled_mm_without_a_kernel_names_the_device_and_simulate(monkeypatch):
    """Where torch has no _scaled_mm kernel (CPU in torch 2.6), the first GEMM says so and points to `simulate`."""

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_scaled_mm' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    scaled_mm_runs_on.cache_clear()
    try:
        assert not scaled_mm_runs_on(torch.device("cpu"))
        x, w_hat, bias, s, a, c, _ = _operands()
        with pytest.raises(NotImplementedError, match=r"backend='scaled_mm'.*for cpu.*backend='simulate'"):
            scaled_linear(x, w_hat, bias, s, a, c, MatmulPrecision(E4M3, E5M2, "scaled_mm"))
    finally:
        scaled_mm_runs_on.cache_clear()  # the real kernel's answer for the tests that follow


def test_scaled_mm_needs_fp8_formats():
    with pytest.raises(ValueError, match="scaled_mm"):
        MatmulPrecision(FORMATS["bf16"], E5M2, "scaled_mm")
    with pytest.raises(ValueError, match="backend"):
        MatmulPrecision(E4M3, E5M2, "cublas")


def test_rms_over_nonzero_elements():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert rms(x).item() == pytest.approx((25 / 4) ** 0.5)
    assert rms(x, nonzero_only=True).item() == pytest.approx((25 / 2) ** 0.5)
    assert rms(torch.zeros(3), nonzero_only=True).item() == 0.0


def test_scaled_embedding_multiplies_the_scale_back():
    w_hat = torch.randn(10, 4)
    ids = torch.tensor([[1, 2, 0]])
    s = torch.tensor(0.05)
    torch.testing.assert_close(scaled_embedding(ids, w_hat, s, padding_idx=0), F.embedding(ids, w_hat * s))
