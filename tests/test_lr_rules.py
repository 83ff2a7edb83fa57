"""Parameter roles and the lr tables of `hf_unitscale.lr_rules`, over the tiny-model table."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from hf_unitscale import UnitScaleConfig, merge_unit_scale, unit_scale, unit_scaled_modules
from hf_unitscale.lr_rules import (
    ROLES,
    build_param_groups,
    check_param_groups,
    describe_parameters,
    parameter_roles,
    summarize_param_groups,
)

from tiny_models import CASES_BY_ID, GAIN_NAMES, HEADS_CASES, TINY_CASES, VOCAB, tiny_gain_model

LR, EPS, WD = 1e-3, 1e-8, 0.01


def _groups(model, rule="equivalent", **kwargs):
    return build_param_groups(model, lr_rule=rule, lr=LR, eps=EPS, weight_decay=WD, **kwargs)


def _wider(case_id: str, factor: int) -> nn.Module:
    """The table's model with hidden and intermediate sizes times `factor` (same depth, same heads)."""
    config = copy.deepcopy(CASES_BY_ID[case_id].model().config)
    config.hidden_size *= factor
    if hasattr(config, "intermediate_size") and config.intermediate_size:
        config.intermediate_size *= factor
    torch.manual_seed(0)
    return unit_scale(type(CASES_BY_ID[case_id].model())(config).eval())


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_every_parameter_has_one_role(case):
    model = unit_scale(case.model())
    roles = parameter_roles(model)
    assert list(roles) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(roles.values()) <= set(ROLES)
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for name in embeddings:
        if f"{name}.weight" in roles:
            assert roles[f"{name}.weight"] == "embedding", name
    for name, role in roles.items():
        if role == "bias":
            assert name.endswith("bias")
        if role == "norm":
            assert "norm" in name.lower() or ".ln_" in name
    readouts = [n for n, r in roles.items() if r == "readout"]
    expected = {
        "bert": ["classifier.weight"],
        "distilbert": ["classifier.weight"],
        "llama-untied": ["lm_head.weight"],
    }.get(case.id, [])
    assert readouts == expected  # a tied head is one Parameter, named and classed as the embedding


@pytest.mark.parametrize("case", HEADS_CASES, ids=lambda c: c.id)
def test_every_output_head_is_a_readout_and_a_head_layer_feeding_another_is_hidden(case):
    roles = parameter_roles(unit_scale(case.model()))
    assert {n for n, r in roles.items() if r == "readout"} == {f"{h}.weight" for h in case.output_heads - case.tied}
    assert {f"{n}.weight" for n in case.inner} <= {n for n, r in roles.items() if r == "hidden_weight"}


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("rule", ["equivalent", "umup", "mup"])
def test_groups_cover_every_parameter_once(case, rule):
    model = unit_scale(case.model())
    groups = _groups(model, rule, mup_base_width=16, umup_depth_scaling=True)
    check_param_groups(model, groups)
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names)
    assert names == [g["name"] for g in _groups(model, rule, mup_base_width=16, umup_depth_scaling=True)]
    assert "lr" in summarize_param_groups(groups)


def test_coverage_check_names_the_parameter():
    model = unit_scale(CASES_BY_ID["bert"].model())
    groups = _groups(model)
    with pytest.raises(ValueError, match=r"classifier\.bias.*in no optimizer group|in no optimizer group"):
        check_param_groups(model, [g for g in groups if g["role"] != "bias"])
    doubled = groups + [{"name": "extra", "params": [model.classifier.weight]}]
    with pytest.raises(ValueError, match=r"`classifier\.weight` is in two groups"):
        check_param_groups(model, doubled)


def test_unassigned_parameter_is_an_error_until_overridden():
    model = unit_scale(CASES_BY_ID["bert"].model())
    model.bert.encoder.layer[0].layer_scale = nn.Parameter(torch.ones(32))
    with pytest.raises(
        ValueError, match=r"`bert\.encoder\.layer\.0\.layer_scale`.*no learning-rate role.*a key of recipes"
    ):
        parameter_roles(model)
    roles = parameter_roles(model, role_overrides={r"bert\.encoder\.layer\.\d+\.layer_scale": "norm"})
    assert roles["bert.encoder.layer.0.layer_scale"] == "norm"
    with pytest.raises(ValueError, match="role_overrides"):
        parameter_roles(model, role_overrides={"x": "gain"})
    # the rules that scale by role refuse to guess; under `equivalent` the role changes nothing: lr η, eps ε
    for rule in ("umup", "mup"):
        with pytest.raises(ValueError, match="no learning-rate role"):
            _groups(model, rule, mup_base_width=16 if rule == "mup" else None)
    group = next(g for g in _groups(model) if any(p is model.bert.encoder.layer[0].layer_scale for p in g["params"]))
    assert group["role"] == "bias" and group["lr"] == LR and group["eps"] == EPS
    # a 0-D parameter (CLIP's `logit_scale`) has no last dimension to read a fan-out from
    model.bert.encoder.layer[0].layer_scale = nn.Parameter(torch.tensor(1.0))
    group = next(g for g in _groups(model) if any(p is model.bert.encoder.layer[0].layer_scale for p in g["params"]))
    assert group["lr"] == LR and group["eps"] == EPS


