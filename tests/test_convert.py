"""unit_scale / merge_unit_scale: the converted model computes the same function (hf_unitscale/convert.py)."""

import copy
import logging
import math
import re

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_unitscale import UnitScaleConfig, is_unit_scaled, merge_unit_scale, unit_scale, unit_scaled_modules
from hf_unitscale.calibrate import calibrate
from hf_unitscale.convert import weight_scales
from hf_unitscale.modules import UnitScaledEmbedding, UnitScaledMatmulMixin
from hf_unitscale.precision import set_precision

from tiny_models import CASES_BY_ID, GAIN_NAMES, TINY_CASES, tiny_gain_model

EQUIVALENCE_RTOL = 1e-5  # max |converted - original| ≤ 1e-5 · max |original|
RMS_ATOL = 1e-4


def assert_same_function(original: torch.Tensor, converted: torch.Tensor) -> None:
    error = (converted - original).abs().max().item()
    bound = EQUIVALENCE_RTOL * original.abs().max().item()
    assert error <= bound, f"max |Δlogits| = {error:.3g} > {bound:.3g}"


def assert_unit_rms(model: nn.Module) -> None:
    for name, module in unit_scaled_modules(model).items():
        for weight_name in module.unit_scaled_weights:
            weight = getattr(module, weight_name)
            if not weight.detach().any():
                continue
            rms = weight.detach().double().square().mean().sqrt().item()
            assert abs(rms - 1) <= RMS_ATOL, f"rms({name}.{weight_name}) = {rms}"


def trainable(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_tiny_models_keep_their_function(case):
    model = case.model()
    batch = case.batch()
    with torch.no_grad():
        expected = model(**batch).logits
    params_before = trainable(model)
    unit_scale(model)
    with torch.no_grad():
        actual = model(**batch).logits
    assert_same_function(expected, actual)
    assert_unit_rms(model)
    assert trainable(model) == params_before, "parameter names, shapes or count changed"
    assert is_unit_scaled(model)


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_power_of_two_scales_keep_the_function_bit_for_bit_in_fp32_and_bf16_autocast(case):
    """With s = 2^k, s·x, W/s and b/s are exact, and every GEMM rounds as the original's does, scaled by 2^k
    (under autocast, bf16(s) = s too)."""
    batch = case.batch()
    original = case.model().eval()
    converted = unit_scale(case.model().eval(), UnitScaleConfig(power_of_two_scales=True))
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(converted(**batch).logits, original(**batch).logits), f"autocast={autocast}"


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_every_weight_is_converted_and_ties_survive(case):
    model = case.model()
    unit_scale(model)
    converted = unit_scaled_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)]
    assert set(linears) <= set(converted), f"unconverted: {set(linears) - set(converted)}"
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(embedding, UnitScaledEmbedding)
    if case.tied:
        assert output.weight is embedding.weight, "tied weights must stay one Parameter"
        assert torch.equal(output.weight_scale, embedding.weight_scale)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and not any(isinstance(m, UnitScaledMatmulMixin | UnitScaledEmbedding) for m in norms)


def test_gpt2_conv1d_scales_and_gradients_match():
    """Ŵ's gradient is s·∂W: one backward through both models shows it."""
    case = CASES_BY_ID["gpt2"]
    original, converted = case.model(), unit_scale(case.model())
    batch = case.batch()
    original(**batch).logits.square().mean().backward()
    converted(**batch).logits.square().mean().backward()
    layer = "transformer.h.0.mlp.c_fc"
    plain, scaled = original.get_submodule(layer), converted.get_submodule(layer)
    torch.testing.assert_close(scaled.weight.grad, plain.weight.grad * scaled.weight_scale, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scaled.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_merge_restores_the_original_state_dict(case):
    model = case.model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_unit_scale(unit_scale(model))
    merged = model.state_dict()
    assert set(merged) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=0, msg=f"{name} changed")
    assert not is_unit_scaled(model)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert "unit_scaling" not in model.config.to_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_16bit_weights_convert_and_merge_bit_exactly(case, dtype):
    """In a 16-bit float, W/rms(W) rounds a fraction of the weights by one ulp (one bf16 ulp is 0.4–0.8%), and
    s·Ŵ rounds again; by default such weights get a power-of-two s, so Ŵ = W/s and the merged s·Ŵ are exact."""
    model = case.model().to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    unit_scale(model)
    for name, module in unit_scaled_modules(model).items():
        for weight_name in module.unit_scaled_weights:
            scale, weight = module.scale_of(weight_name), getattr(module, weight_name).detach()
            assert scale.dtype == torch.float32 and torch.equal(scale, torch.exp2(torch.log2(scale).round())), name
            assert torch.equal(weight * scale.to(dtype), original[f"{name}.{weight_name}"]), name
            if weight.any():
                rms = weight.double().square().mean().sqrt().item()
                assert 2**-0.5 <= rms <= 2**0.5, f"rms({name}.{weight_name}) = {rms}"
    merge_unit_scale(model)
    for name, tensor in original.items():
        assert torch.equal(model.state_dict()[name], tensor), f"{name} changed"

    # s = rms(W): Ŵ = W/s and s·Ŵ are each computed in fp32 and rounded once, so a weight moves by at most one ulp
    # and no tensor by a common factor (dividing by a 16-bit s would scale a whole tensor by bf16(s)/s)
    rms_scaled = case.model().to(dtype)
    merge_unit_scale(unit_scale(rms_scaled, UnitScaleConfig(power_of_two_scales=False)))
    changed = 0
    for name, tensor in original.items():
        merged = rms_scaled.state_dict()[name]
        changed += int((merged != tensor).sum())
        one_ulp = torch.finfo(dtype).eps * tensor.float().abs()
        assert ((merged.float() - tensor.float()).abs() <= one_ulp).all(), name
        if tensor.float().norm() > 0:
            assert abs(merged.float().norm() / tensor.float().norm() - 1) < 1e-3, name
    assert changed > 0.01 * sum(v.numel() for v in original.values() if v.is_floating_point())


def test_fp64_weights_convert_and_keep_the_function():
    case = CASES_BY_ID["llama-untied"]
    plain = case.model().double()
    converted = unit_scale(case.model().double())
    with torch.no_grad():
        expected, actual = plain(**case.batch()).logits, converted(**case.batch()).logits
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_a_model_converted_in_fp32_and_cast_to_16_bits_multiplies_s_in_fp32():
    """After `.to(bfloat16)` s stays fp32 and the forward multiplies by it in fp32, rounding once: s rounded to bf16
    would scale each layer's output by bf16(s)/s (here 1 − 1.0e-3), the same factor for every output. Measured
    gain − 1 of the linear layer: +4.7e-5 (the plain layer cast to bf16: −4.4e-6; s rounded to bf16: −9.1e-4)."""
    torch.manual_seed(0)
    layers = {"linear": nn.Linear(512, 512, bias=False), "embedding": nn.Embedding(1000, 256)}
    inputs = {"linear": torch.randn(4096, 512), "embedding": torch.randint(0, 1000, (4096,))}
    for name, layer in layers.items():
        with torch.no_grad():
            layer.weight.mul_(0.000947 / layer.weight.square().mean().sqrt())  # s = 0.000947
        reference = layer(inputs[name]).double()
        converted = unit_scale(copy.deepcopy(layer)).to(torch.bfloat16)
        x = inputs[name].bfloat16() if name == "linear" else inputs[name]
        output = converted(x).double()
        gain = float((output * reference).sum() / reference.square().sum())  # least-squares output/reference
        assert abs(gain - 1) < 2e-4, (name, gain)


def test_fp32_weights_keep_s_equal_to_their_rms_unless_asked():
    model, rounded = CASES_BY_ID["llama-untied"].model(), CASES_BY_ID["llama-untied"].model()
    unit_scale(model)
    unit_scale(rounded, UnitScaleConfig(power_of_two_scales=True))
    assert_unit_rms(model)
    scales = [float(m.weight_scale) for m in unit_scaled_modules(rounded).values()]
    assert all(s == 2.0 ** round(math.log2(s)) for s in scales), scales
    assert not all(s == 2.0 ** round(math.log2(s)) for s in map(float, weight_scales(model).values()))
    assert rounded.config.unit_scaling["power_of_two_scales"] is True


def test_converting_twice_is_a_noop_with_a_warning(caplog):
    model = unit_scale(CASES_BY_ID["bert"].model())
    scales = {n: m.weight_scale.clone() for n, m in unit_scaled_modules(model).items()}
    logger = logging.getLogger("hf_unitscale")
    logger.propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        unit_scale(model)
    assert "already unit-scaled" in caplog.text
    assert all(torch.equal(m.weight_scale, scales[n]) for n, m in unit_scaled_modules(model).items())