class _Vectors(nn.Module):
    """1-D parameters used the ways `gains.py` tells apart: only the `GAINS` multiply an activation."""

    GAINS = ("gain", "in_place", "called", "method")
    OTHERS = ("query", "scaled_query", "temperature", "left", "right", "blended", "running", "decayed")

    def __init__(self, width: int = 8):
        super().__init__()
        for name in self.GAINS + self.OTHERS:
            self.register_parameter(name, nn.Parameter(torch.ones(width)))

    def forward(self, x):
        x = x * self.gain[None, :].to(x.dtype)  # γ ⊙ x: a layer scale
        x *= self.in_place  # the same products, written in place and as calls
        x = torch.mul(x, self.called) + x.mul(self.method)
        # dot products, a weight with a fan-in: summed at once, or scaled first (a product inside the summed one)
        scores = (x * self.query).sum(-1) + (x * self.scaled_query * 2).sum(-1)
        mix = self.left * self.right  # two parameters, no activation (DiffLlama's λ)
        x = x + (1 - scores[:, None]) * self.blended  # a value blended in (SAM 2's `no_object_pointer`)
        return scores[:, None] * mix + x * self.temperature.exp()  # under a function first

    @torch.no_grad()
    def update(self, x):  # a parameter itself updated in place (a running average): no gain on x
        self.running.mul_(0.9).add_(x.mean(0))
        self.decayed *= x.mean()


def test_only_a_vector_the_code_multiplies_an_activation_by_is_a_gain():
    model = _Vectors()
    roles = parameter_roles(model, role_overrides={"|".join(_Vectors.OTHERS): "bias"})
    assert {name: roles[name] for name in _Vectors.GAINS} == dict.fromkeys(_Vectors.GAINS, "norm")
    for name in _Vectors.OTHERS:
        with pytest.raises(ValueError, match=rf"`{name}` \(shape \(8,\), in _Vectors\) has no learning-rate role"):
            parameter_roles(model, role_overrides={f"(?!{name}$).*": "bias"})


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_equivalent_table(case):
    model = unit_scale(case.model())
    scale_of = {}
    for module in unit_scaled_modules(model).values():
        scale_of.setdefault(id(module.weight), float(module.weight_scale))
    for group in _groups(model):
        for p in group["params"]:
            s = scale_of.get(id(p), 1.0)
            assert group["weight_scale"] == s
            assert group["lr"] == pytest.approx(LR / s, rel=1e-12)
            assert group["eps"] == pytest.approx(EPS * s, rel=1e-12)
            decayed = group["role"] in ("embedding", "hidden_weight", "readout")
            assert group["weight_decay"] == pytest.approx(WD * s if decayed else 0.0, rel=1e-12)
            if id(p) in scale_of:  # one converted tensor per group, named after it
                assert len(group["params"]) == 1 and group["name"].endswith(":" + describe_name(model, p))


def describe_name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_equivalent_groups_are_plain_adamw_on_w():
    """AdamW on Ŵ with the `equivalent` groups moves W = s·Ŵ exactly as torch's AdamW on W (the reference)."""
    torch.manual_seed(0)
    lr = 0.05
    plain = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    plain[1].weight.data.mul_(40.0)  # scales far from 1
    plain[3].weight.data.mul_(1e-3)
    converted = unit_scale(copy.deepcopy(plain))
    decay = {n for n, p in plain.named_parameters() if p.dim() >= 2}
    reference = torch.optim.AdamW(
        [
            {"params": [p for n, p in plain.named_parameters() if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in plain.named_parameters() if n not in decay], "weight_decay": 0.0},
        ],
        lr=lr,
        eps=1e-6,
    )
    groups = build_param_groups(
        converted,
        lr=lr,
        eps=1e-6,
        weight_decay=0.1,
        decay_parameter_names=decay,
        role_overrides={"3.weight": "readout"},
    )
    ours = torch.optim.AdamW(groups, lr=lr, eps=1e-6)
    ids = torch.randint(0, 11, (16,))
    for _ in range(20):
        for model, optimizer in ((plain, reference), (converted, ours)):
            optimizer.zero_grad()
            model(ids).square().mean().backward()
            optimizer.step()
    for (name, p), q in zip(plain.named_parameters(), converted.parameters(), strict=True):
        module = converted.get_submodule(name.rsplit(".", 1)[0])
        w = q * module.weight_scale if name.endswith("weight") and hasattr(module, "weight_scale") else q
        # relative to the tensor's scale: the two computations differ by fp32 rounding, which Adam's
        # normalization amplifies on elements whose gradient cancels to ~1% of the row's. Never below lr: each
        # step moves an element of W by up to lr whatever its size, so a tensor that ends near zero (`3.bias`,
        # max 0.0156, off by 1.8e-7 on one AVX-512 CPU) is not held to less than one step's rounding
        scale = max(p.detach().abs().max().item(), lr)
        torch.testing.assert_close(w, p, rtol=0, atol=1e-5 * scale, msg=f"{name} diverged from torch AdamW on W")


def _fan_in(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]  # Conv1D: (in, out)