def test_converting_again_with_other_options_is_an_error(caplog):
    """A converted model cannot take other options: saying only "does nothing" would drop them unnoticed."""
    model = unit_scale(CASES_BY_ID["bert"].model())
    with pytest.raises(
        ValueError,
        match=r"already unit-scaled with other options than `config` \(`exclude_modules`: \[\] in the model, "
        r"\['classifier'\] in `config`\).*`merge_unit_scale\(model\)`",
    ):
        unit_scale(model, UnitScaleConfig(exclude_modules=["classifier"]))
    assert unit_scale(model, {"exclude_modules": []}) is model  # the options it has: nothing to do
    # power_of_two_scales=None chose rms scales for these fp32 weights: False is the same conversion, True is not
    assert unit_scale(model, {"power_of_two_scales": False}) is model
    with pytest.raises(ValueError, match=r"`power_of_two_scales`: None in the model, True in `config`"):
        unit_scale(model, {"power_of_two_scales": True})
    set_precision(model, "e4m3", "e5m2")  # the GEMM precision is set on a converted model, not by converting
    assert unit_scale(model, UnitScaleConfig()) is model
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        unit_scale(model, UnitScaleConfig(forward_format="e4m3"))
    assert "does nothing (its forward_format too: `set_precision` sets a converted model's)" in caplog.text
    assert UnitScaleConfig(forward_format="E4M3").forward_format == "e4m3"  # stored as `set_precision` stores it
    bare = unit_scale(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"records no conversion options .*drop `config`"):
        unit_scale(bare, UnitScaleConfig())


def test_non_finite_weight_is_named_and_leaves_the_model_as_it_was():
    """Every s is measured before any W is divided: the error leaves no layer converted, and once the weight is
    fixed, converting again converts the whole model."""
    model = CASES_BY_ID["bert"].model()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight.*non-finite"):
        unit_scale(model)
    assert not is_unit_scaled(model) and not hasattr(model.config, "unit_scaling")
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = 0.0
    unit_scale(model)
    assert not [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, (UnitScaledMatmulMixin, UnitScaledEmbedding))
    ]


@pytest.mark.parametrize("taken", ["weight_scale", "input_scale"])
def test_a_module_that_has_a_scale_buffers_name_is_refused_before_any_layer_changes(taken):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].register_buffer(taken, torch.full((), 3.0))  # a quantization library's, say
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"`1` \(Linear\): it already has `{taken}`.*exclude_modules=\[r'1'\]"):
        unit_scale(model)
    assert not is_unit_scaled(model)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def _fp8_compressed_tensors_model(tmp_path) -> nn.Module:
    """A compressed-tensors FP8 checkpoint loaded by plain transformers: its Linear weights stay float8_e4m3fn."""
    pytest.importorskip("compressed_tensors")
    unit_scale(CASES_BY_ID["llama-untied"].model()).save_pretrained(tmp_path, checkpoint_format="compressed-tensors")
    return AutoModelForCausalLM.from_pretrained(tmp_path)


def _torchao_int8_model(tmp_path) -> nn.Module:
    """torchao's int8 weight-only quantization: its Linear weights are a tensor subclass."""
    quantization = pytest.importorskip("torchao.quantization")
    model = CASES_BY_ID["llama-untied"].model()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model


@pytest.mark.parametrize(
    ("quantized", "kind"),
    [
        (_fp8_compressed_tensors_model, r"torch\.float8_e4m3fn"),
        (_torchao_int8_model, "Int8Tensor|AffineQuantizedTensor"),  # torchao 0.18's name, 0.16's
    ],
    ids=["compressed-tensors", "torchao"],
)
def test_quantized_weights_are_refused_before_any_layer_changes(quantized, kind, tmp_path):
    model = quantized(tmp_path)
    embedding = model.model.embed_tokens.weight.clone()
    with pytest.raises(
        ValueError, match=rf"`model\.layers\.0\.self_attn\.q_proj\.weight` is quantized \({kind}\).*dequantize"
    ):
        unit_scale(model)
    assert not is_unit_scaled(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_weights_on_the_meta_device_are_named():
    """s = rms(W) needs W: on the meta device (`init_empty_weights`) every s would be 1, unit-scaled in name only."""
    plain = CASES_BY_ID["bert"].model()
    with init_empty_weights():
        model = type(plain)(plain.config)
    with pytest.raises(
        ValueError,
        match=r"on the meta device \(e\.g\. `bert\.embeddings\.word_embeddings\.weight`.*"
        r"hf_unitscale\.from_pretrained",
    ):
        unit_scale(model)
    assert not is_unit_scaled(model)


def test_all_zero_weight_keeps_unit_scale():
    model = CASES_BY_ID["llama-untied"].model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    unit_scale(model)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_scale.item() == 1.0
    assert not layer.weight.any()


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ValueError, match="Found nothing to unit-scale in LayerNorm"):
        unit_scale(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="excluded"):
        unit_scale(nn.Sequential(nn.Linear(4, 4)), UnitScaleConfig(exclude_modules=[".*"], convert_other_modules=False))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"forward_fromat": "e4m3"}, r"Unknown UnitScaleConfig option\(s\) \['forward_fromat'\]"),
        ({"forward_format": "e3m4"}, r"Unknown low-precision format 'e3m4'"),
        ({"backend": "cuda"}, r"`backend` must be one of"),
        ({"exclude_modules": ["("]}, r"`exclude_modules` entry '\(' is not a regular expression"),
    ],
)
def test_bad_config_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        UnitScaleConfig.from_dict(options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"convert_other_modules": "no"}, r"`convert_other_modules` must be bool, got str 'no'"),
        ({"power_of_two_scales": "false"}, r"`power_of_two_scales` must be bool or None, got str 'false'"),
        ({"forward_format": 8}, r"`forward_format` must be str or None, got int 8"),
        ({"exclude_modules": ["classifier", 3]}, r"`exclude_modules` must be a list of regular expressions"),
        ({"full_precision_modules": {"classifier": True}}, r"`full_precision_modules` must be a list .*got dict"),
    ],
)
def test_options_of_the_wrong_type_are_named(options, message):
    """A string is truthy: "no" would convert other modules and "false" round every s to a power of two."""
    with pytest.raises(TypeError, match=message):
        UnitScaleConfig(**options)


def test_options_the_library_records_take_only_what_it_writes():
    """`lr_rule` and `calibration` are set by UnitScaleTrainer and `calibrate`; lr_rule="adam" was accepted and shown
    in the model card as the rule the model trained with."""
    with pytest.raises(ValueError, match=r"`lr_rule` records the rule .*\('equivalent', 'umup', 'mup'\).*got 'adam'"):
        UnitScaleConfig(lr_rule="adam")
    with pytest.raises(TypeError, match=r"`calibration` \(recorded by `calibrate`\) must have str keys"):
        UnitScaleConfig(calibration={1: "x"})
    with pytest.raises(TypeError, match=r"`calibration.headroom` .* must be int or float or None, got str 'big'"):
        UnitScaleConfig(calibration={"num_batches": 2, "headroom": "big"})
    with pytest.raises(TypeError, match=r"`calibration.num_batches` .* must be int, got bool True"):
        UnitScaleConfig(calibration={"num_batches": True})
    # what the library writes: every rule, `calibrate`'s record, with another version's or the user's entries
    case = CASES_BY_ID["bert"]
    model = unit_scale(case.model())
    calibrate(model, [{**case.batch(), "labels": torch.tensor([0, 1])}], headroom=2, progress=False)
    record = model.config.unit_scaling["calibration"]
    for rule in ("equivalent", "umup", "mup"):
        assert UnitScaleConfig(lr_rule=rule, calibration={**record, "dataset": "austen"}).calibration["headroom"]


def test_unit_scale_takes_a_config_dict_and_refuses_what_is_not_a_model():
    as_dict = unit_scale(CASES_BY_ID["bert"].model(), {"exclude_modules": ["classifier"]})  # config.json's block
    assert type(as_dict.classifier) is nn.Linear and as_dict.config.unit_scaling["exclude_modules"] == ["classifier"]
    with pytest.raises(ValueError, match="Unknown UnitScaleConfig option"):
        unit_scale(CASES_BY_ID["bert"].model(), {"exclude_module": ["classifier"]})
    for not_a_model in ("bert-base-uncased", None):
        with pytest.raises(TypeError, match="converts a loaded model.*load it first"):
            unit_scale(not_a_model)
    with pytest.raises(TypeError, match=r"`config` must be a UnitScaleConfig or its dict .*got str 'bert-config'"):
        unit_scale(CASES_BY_ID["bert"].model(), "bert-config")
    no_exclusion = unit_scale(CASES_BY_ID["bert"].model(), UnitScaleConfig(exclude_modules=None))
    assert no_exclusion.config.unit_scaling["exclude_modules"] == [] and is_unit_scaled(no_exclusion.classifier)