@pytest.mark.parametrize("case_id", ["bert", "gpt2", "llama-untied"])
def test_umup_table_at_two_widths(case_id):
    for factor in (1, 2):
        model = _wider(case_id, factor)
        width = model.config.hidden_size
        infos = {i.name: i for i in describe_parameters(model)}
        for depth_scaling in (False, True):
            groups = _groups(model, "umup", umup_depth_scaling=depth_scaling)
            depth = model.config.num_hidden_layers
            for group in groups:
                for p in group["params"]:
                    info = next(i for i in infos.values() if i.param is p)
                    if info.role == "hidden_weight":
                        expected = LR * _fan_in(model, info.name) ** -0.5
                    elif info.role == "embedding":
                        expected = LR * width**-0.5
                    else:
                        expected = LR
                    if depth_scaling and info.residual:
                        expected *= depth**-0.5
                    assert group["lr"] == pytest.approx(expected, rel=1e-12), (info.name, group["name"])
                    assert group["eps"] == EPS
        assert {i.fan_in for i in infos.values() if i.role == "hidden_weight"} >= {width}
        assert any(i.residual for i in infos.values()) and not all(i.residual for i in infos.values())


@pytest.mark.parametrize("case_id", ["bert", "gpt2", "llama-untied"])
def test_mup_table_at_two_widths(case_id):
    base = 32
    for factor in (1, 2):
        model = _wider(case_id, factor)
        width_mult = model.config.hidden_size / base
        for group in _groups(model, "mup", mup_base_width=base):
            # the readout (untied: gpt2's is the tied embedding) carries MuReadout's 1/width_mult in its lr
            expected = LR / width_mult if group["role"] in ("hidden_weight", "readout") else LR
            assert group["lr"] == pytest.approx(expected, rel=1e-12), group["name"]
    with pytest.raises(ValueError, match="mup_base_width"):
        _groups(model, "mup")


def test_mup_reads_the_one_width_a_config_names_and_refuses_to_pick_one_of_several():
    """μP's width_mult = width / `mup_base_width` needs one width. ParakeetForCTC's config names none of its own:
    its encoder's `hidden_size` is the width. ConvNeXt has one per stage (`hidden_sizes`): an error names them
    until `config.hidden_size` says which one `mup_base_width` is the base model's value of."""
    import transformers as t

    encoder = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, num_mel_bins=16)
    parakeet = _tiny(t.ParakeetCTCConfig, t.ParakeetForCTC, vocab_size=VOCAB, pad_token_id=0, encoder_config=encoder)
    matrix = parakeet.encoder.layers[0].feed_forward1.linear1.weight
    (group,) = [g for g in _groups(parakeet, "mup", mup_base_width=16) if any(p is matrix for p in g["params"])]
    assert group["lr"] == pytest.approx(LR / 2)  # width_mult = 32 / 16

    convnext = _tiny(t.ConvNextConfig, t.ConvNextModel, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    with pytest.raises(
        ValueError, match=r"several widths: `hidden_sizes` = \[8, 16\].*Set `model\.config\.hidden_size`"
    ):
        _groups(convnext, "mup", mup_base_width=4)
    convnext.config.hidden_size = 16  # `mup_base_width` is the base model's last-stage width
    matrix = convnext.encoder.stages[1].layers[0].pwconv1.weight
    (group,) = [g for g in _groups(convnext, "mup", mup_base_width=4) if any(p is matrix for p in g["params"])]
    assert group["lr"] == pytest.approx(LR / 4)


def test_mup_reads_a_custom_models_own_config():
    """A model that is no transformers one, with its own config object, gives `mup` its `config.hidden_size`; with
    none, the error says what to add."""

    class Net(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.hidden = nn.Linear(64, 64, bias=False)

    matrix_lr = {g["lr"] for g in _groups(Net(SimpleNamespace(hidden_size=64)), "mup", mup_base_width=32)}
    assert matrix_lr == {LR / 2}
    with pytest.raises(ValueError, match="no `config.hidden_size`"):
        _groups(Net(SimpleNamespace()), "mup", mup_base_width=32)


def test_a_model_with_two_text_configs_gets_roles_and_mup_names_its_widths():
    """MusicGen's config has two text configs (its T5 text encoder's, its decoder's), so `get_text_config()` is
    ambiguous and raises: the roles read the config itself, and `mup` lists the widths of its three parts."""
    import transformers as t

    config = t.MusicgenConfig(
        text_encoder=dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4),
        audio_encoder=dict(
            model_type="encodec", hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2],
            codebook_size=16, num_lstm_layers=1,
        ),
        decoder=dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=37),
    )  # fmt: skip
    torch.manual_seed(0)
    model = unit_scale(t.MusicgenForConditionalGeneration(config))
    assert parameter_roles(model)["text_encoder.shared.weight"] == "embedding"
    with pytest.raises(ValueError, match=r"`text_encoder\.hidden_size` = 32; `audio_encoder\.hidden_size` = 16"):
        _groups(model, "mup", mup_base_width=16)