def test_exclude_modules_leaves_them_plain():
    model = unit_scale(CASES_BY_ID["bert"].model(), UnitScaleConfig(exclude_modules=[r"classifier", r".*\.query"]))
    assert type(model.classifier) is nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.key, UnitScaledMatmulMixin)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("nan_weight", r"`classifier\.weight`: Ŵ has nan/inf values; reload"),
        ("inf_scale", r"`classifier\.weight`: its scale s is inf; reload"),
        ("fp16_overflow", r"`classifier\.weight`: s·Ŵ overflows torch\.float16 .*`model\.float\(\)`"),
    ],
)
def test_merge_that_would_not_be_finite_changes_nothing(spoil, message):
    """merge_unit_scale checks every s·Ŵ before it writes any: an error leaves the model unit-scaled as it was (it
    used to merge the layers before the bad one and stop there)."""
    model = unit_scale(CASES_BY_ID["bert"].model())
    layers = list(unit_scaled_modules(model))
    assert layers[-1] == "classifier"
    with torch.no_grad():
        if spoil == "nan_weight":
            model.classifier.weight[0, 0] = float("nan")
        elif spoil == "inf_scale":
            model.classifier.weight_scale.fill_(float("inf"))
        else:  # 2^10 · 2^6 = 2^16 > 65504, the largest float16
            model.half()
            model.classifier.weight_scale.fill_(2.0**10)
            model.classifier.weight[0, 0] = 2.0**6
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message + r".*Nothing was merged"):
        merge_unit_scale(model)
    assert list(unit_scaled_modules(model)) == layers
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].nan_to_num(), before[k].nan_to_num()) for k in before)


def test_excluding_a_module_excludes_what_is_inside_it():
    model = unit_scale(CASES_BY_ID["bert"].model(), UnitScaleConfig(exclude_modules="bert.pooler"))  # one regex
    assert type(model.bert.pooler.dense) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.key, UnitScaledMatmulMixin)


@pytest.mark.parametrize(
    ("entry", "hint"),
    [
        # peft's suffix semantics: the regex that matches the names ending so, and what it matches
        ("pooler.dense", r"ends in it ('bert.pooler.dense'), write r'.*pooler\.dense'"),
        ("bert.poolr", "The closest module names: 'bert.pooler', 'bert.pooler.dense'"),  # a typo
        ("nothing_like_it", "Module names look like 'bert', 'classifier'"),
    ],
)
def test_an_exclude_pattern_matching_no_module_is_an_error_that_says_how_to_fix_it(entry, hint):
    model = CASES_BY_ID["bert"].model()
    with pytest.raises(ValueError) as error:
        unit_scale(model, UnitScaleConfig(exclude_modules=[entry]))
    message = str(error.value)
    assert message.startswith(f"`exclude_modules` entry {entry!r} matches no module of BertForSequenceClassification")
    assert "must match a whole module name (re.fullmatch), not a name's end as in peft" in message
    assert hint in message, message
    assert not is_unit_scaled(model)
    if "write r'" in hint:  # the suggested regex does what the message says
        suggested = message.split("write r'")[1].split("'")[0]
        converted = unit_scale(CASES_BY_ID["bert"].model(), UnitScaleConfig(exclude_modules=[suggested]))
        assert type(converted.bert.pooler.dense) is nn.Linear
        assert isinstance(converted.bert.encoder.layer[0].output.dense, UnitScaledMatmulMixin)