def test_typos_and_impossible_roles_are_named():
    model = unit_scale(CASES_BY_ID["bert"].model())
    with pytest.raises(
        ValueError, match=r"`lr_multipliers` key 'clasifier' matches no trainable parameter name \(re\.search"
    ):
        _groups(model, "umup", lr_multipliers={"clasifier": 10.0})
    with pytest.raises(ValueError, match=r"`role_overrides` key 'pooler' matches no .* it must match a whole name"):
        _groups(model, "umup", role_overrides={"pooler": "readout"})  # `bert.pooler.dense.weight` needs `.*pooler.*`
    with pytest.raises(ValueError, match=r"`role_overrides` key '\(' is not a regular expression"):
        _groups(model, "umup", role_overrides={"(": "readout"})
    with pytest.raises(ValueError, match=r"gives `classifier.bias` \(shape \(2,\)\) the role `hidden_weight`"):
        _groups(model, "umup", role_overrides={r"classifier\.bias": "hidden_weight"})


def test_factors_that_print_alike_get_their_own_groups():
    model = unit_scale(CASES_BY_ID["bert"].model())
    groups = _groups(model, "umup", lr_multipliers={"attention": 0.1, "query": 3.0, "intermediate": 0.3})
    query = [
        g for g in groups if any(p is model.bert.encoder.layer[0].attention.self.query.weight for p in g["params"])
    ]
    inter = [g for g in groups if any(p is model.bert.encoder.layer[0].intermediate.dense.weight for p in g["params"])]
    assert query[0]["lr"] != inter[0]["lr"] and query[0]["name"] != inter[0]["name"]


def test_options_of_another_rule_draw_a_warning(caplog):
    model = unit_scale(CASES_BY_ID["bert"].model())
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        _groups(model, "umup", mup_base_width=16)
    assert "`mup_base_width=16` applies to `lr_rule='mup'` only" in caplog.text


def test_depth_scaling_refuses_encoder_decoder_stacks():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    model = unit_scale(BartForConditionalGeneration(config))
    with pytest.raises(ValueError, match="has an encoder and a decoder stack"):
        _groups(model, "umup", umup_depth_scaling=True)


@pytest.mark.parametrize(("layers", "inner_layers"), [(3, 1), (2, 2)])
def test_depth_scaling_counts_the_blocks_an_albert_layer_is_shared_by(layers, inner_layers):
    """ALBERT runs its one layer group `num_hidden_layers` times, each run `inner_group_num` layers: L = layers ·
    inner_layers blocks. A shared tensor's gradient sums its uses, which Adam's step does not grow with: it takes
    η·fan_in^-½·L^-½, as the tensor of each block of an unshared stack does; the layers outside the stack do not."""
    import transformers as t

    albert = _tiny(
        t.AlbertConfig, t.AlbertForMaskedLM, vocab_size=VOCAB, embedding_size=16, hidden_size=32,
        num_hidden_layers=layers, inner_group_num=inner_layers, num_attention_heads=4, intermediate_size=37,
    )  # fmt: skip
    by_param = {id(p): g for g in _groups(albert, "umup", umup_depth_scaling=True) for p in g["params"]}
    shared = albert.albert.encoder.albert_layer_groups[0].albert_layers[inner_layers - 1]
    depth = layers * inner_layers
    assert by_param[id(shared.attention.query.weight)]["lr"] == pytest.approx(LR * 32**-0.5 * depth**-0.5)
    assert by_param[id(shared.ffn_output.weight)]["lr"] == pytest.approx(LR * 37**-0.5 * depth**-0.5)
    mapping_in = albert.albert.encoder.embedding_hidden_mapping_in.weight
    assert by_param[id(mapping_in)]["lr"] == pytest.approx(LR * 32**-0.5)  # an input layer, outside the blocks


def test_user_multipliers_apply_last_and_multiply():
    model = unit_scale(CASES_BY_ID["bert"].model())
    plain = {g["name"]: g for g in _groups(model, "umup")}
    groups = _groups(model, "umup", lr_multipliers={r"^classifier\.": 10.0, r"weight$": 0.5})
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.classifier.weight)]["lr"] == pytest.approx(plain["readout"]["lr"] * 5.0)
    assert by_param[id(model.classifier.bias)]["lr"] == pytest.approx(plain["bias"]["lr"] * 10.0)
    assert by_param[id(model.classifier.weight)]["name"] == "readout:lr_x5"
    with pytest.raises(ValueError, match="not a regular expression"):
        _groups(model, lr_multipliers={"(": 2.0})
    for bad in (-1.0, float("inf"), "ten", True):
        with pytest.raises(ValueError, match="finite non-negative number"):
            _groups(model, lr_multipliers={"x": bad})
    with pytest.raises(ValueError, match="must be a mapping regex → factor, got list"):
        _groups(model, lr_multipliers=[("x", 2.0)])


def test_multipliers_are_checked_alike_from_arguments_and_from_build_param_groups(tmp_path):
    """One checker serves both entry points: a numeric string (as JSON from a recipe gives it) is its number."""
    from hf_unitscale import UnitScaleTrainingArguments
    from hf_unitscale.lr_rules import check_lr_multipliers

    assert check_lr_multipliers({"classifier": "10"}) == {"classifier": 10.0}
    args = UnitScaleTrainingArguments(output_dir=str(tmp_path), lr_multipliers={"classifier": "10"}, use_cpu=True)
    assert args.lr_multipliers == {"classifier": 10.0}
    with pytest.raises(ValueError, match=r"`lr_multipliers\['x'\]` must be a finite non-negative number, got -2"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), lr_multipliers={"x": -2}, use_cpu=True)