@pytest.mark.parametrize(
    ("case_id", "excluded", "kept", "tied_to"),
    [
        ("gpt2", "lm_head", "lm_head.weight", "transformer.wte.weight"),
        ("llama-tied", r"model\.embed_tokens", "model.embed_tokens.weight", "lm_head.weight"),
    ],
)
def test_excluding_one_side_of_a_tied_weight_is_an_error(case_id, excluded, kept, tied_to):
    # one Parameter: converting one side would divide it by s and leave the other computing with Ŵ
    model = CASES_BY_ID[case_id].model()
    batch = CASES_BY_ID[case_id].batch()
    with torch.no_grad():
        expected = model(**batch).logits
    with pytest.raises(
        ValueError, match=rf"`{re.escape(kept)}` stays unconverted but is tied to `{re.escape(tied_to)}`"
    ):
        unit_scale(model, UnitScaleConfig(exclude_modules=[excluded]))
    assert not is_unit_scaled(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


class AttentionStack(nn.Module):
    """torch's own attention modules, whose forward reads submodule weights directly (MHA's `out_proj.weight`,
    the encoder layer's inference fast path)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.encoder_layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    def forward(self, x):
        return self.encoder_layer(self.attention(x, x, x)[0])


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad-fast-path"])
def test_torch_attention_modules_keep_their_function(grad):
    torch.manual_seed(0)
    model = AttentionStack().eval()
    x = torch.randn(2, 5, 16)
    with torch.set_grad_enabled(grad):
        expected = model(x)
        unit_scale(model)
        actual = model(x)
    assert_same_function(expected, actual)
    assert list(unit_scaled_modules(model)) == ["attention"]  # its in_proj_weight; out_proj and the layer stay
    assert model.attention.unit_scaled_weights == ("in_proj_weight",)


class ReadsWeights(nn.Module):
    """Reads one child's weight for its value (through a local name), and the other's only to inspect it or on
    a path its own attribute switches off."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 4)
        self.exact_path = False

    def forward(self, x):
        if isinstance(self.out.weight, torch.Tensor) and self.out.weight is not None:
            x = x.to(self.out.weight.dtype)
        if self.exact_path and x.shape[-1] > 0:
            return x @ self.out.weight.T
        proj = self.proj
        return self.out(x @ proj.weight.T)


class ReadsWeightByName(nn.Module):
    """Reads a child's weight for its value with `getattr` and a literal name."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(x @ getattr(self.proj, "weight").T)  # noqa: B009


def _direct_read_models() -> dict[str, tuple[nn.Module, dict]]:
    """Models whose code reads a submodule's weight directly, with inputs that take that path."""
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        CLIPVisionConfig,
        CLIPVisionModel,
        DebertaConfig,
        DebertaForSequenceClassification,
        MambaConfig,
        MambaForCausalLM,
        MobileBertConfig,
        MobileBertForMaskedLM,
        T5Config,
        T5EncoderModel,
    )

    ids = {"input_ids": torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))}
    small = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    return {
        "user-module": (ReadsWeights(), {"x": torch.randn(3, 8)}),
        "user-getattr": (ReadsWeightByName(), {"x": torch.randn(3, 8)}),
        "deberta": (  # DebertaEncoder.get_rel_embedding: self.rel_embeddings.weight; attention: self.in_proj.weight
            DebertaForSequenceClassification(
                DebertaConfig(**small, hidden_size=32, relative_attention=True, pos_att_type=["p2c", "c2p"])
            ),
            ids,
        ),
        "mobilebert": (  # LM head: self.decoder.weight (tied to the word embeddings) and self.dense.weight
            MobileBertForMaskedLM(
                MobileBertConfig(
                    **small, hidden_size=64, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16
                )
            ),
            ids,
        ),
        "mamba": (  # the mixer's slow path: self.dt_proj.weight, self.x_proj.weight, …
            MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=1)),
            ids,
        ),
        "bloom-off-path": (  # reads self.dense.weight only `if self.pretraining_tp > 1 and self.slow_but_exact`
            BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)),
            ids,
        ),
        "t5-inspects-only": (  # T5DenseActDense reads self.wo.weight only for isinstance and .dtype
            T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)),
            ids,
        ),
        "clip-interpolate": (  # interpolate_pos_encoding: self.position_embedding.weight
            CLIPVisionModel(
                CLIPVisionConfig(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                )
            ),
            {"pixel_values": torch.randn(1, 3, 24, 24), "interpolate_pos_encoding": True},
        ),
    }


LEFT_UNCONVERTED = {
    "user-module": {"proj"},
    "user-getattr": {"proj"},
    "deberta": {"deberta.encoder.rel_embeddings", "deberta.encoder.layer.0.attention.self.in_proj"},
    "mobilebert": {"cls.predictions.decoder", "cls.predictions.dense", "mobilebert.embeddings.word_embeddings"},
    "mamba": {"backbone.layers.0.mixer." + n for n in ("conv1d", "x_proj", "dt_proj", "out_proj")},
    "clip-interpolate": {"embeddings.position_embedding"},
    "t5-inspects-only": set(),
    "bloom-off-path": set(),
}


@pytest.mark.parametrize("case", list(LEFT_UNCONVERTED))
def test_a_layer_whose_weight_other_code_reads_stays_unconverted_and_is_named(case, caplog):
    """Code that reads `self.child.weight` would get Ŵ = W/s: those layers (and layers tied to them) stay W, with
    a warning naming them and the reading code; every other layer is converted and the function is kept."""
    torch.manual_seed(0)
    model, inputs = _direct_read_models()[case]
    model.eval()
    with torch.no_grad():
        expected = model(**inputs)
        with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
            unit_scale(model)
        actual = model(**inputs)
    if not isinstance(expected, torch.Tensor):
        expected, actual = expected[0], actual[0]
    assert_same_function(expected, actual)
    converted = set(unit_scaled_modules(model))
    weighted = {n for n, m in model.named_modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))}
    assert weighted - converted == LEFT_UNCONVERTED[case]
    for name in LEFT_UNCONVERTED[case]:
        assert f"`{name}` (" in caplog.text