@pytest.mark.parametrize("option", ["lr", "eps", "weight_decay"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), "1e-3"])
def test_negative_or_non_numeric_optimizer_settings_are_refused(option, value):
    model = unit_scale(CASES_BY_ID["bert"].model())
    settings = {"lr": LR, "eps": EPS, "weight_decay": WD, option: value}
    with pytest.raises(ValueError, match=rf"`{option}` should be a finite number >= 0"):
        build_param_groups(model, **settings)
    assert build_param_groups(model, **{**settings, option: 0.0})  # zero is a valid setting (a frozen lr, no decay)


def test_decay_follows_trainer():
    """Biases and norm gains are never decayed, as in `Trainer.get_decay_parameter_names`."""
    model = unit_scale(CASES_BY_ID["llama-untied"].model())
    for rule in ("equivalent", "umup"):
        for group in _groups(model, rule):
            assert (group["weight_decay"] > 0) == (group["role"] in ("embedding", "hidden_weight", "readout"))


def test_tables_added_to_the_activations_take_the_embedding_role():
    """ViT's `cls_token` (1, 1, h) and `position_embeddings` (1, n, h) are added, not multiplied: u-μP gives them
    η·h^-½ as an embedding, not η·(n·h)^-½ from a fan-in."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    model = unit_scale(ViTForImageClassification(config))
    roles = parameter_roles(model)
    assert roles["vit.embeddings.cls_token"] == roles["vit.embeddings.position_embeddings"] == "embedding"
    by_param = {id(p): group for group in _groups(model, "umup") for p in group["params"]}
    assert by_param[id(model.vit.embeddings.position_embeddings)]["lr"] == pytest.approx(LR * 32**-0.5)


def _tiny(config_class, model_class, **sizes):
    torch.manual_seed(0)
    return unit_scale(model_class(config_class(**sizes)))


def test_a_pointwise_convolution_ending_a_head_is_a_readout():
    """A kernel-size-1 convolution is a Linear over channels at each position: where it ends a head (its output
    channels feed no other head layer, and no norm follows it) it is a readout, fan-in in_channels. A conv of a
    conv-norm-activation block (MobileNetV2's `conv_1x1`) and head layers feeding a further conv stay hidden."""
    import transformers as t

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    parakeet = _tiny(
        t.ParakeetCTCConfig,
        t.ParakeetForCTC,
        vocab_size=VOCAB,
        pad_token_id=0,
        encoder_config=dict(small, num_mel_bins=16),
    )  # `ctc_head`: an nn.Conv1d, kernel 1, h → vocabulary
    segformer = _tiny(
        t.SegformerConfig, t.SegformerForSemanticSegmentation, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[8, 16], num_attention_heads=[1, 2], patch_sizes=[3, 3], strides=[2, 2], decoder_hidden_size=24,
        num_labels=5,
    )  # fmt: skip
    dpt = _tiny(
        t.DPTConfig, t.DPTForDepthEstimation, image_size=32, patch_size=8, **{**small, "num_hidden_layers": 4},
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )  # fmt: skip
    mobilenet = dict(image_size=16, depth_multiplier=0.25, min_depth=4)
    mobilenet_segmentation = _tiny(t.MobileNetV2Config, t.MobileNetV2ForSemanticSegmentation, num_labels=3, **mobilenet)
    mobilenet_model = _tiny(t.MobileNetV2Config, t.MobileNetV2Model, **mobilenet)
    readouts = {
        parakeet: {"ctc_head.weight"},
        # its Linear `linear_projections` feed the 1×1 `linear_fuse`, which feeds the 1×1 `classifier`
        segformer: {"decode_head.classifier.weight"},
        # the depth head's last conv, 1×1 after 3×3 ones; the neck's Linear `readout_projects` feed its convs
        dpt: {"head.head.4.weight"},
        mobilenet_segmentation: {"segmentation_head.classifier.convolution.weight"},
        mobilenet_model: set(),  # `conv_1x1` (320 → 1280 channels at full size) is normalized after: hidden
    }
    for model, expected in readouts.items():
        roles = parameter_roles(model)
        assert {name for name, role in roles.items() if role == "readout"} == expected, type(model).__name__
    roles = parameter_roles(segformer) | parameter_roles(dpt) | parameter_roles(mobilenet_model)
    for name in (
        "decode_head.linear_projections.0.proj.weight",
        "decode_head.linear_fuse.weight",
        "neck.reassemble_stage.readout_projects.0.0.weight",
        "conv_1x1.convolution.weight",
    ):
        assert roles[name] == "hidden_weight", name
    (group,) = [g for g in _groups(parakeet, "umup") if any(p is parakeet.ctc_head.weight for p in g["params"])]
    assert group["role"] == "readout" and group["lr"] == pytest.approx(LR)  # a readout's η, not η·fan_in^-½


def test_a_pooling_head_that_keeps_the_width_has_no_readout():
    """`SiglipVisionModel` is its own base model; after its encoder sits an attention-pooling `head` (attention,
    then a residual MLP h → i → h) whose output, the pooled embedding, keeps the width h: no output head, so its MLP
    layers are hidden weights (the "last matmul layer" fallback took `head.mlp.fc2`). A width-changing layer after
    the body still is one (SigLIP's image classifier)."""
    import transformers as t

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    vision = _tiny(t.SiglipVisionConfig, t.SiglipVisionModel, image_size=16, patch_size=4, **small)
    roles = parameter_roles(vision)
    assert [name for name, role in roles.items() if role == "readout"] == []
    assert roles["head.mlp.fc1.weight"] == roles["head.mlp.fc2.weight"] == "hidden_weight"
    classifier = _tiny(
        t.SiglipConfig, t.SiglipForImageClassification, num_labels=3,
        text_config=dict(vocab_size=VOCAB, **small), vision_config=dict(image_size=16, patch_size=4, **small),
    )  # fmt: skip
    assert [n for n, r in parameter_roles(classifier).items() if r == "readout"] == ["classifier.weight"]


def test_input_layers_gains_and_attention_bias_tables_get_their_roles():
    """μP's input weights (fan-in a size of the raw input, fan-out the width) are vector-like: η under `mup`,
    η·fan_out^-½ under `umup`, as an embedding. weight_norm's g is a gain (η), its v a conv with fan-in in/groups·k.
    Layer scales, which the code multiplies activations by, are gains too, and so are single-element temperatures.
    Relative-position bias tables are added to attention scores: biases (η), as an LSTM's biases are."""
    import transformers as t

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    vit = _tiny(t.ViTConfig, t.ViTForImageClassification, image_size=16, patch_size=4, **small)
    whisper = _tiny(
        t.WhisperConfig, t.WhisperForConditionalGeneration, vocab_size=VOCAB, d_model=32, num_mel_bins=8,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=37, decoder_ffn_dim=37, max_source_positions=16, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    wav2vec2 = _tiny(
        t.Wav2Vec2Config, t.Wav2Vec2ForCTC, vocab_size=VOCAB, conv_dim=(16, 16), conv_stride=(5, 2),
        conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **small,
    )  # fmt: skip
    albert = _tiny(
        t.AlbertConfig, t.AlbertForMaskedLM, vocab_size=VOCAB, embedding_size=16, tie_word_embeddings=False, **small
    )
    swin = _tiny(t.SwinConfig, t.SwinForImageClassification, image_size=16, patch_size=4, embed_dim=16,
                 depths=[1], num_heads=[2], window_size=2)  # fmt: skip
    t5 = _tiny(t.T5Config, t.T5ForConditionalGeneration, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37,
               num_layers=1, num_heads=4)  # fmt: skip
    clip = _tiny(t.CLIPVisionConfig, t.CLIPVisionModel, image_size=16, patch_size=4, **small)
    mobilebert = _tiny(
        t.MobileBertConfig, t.MobileBertModel, vocab_size=VOCAB, embedding_size=16, true_hidden_size=16,
        intra_bottleneck_size=16, num_feedforward_networks=1, **{**small, "intermediate_size": 16},
    )  # fmt: skip
    beit = _tiny(t.BeitConfig, t.BeitModel, image_size=16, patch_size=4, **small)
    dinov2 = _tiny(t.Dinov2Config, t.Dinov2Model, image_size=16, patch_size=4, **small)
    convnext = _tiny(t.ConvNextConfig, t.ConvNextModel, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    towers = dict(text_config=dict(vocab_size=VOCAB, **small), vision_config=dict(image_size=16, patch_size=4, **small))
    clip_pair = _tiny(t.CLIPConfig, t.CLIPModel, projection_dim=16, **towers)
    siglip = _tiny(t.SiglipConfig, t.SiglipModel, **towers)
    encodec = _tiny(
        t.EncodecConfig, t.EncodecModel, hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2],
        codebook_size=16, num_lstm_layers=1,
    )  # fmt: skip
    pos_conv = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight"
    # model, parameter: (role, lr / η under umup, under mup with base width 16: width_mult 2; None: ConvNeXt names
    # one width per stage and no `config.hidden_size`, which mup refuses)
    expected = {
        (vit, "vit.embeddings.patch_embeddings.projection.weight"): ("embedding", 32**-0.5, 1.0),
        (whisper, "model.encoder.conv1.weight"): ("embedding", 32**-0.5, 1.0),  # reads num_mel_bins channels
        (whisper, "model.encoder.conv2.weight"): ("hidden_weight", 96**-0.5, 0.5),  # reads the width
        (wav2vec2, "wav2vec2.feature_extractor.conv_layers.0.conv.weight"): ("embedding", 16**-0.5, 1.0),  # 1 channel
        (wav2vec2, f"{pos_conv}.original0"): ("norm", 1.0, 1.0),  # g (1, 1, k)
        (wav2vec2, f"{pos_conv}.original1"): ("hidden_weight", (8 * 16) ** -0.5, 0.5),  # v (h, h/groups, k)
        (albert, "albert.encoder.embedding_hidden_mapping_in.weight"): ("embedding", 32**-0.5, 1.0),
        (albert, "predictions.decoder.weight"): ("readout", 1.0, 0.5),  # untied, reading embedding_size: a head
        (swin, "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"): (
            "bias",
            1.0,
            1.0,
        ),
        (t5, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"): ("bias", 1.0, 1.0),
        (clip, "embeddings.class_embedding"): ("embedding", 32**-0.5, 1.0),  # (h,), added
        # a hidden matrix reading as many features as embedding_size (16, the bottleneck's width): no input layer
        (mobilebert, "encoder.layer.0.attention.self.query.weight"): ("hidden_weight", 16**-0.5, 0.5),
        (encodec, "encoder.layers.7.lstm.bias_ih_l0"): ("bias", 1.0, 1.0),
        (wav2vec2, "wav2vec2.masked_spec_embed"): ("embedding", 32**-0.5, 1.0),  # (h,), replaces masked frames
        # layer scales γ ⊙ x: gains
        (beit, "layers.0.lambda_1"): ("norm", 1.0, 1.0),
        (dinov2, "encoder.layer.0.layer_scale1.lambda1"): ("norm", 1.0, 1.0),
        (convnext, "encoder.stages.1.layers.0.layer_scale_parameter"): ("norm", 1.0, None),
        (clip_pair, "logit_scale"): ("norm", 1.0, 1.0),  # 0-D, scalar-like
        (siglip, "logit_scale"): ("norm", 1.0, 1.0),  # (1,)
        (siglip, "logit_bias"): ("bias", 1.0, 1.0),
    }
    for (model, name), (role, umup, mup) in expected.items():
        assert parameter_roles(model)[name] == role, name
        param = dict(model.named_parameters())[name]
        for rule, factor in (("umup", umup), ("mup", mup)):
            if factor is None:
                continue
            groups = _groups(model, rule, mup_base_width=16) if rule == "mup" else _groups(model, rule)
            (lr,) = [g["lr"] for g in groups if any(p is param for p in g["params"])]
            assert lr == pytest.approx(LR * factor), (name, rule)


def test_vectors_stored_broadcast_shaped_are_gains_or_biases():
    """A per-channel vector stored in the shape it broadcasts in is a gain where the code multiplies an activation by
    it (ConvNeXt V2's GRN γ (1, 1, 1, c), SwiftFormer's layer scales (c, 1, 1), RWKV's `time_mix_*` (1, 1, c), which
    mix x and its shift), and a bias where named one (GRN's β): η under `umup`, as a 1-D gain or bias, not an
    embedding's η·c^-½ or a hidden weight's. SwiftFormer's `w_g` (c, 1) stays a hidden weight: `query @ self.w_g`
    is a matmul. RWKV's `time_decay` and `time_first` (c,) go to the WKV kernel: no role unless overridden."""
    import transformers as t

    convnextv2 = _tiny(t.ConvNextV2Config, t.ConvNextV2Model, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    swiftformer = _tiny(t.SwiftFormerConfig, t.SwiftFormerModel, depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16])
    rwkv = _tiny(
        t.RwkvConfig, t.RwkvModel, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
        intermediate_size=37, context_length=16,
    )  # fmt: skip
    kernel_inputs = {r"blocks\.\d+\.attention\.time_(decay|first)": "bias"}
    block = "encoder.network.0.blocks.0"
    expected = {
        (convnextv2, "encoder.stages.1.layers.0.grn.weight"): "norm",
        (convnextv2, "encoder.stages.1.layers.0.grn.bias"): "bias",
        (swiftformer, f"{block}.layer_scale_1"): "norm",
        (swiftformer, f"{block}.local_representation.layer_scale"): "norm",
        (swiftformer, f"{block}.attn.w_g"): "hidden_weight",
        (rwkv, "blocks.0.attention.time_mix_key"): "norm",
        (rwkv, "blocks.1.feed_forward.time_mix_receptance"): "norm",
    }
    for (model, name), role in expected.items():
        overrides = kernel_inputs if model is rwkv else None
        assert parameter_roles(model, role_overrides=overrides)[name] == role, name
        if role != "hidden_weight":
            param = dict(model.named_parameters())[name]
            groups = _groups(model, "umup", role_overrides=overrides)
            assert [g["lr"] for g in groups if any(p is param for p in g["params"])] == [LR], name
    with pytest.raises(ValueError, match=r"`blocks\.0\.attention\.time_decay` \(shape \(32,\).* no learning-rate role"):
        parameter_roles(rwkv)


def _stored_w(model: nn.Module, name: str) -> torch.Tensor:
    """W of parameter `name`: s·Ŵ where converted, the parameter itself where not."""
    module_name, leaf = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    return getattr(module, leaf).detach() * getattr(module, leaf + "_scale", 1.0)


@pytest.mark.parametrize("rule", ["umup", "mup"])
def test_a_gain_stored_broadcast_shaped_moves_by_eta_as_a_1d_one(rule):
    """A gain gets η on W under the width rules, whatever its shape: SwiftFormer's layer scale (c, 1, 1), pretrained
    at 1e-5, moves by η per element in Adam's first step (|m/√v| = 1), as ConvNeXt's 1-D layer scale does. Were it
    converted (W = s·Ŵ, s = 1e-5), η on Ŵ would move W by η·s."""
    model, inputs = tiny_gain_model("swiftformer")
    name = "encoder.network.4.blocks.0.layer_scale_1"
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(1e-5)  # SwiftFormer's `layer_scale_init_value`
    model.config.hidden_size = 16  # the one width mup reads
    unit_scale(model)
    before = _stored_w(model, name)
    options = {"mup_base_width": 8} if rule == "mup" else {}
    groups = build_param_groups(model, lr_rule=rule, lr=LR, eps=1e-12, weight_decay=0.0, **options)
    optimizer = torch.optim.AdamW(groups)
    model(**inputs).last_hidden_state.square().mean().backward()
    optimizer.step()
    step = (_stored_w(model, name) - before).abs()
    torch.testing.assert_close(step, torch.full_like(step, LR), rtol=1e-3, atol=0)


@pytest.mark.parametrize("model_id", list(GAIN_NAMES))
def test_equivalent_groups_are_plain_adamw_bit_for_bit_on_models_with_broadcast_shaped_gains(model_id):
    """With power-of-two scales, AdamW with the `equivalent` groups on a converted SwiftFormer, ConvNeXt V2 or
    wav2vec2 moves every W to the last bit as torch's AdamW on the original model does (Trainer's decay split):
    converted weights, and gains (c, 1, 1), (1, 1, 1, c), (1, 1, k) left as W."""
    plain, inputs = tiny_gain_model(model_id)
    converted = unit_scale(copy.deepcopy(plain), UnitScaleConfig(power_of_two_scales=True))
    decay = set(transformers.Trainer.get_decay_parameter_names(None, plain))
    reference = torch.optim.AdamW(
        [
            {"params": [p for n, p in plain.named_parameters() if n in decay], "weight_decay": WD},
            {"params": [p for n, p in plain.named_parameters() if n not in decay], "weight_decay": 0.0},
        ],
        lr=LR,
        eps=EPS,
    )
    ours = torch.optim.AdamW(_groups(converted, decay_parameter_names=decay), lr=LR, eps=EPS)
    for _ in range(5):
        for model, optimizer in ((plain, reference), (converted, ours)):
            optimizer.zero_grad()
            model(**inputs).last_hidden_state.square().mean().backward()
            optimizer.step()
    merged = dict(merge_unit_scale(converted).named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(merged[name], p), f"{name} differs from AdamW on W"


class _RightAndLeftMatmuls(nn.Module):
    """Two weights reading 12 features: `into` stored (in, out) and multiplied from the right, `back` stored
    (out, in) and transposed there."""

    def __init__(self):
        super().__init__()
        self.into = nn.Parameter(torch.randn(12, 5))
        self.back = nn.Parameter(torch.randn(5, 12))

    def forward(self, x):
        return torch.matmul(x, self.into) + x @ self.back.T


def test_a_weight_multiplied_from_the_right_takes_its_rows_as_fan_in():
    """`x @ self.w` sums over w's rows: a weight so used is stored (in, out), and u-μP's η·fan_in^-½ reads its first
    dimension: SwiftFormer's `w_g` (c, 1) in `query @ self.w_g` reads c features, not 1; `x @ self.w.T` is an
    (out, in) weight, as nn.Linear's."""
    import transformers as t

    swiftformer = _tiny(t.SwiftFormerConfig, t.SwiftFormerModel, depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16])
    matmuls = unit_scale(nn.Sequential(_RightAndLeftMatmuls()))
    expected = {
        (swiftformer, "encoder.network.0.blocks.0.attn.w_g"): 8,
        (swiftformer, "encoder.network.4.blocks.0.attn.w_g"): 16,
        (matmuls, "0.into"): 12,
        (matmuls, "0.back"): 12,
    }
    for (model, name), fan_in in expected.items():
        param = dict(model.named_parameters())[name]
        (group,) = [g for g in _groups(model, "umup") if any(p is param for p in g["params"])]
        assert (group["role"], group["lr"]) == ("hidden_weight", pytest.approx(LR * fan_in**-0.5)), name


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "llama4_text"])
def test_stacked_expert_weights_take_one_experts_fan_in(model_type):
    """transformers' MoE layers stack one matrix per expert: (E, out, in), or (E, in, out) where the layer says
    `is_transposed` (GPT-OSS) or multiplies with torch.bmm (Llama 4). u-μP's fan-in is one expert's `in` (hidden 32
    for gate_up, intermediate 48 for down), not the product of the trailing dimensions; GPT-OSS's per-expert biases
    (E, out) are biases, left unconverted."""
    import transformers

    config_class, model_class = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
        "llama4_text": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM),
    }[model_type]
    config = config_class(
        vocab_size=101, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = unit_scale(model_class(config))
    experts = (
        model.model.layers[0].feed_forward.experts if model_type == "llama4_text" else model.model.layers[0].mlp.experts
    )
    if model_type == "gpt_oss":
        roles = parameter_roles(model, role_overrides={r".*\.sinks": "bias"})
        assert roles["model.layers.0.mlp.experts.gate_up_proj_bias"] == "bias"
        assert "gate_up_proj_bias" not in experts.unit_scaled_weights
    # GPT-OSS's per-head attention-sink logits are a vector of their own: named here
    groups = _groups(model, "umup", role_overrides={r".*\.sinks": "bias"} if model_type == "gpt_oss" else None)
    by_param = {id(p): group for group in groups for p in group["params"]}
    assert by_param[id(experts.gate_up_proj)]["lr"] == pytest.approx(LR * 32**-0.5)
    assert by_param[id(experts.down_proj)]["lr"] == pytest.approx(LR * 48**-0.5)