def test_the_model_itself_keeps_its_class_when_it_owns_a_weight(tmp_path, caplog):
    """BLIP-2's model owns `query_tokens` (1, n, h): the generic path would replace the model's class (Trainer then
    read a `forward(*args, **kwargs)` and dropped every column; checkpoints named `UnitScaledBlip2…`)."""
    import inspect

    import transformers

    import hf_unitscale

    vocab = 99
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                         eos_token_id=2),
        num_query_tokens=4, image_token_index=vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    ids = torch.randint(4, vocab - 2, (2, 10))
    ids[:, :4] = vocab - 1  # the image tokens the query outputs replace
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    signature = inspect.signature(model.forward)
    with torch.no_grad():
        expected = model(**inputs).logits
        with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
            unit_scale(model)
        assert_same_function(expected, model(**inputs).logits)
    assert type(model) is transformers.Blip2ForConditionalGeneration
    assert inspect.signature(model.forward) == signature
    assert "`query_tokens` stay unconverted" in caplog.text
    assert "vision_model.encoder.layers.0.mlp.fc1" in unit_scaled_modules(model)
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    reloaded = hf_unitscale.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_same_function(expected, reloaded(**inputs).logits)


@pytest.mark.parametrize("mean_resizing", [True, False], ids=["mean-resizing", "init-weights"])
@pytest.mark.parametrize("case_id", ["gpt2", "llama-untied"])
def test_resized_vocabulary_keeps_the_function_and_draws_new_rows_for_w(case_id, mean_resizing):
    """transformers copies an untied head into a new plain Linear (it would compute with Ŵ) and draws new rows
    for W with `_init_weights`: the old tokens' logits stay the plain model's, new rows have W's magnitude."""
    case = CASES_BY_ID[case_id]
    plain, converted = case.model(), unit_scale(case.model())
    for model in (plain, converted):
        torch.manual_seed(0)
        model.resize_token_embeddings(model.config.vocab_size + 7, mean_resizing=mean_resizing)
    assert isinstance(converted.get_output_embeddings(), UnitScaledMatmulMixin)
    batch = case.batch()
    with torch.no_grad():
        expected, actual = plain(**batch).logits, converted(**batch).logits
    assert_same_function(expected[..., :-7], actual[..., :-7])
    for get in ("get_input_embeddings", "get_output_embeddings"):
        new_plain = getattr(plain, get)().weight[-7:]
        module = getattr(converted, get)()
        new_w = module.weight[-7:] * module.scale_of("weight")
        ratio = (new_w.square().mean() / new_plain.square().mean()).sqrt().item()
        assert 0.5 < ratio < 2, f"{get}: new rows have {ratio:.3g}× the plain model's RMS"


def test_merge_after_a_16_bit_cast_equals_the_merged_export():
    """Both multiply s·Ŵ in fp32 and round once: merging a bf16-cast model in place and saving it writes what
    `save_pretrained` (merged) writes."""
    from hf_unitscale.checkpoint import merged_state_dict

    model = unit_scale(CASES_BY_ID["llama-untied"].model()).to(torch.bfloat16)  # s = rms(W), not a power of two
    exported = merged_state_dict(model)
    merged = merge_unit_scale(model).state_dict()
    assert all(torch.equal(merged[name], tensor) for name, tensor in exported.items())


class LSTMClassifier(nn.Module):
    """A plain torch text classifier: embedding → LSTM(100, 256) → Linear(256, 1)."""

    def __init__(self, vocab: int = 500):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 100)
        self.lstm = nn.LSTM(100, 256, batch_first=True)
        self.head = nn.Linear(256, 1)

    def forward(self, ids):
        hidden, _ = self.lstm(self.embedding(ids))
        return self.head(hidden[:, -1])


def test_plain_torch_lstm_classifier_converts_and_stays_equivalent():
    model = LSTMClassifier()
    ids = torch.randint(0, 500, (4, 20))
    expected = model(ids)
    names = trainable(model)
    unit_scale(model)
    assert_same_function(expected, model(ids))
    assert trainable(model) == names
    assert model.lstm.unit_scaled_weights == ("weight_ih_l0", "weight_hh_l0")
    assert_unit_rms(model)
    model(ids).sum().backward()  # trains: gradients reach Ŵ of every part
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    merge_unit_scale(model)
    assert type(model.lstm) is nn.LSTM
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_id", list(GAIN_NAMES))
def test_gains_stored_broadcast_shaped_stay_unconverted_as_1d_ones(model_id):
    """The generic path converts a module's ≥2-D weights but leaves its gains as W, as it leaves 1-D ones:
    SwiftFormer's layer scales (c, 1, 1), ConvNeXt V2's GRN γ (1, 1, 1, c), wav2vec2's weight_norm g (1, 1, k).
    Other weights of the same shape of vector or of the same module (SwiftFormer's `w_g` (c, 1), a matmul; weight_norm's
    v) and the convs around GRN are converted, and the model keeps its function in fp32."""
    model, inputs = tiny_gain_model(model_id)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    unit_scale(model)
    converted = {f"{n}.{w}" for n, m in unit_scaled_modules(model).items() for w in m.unit_scaled_weights}
    parameters = dict(model.named_parameters())
    for name in GAIN_NAMES[model_id]:
        assert name not in converted, name
        assert not hasattr(model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1] + "_scale"), name
        assert torch.equal(parameters[name], before[name]), name
    others = {
        "swiftformer": "encoder.network.0.blocks.0.attn.w_g",
        "convnextv2": "encoder.stages.1.layers.0.dwconv.weight",
    }
    others["wav2vec2"] = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    assert others[model_id] in converted
    assert_unit_rms(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-6, atol=1e-6)
    merge_unit_scale(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("power_of_two", [False, True], ids=["rms", "power-of-two"])
def test_real_minilm_keeps_its_function(minilm_path, power_of_two):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path, dtype=torch.float32).eval()
    batch = tokenizer(
        ["A gripping, beautifully acted film.", "Dull and far too long."], padding=True, return_tensors="pt"
    )

    def outputs():
        out = model(**batch)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    with torch.no_grad():
        expected = outputs()
        count = sum(p.numel() for p in model.parameters())
        unit_scale(model, UnitScaleConfig(power_of_two_scales=power_of_two))
        actual = outputs()
    if power_of_two:  # every product with s = 2^k is exact, and the bias stays inside each GEMM
        assert torch.equal(actual, expected)
    else:
        assert_same_function(expected, actual)
        assert_unit_rms(model)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(unit_scaled_modules(model)) == 6 * 6 + 3 + 1  # 6 linears per layer, 3 embeddings, pooler


@pytest.mark.slow
def test_real_minilm_in_bf16_converts_and_merges_bit_exactly(minilm_path):
    model = AutoModel.from_pretrained(minilm_path, dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_unit_scale(unit_scale(model))
    for name, tensor in original.items():
        assert torch.equal(model.state_dict()[name], tensor), f"{name} changed"


@pytest.mark.slow
@pytest.mark.parametrize("power_of_two", [False, True], ids=["rms", "power-of-two"])
def test_real_smollm2_keeps_its_function(smollm2_path, power_of_two):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    batch = tokenizer(["It is a truth universally acknowledged, that a single man"], return_tensors="pt")
    batch["labels"] = batch["input_ids"]

    def logits_and_plain_grads():
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        scales = weight_scales(model)  # g_W = g_Ŵ / s
        return out.logits.detach(), {n: p.grad / scales.get(id(p), 1.0) for n, p in model.named_parameters()}

    expected, expected_grads = logits_and_plain_grads()
    unit_scale(model, UnitScaleConfig(power_of_two_scales=power_of_two))
    actual, grads = logits_and_plain_grads()
    if power_of_two:
        assert torch.equal(actual, expected)
        for name, grad in grads.items():
            assert torch.equal(grad, expected_grads[name]), name
    else:
        assert_same_function(expected, actual)
        assert_unit_rms(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert actual[0, -1].argmax() == expected[0, -1].argmax()


def test_scales_stay_fp32_when_the_model_is_cast():
    model = unit_scale(CASES_BY_ID["llama-untied"].model())
    layer = model.model.layers[0].self_attn.q_proj
    scale = layer.weight_scale.clone()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.input_scale.dtype == torch.float32
    batch = CASES_BY_ID["llama-untied"].batch()
    assert torch.isfinite(model(**batch).logits).all()
