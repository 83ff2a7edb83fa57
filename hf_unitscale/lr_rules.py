"""Parameter roles and per-group learning-rate rules for training a unit-scaled model.

A converted weight is W = s·Ŵ with the Parameter Ŵ trainable and s a fixed fp32 scalar, so the
gradient the optimizer sees is g_Ŵ = s·g_W. Every trainable parameter gets one role: the first entry below that
fits it (`describe_parameters`). A vector is one value per channel: 1-D, or stored in the shape it broadcasts in,
one dimension larger than 1 and the others 1 (SwiftFormer's layer scales (c, 1, 1), ConvNeXt V2's GRN γ and β
(1, 1, 1, c), RWKV's `time_mix_key` (1, 1, c)): `gains.is_vector`. Gains (`gains.is_gain`, the `norm` role below)
and biases are never converted, whatever their shape, so their lr moves W itself.

    0. (any)           the role of the first `role_overrides={regex: role}` pattern that matches the name
                       (`re.fullmatch`); `embedding`, `hidden_weight` and `readout` need a ≥2-D weight
    1. bias            a relative-position bias table added to attention scores, found by name (T5's
                       `relative_attention_bias`, Swin's `relative_position_bias_table`)
    2. embedding       the weight of an nn.Embedding (a tied input/output matrix is one Parameter, named after
                       the embedding), and an input layer, whose fan-in is a size of the raw input fixed by the
                       config, not the width (μP's input weights): a conv reading `num_channels` / `num_mel_bins` /
                       `input_feat_per_channel` channels or one (patch embeddings, Whisper's `conv1`, wav2vec2's
                       first conv), a Linear named `*embed*` reading `embedding_size` ≠ `hidden_size` (ALBERT's,
                       ELECTRA's embedding projections)
    3. readout         an output head: `get_output_embeddings()` if untied, and each matmul layer outside the
                       base model that feeds no other one there (`classifier`, `score`, `qa_outputs`, a
                       next-sentence or multiple-choice head beside the LM head, a pointwise conv such as
                       ParakeetForCTC's `ctc_head`, …: `convert.readout_modules`)
    4. bias            a vector or ≤2-D parameter named `bias`, a stacked one (`*_bias`, one row per expert), a
                       recurrent layer's (`bias_ih_l<k>`, `bias_hh_l<k>`)
    5. norm            a gain (`gains.is_gain`): the weight of a normalization layer (LayerNorm, RMSNorm, …) if a
                       vector, weight_norm's g (a parametrization original that broadcasts against the weight),
                       and a vector that its module's code multiplies an activation by (`self.p * x`, found in the
                       source): a layer scale (ConvNeXt's `layer_scale_parameter`, BEiT's `lambda_1`, DINOv2's
                       `lambda1`, SwiftFormer's `layer_scale`), GRN's γ, RWKV's `time_mix_*`
                       (x·μ + shift(x)·(1 - μ))
    6. embedding       a table added to the activations (ViT's `cls_token` (1, 1, h), `position_embeddings`
                       (1, n, h): ≥3-D with a leading 1), and a 1-D vector named `*embed*` that stands in for one
                       (CLIP's `class_embedding`, wav2vec2's `masked_spec_embed`, which replaces masked frames;
                       d_model = h, its length)
    7. hidden_weight   any other ≥2-D parameter (fan-in: `_fan_in`; of a weight the code multiplies from the
                       right, `x @ self.w`, its rows: SwiftFormer's `w_g` (c, 1) reads c features)
    8. norm            a single-element parameter (CLIP's 0-D `logit_scale`, SigLIP's (1,) one, a tanh gate)

A vector's code, not its shape, tells a gain (5) from an added table (6): RWKV's `time_mix_key` (1, 1, c) is
shaped as ViT's `cls_token` (1, 1, h); a norm weight or a bias stays one whatever multiplies it. Gains and
scalars get η under both width rules, as norm gains and biases do. μP sorts a parameter by how many of its
dimensions grow with the width: a gain (c,) is vector-like, a temperature scalar-like, and under Adam both train
with a width-independent lr. u-μP scales the lr of a matmul weight, whose outputs each sum fan-in products, and of
an embedding; a gain or a scalar multiplies each activation by one value of its own, with no sum over a fan-in: η,
as a norm gain.

A <2-D parameter that fits none of these is an error naming it under `umup` and `mup` (GPT-OSS's attention
`sinks`, Mamba-2's `A_log` and `D` and RWKV's `time_decay` and `time_first`, which kernels read, Gemma 3n's
`per_dim_scale`, used under a softplus, LLaVA-NeXT's `image_newline`): name its role with `role_overrides` (0)
rather than have it guessed. Under `equivalent`, where an unconverted parameter gets η, ε and Trainer's decay
whatever its role, it joins `bias`.

Rules (η = learning rate, ε = Adam eps, wd = weight decay, per tensor with scale s):

    rule         role            lr                      eps     weight_decay
    equivalent   converted Ŵ     η / s                   s·ε     s·wd
                 everything else η                       ε       wd
    umup         hidden_weight   η · fan_in^-½           ε       wd
                 embedding       η · d_model^-½          ε       wd
                 (d_model: the width it writes, its fan-out)
                 readout, norm,  η                       ε       wd
                 bias
                 (depth scaling: every tensor inside the L repeated blocks also × L^-½; L counts blocks
                 run, so a layer that ALBERT shares across them gets L^-½ too: below)
    mup          hidden_weight   η / width_mult          ε       wd
                 (matrix-like)   width_mult = hidden_size / mup_base_width
                                 (hidden_size: `_hidden_size`; several widths: an error)
                 readout         η / width_mult          ε       wd
                 embedding, norm, bias (vector-like): η

`equivalent` is exactly plain AdamW on W: with g_Ŵ = s·g_W, Adam's moments are m_Ŵ = s·m_W and
v_Ŵ = s²·v_W, so m_Ŵ/(√v_Ŵ + s·ε) = m_W/(√v_W + ε); the step on Ŵ is (η/s)·dir and on W = s·Ŵ it
is η·dir; torch's decoupled decay multiplies Ŵ by 1 - lr·wd = 1 - (η/s)(s·wd) = 1 - η·wd, as for
W. Parameters that are not converted (norm gains, biases, excluded modules) keep η, ε, wd.

Weight decay follows `transformers.Trainer` in every rule: no decay on the parameters outside
`Trainer.get_decay_parameter_names` (biases and norm weights). The pretrained forward is kept, so
`mup` has no MuReadout 1/width_mult output multiplier; under Adam, whose step does not depend on a
weight's scale, giving the (untied) readout η/width_mult changes the logits exactly as MuReadout with
MuAdam's η does. A readout tied to the input embedding keeps the embedding's η. User multipliers
(`lr_multipliers={regex: factor}`, `re.search` over parameter names, every matching pattern
multiplies) are applied last, to the lr only.

Depth scaling with a shared layer (ALBERT: `num_hidden_groups` groups of `inner_group_num` layers, each group run
num_hidden_layers / num_hidden_groups times; L = num_hidden_layers · inner_group_num blocks). A tensor W used by m of
the L blocks receives the sum of their gradients, g = Σ_l g_l. Adam's step (η'·m/√v, per element of order η'
whatever the size of g) does not grow with that sum, so each use of W moves the residual stream as one unshared
block's tensor with lr η' does, and the m uses together as m such blocks. Unshared, each block gets η·L^-½ so that
the L blocks' coherent updates add up to a depth-independent change; W's m uses are m of those L shares,
which η' = η·L^-½ gives them, whatever m is. (Were the g_l uncorrelated, |g| would grow as √m, not m, with Adam's
step still of order η': the same lr errs on the small side.) ε stays ε: with g up to m times larger, it only weighs
less against √v.

Groups are deterministic: named `<role>` plus a tag (`hidden_weight:fan_in=37`,
`hidden_weight:bert.encoder.layer.0.attention.self.query.weight` for one converted tensor under
`equivalent`), in `named_parameters` order; `check_param_groups` verifies that they cover every
trainable parameter exactly once.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .convert import is_bias_name, readout_modules, weight_scales
from .gains import is_gain, is_vector, parameter_owners
from .right_operands import multiplies_from_the_right

__all__ = [
    "LR_RULES",
    "ROLES",
    "LrRule",
    "ParamInfo",
    "Role",
    "build_param_groups",
    "check_lr_options",
    "check_param_groups",
    "check_role_overrides",
    "describe_parameters",
    "parameter_roles",
    "summarize_param_groups",
]

logger = logging.get_logger(__name__)

Role = Literal["embedding", "hidden_weight", "readout", "norm", "bias"]
ROLES: tuple[str, ...] = get_args(Role)
LrRule = Literal["equivalent", "umup", "mup"]
LR_RULES: tuple[str, ...] = get_args(LrRule)

# the roles of ≥2-D weights: plain Trainer decays them (not biases or norm gains), and the rules read their
# fan-in or width from the shape
_WEIGHT_ROLES = ("embedding", "hidden_weight", "readout")


def _check_pattern_matches(option: str, pattern: str, names: list[str], match) -> None:
    """A regex of `option` (compiled by `_check_regex_mapping`) must match some trainable parameter name: a typo must
    not do nothing."""
    if not any(match(pattern, name) for name in names):
        how = "re.fullmatch: it must match a whole name" if match is re.fullmatch else "re.search: anywhere in a name"
        example = f", e.g. {names[-1]!r}" if names else ""
        raise ValueError(f"`{option}` key {pattern!r} matches no trainable parameter name ({how}{example}).")


def _check_regex_mapping(option: str, mapping: Any, kind: str, expected: str, read_value: Callable[[Any], Any]) -> dict:
    """`mapping` ({regex over parameter names: a `kind`}) as a dict whose keys compile and whose values are
    `read_value(value)`; `read_value` returns None for a value it refuses, and `expected` says what it takes."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"`{option}` must be a mapping regex → {kind}, got {type(mapping).__name__}.")
    checked = {}
    for pattern, value in mapping.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`{option}` key {pattern!r} is not a regular expression: {err}.") from None
        checked[pattern] = read_value(value)
        if checked[pattern] is None:
            raise ValueError(f"`{option}[{pattern!r}]` must be {expected}, got {value!r}.")
    return checked


def check_role_overrides(role_overrides: Any) -> dict[str, Role]:
    """`role_overrides` as a dict, checked: a mapping of regular expressions to roles (one of `ROLES`)."""
    return _check_regex_mapping(
        "role_overrides", role_overrides, "role", f"one of {ROLES}", lambda role: role if role in ROLES else None
    )


@dataclass(frozen=True)
class ParamInfo:
    """What the rules need to know about one trainable parameter."""

    name: str  # first name in `named_parameters` (a tied weight: the embedding's name)
    param: nn.Parameter
    role: Role
    scale: float  # s of a converted weight, 1.0 for anything not converted
    converted: bool
    fan_in: int  # inputs per output of a matmul-like weight; 0 for 1-D parameters
    fan_out: int  # outputs per input: the width an embedding or input layer writes
    residual: bool  # inside one of the model's repeated blocks
    decay: bool  # plain Trainer applies weight decay to it


def _is_added_embedding(module: nn.Module, leaf: str, param: torch.Tensor) -> bool:
    """A module's own parameter added to the activations: ViT's `cls_token` (1, 1, h) and `position_embeddings`
    (1, n, h), ≥3-D with a leading broadcast dimension; CLIP's `class_embedding` (h,), 1-D and named so. Not a
    weight that multiplies: fan-in is no measure."""
    if param.dim() == 1:
        return "embed" in leaf
    return param.dim() >= 3 and param.shape[0] == 1 and not isinstance(module, (Conv1D, nn.modules.conv._ConvNd))


# config keys holding the channels of a model's raw input (pixels, mel bins, speech features): fixed whatever the width
_INPUT_CHANNEL_KEYS = ("num_channels", "num_mel_bins", "input_feat_per_channel")
# parameters added to attention scores, one value per (relative position, head): biases, whatever their shape
_ATTENTION_BIAS_TABLE = re.compile(r"relative_(attention|position)_bias")


def _input_sizes(config: Any) -> tuple[set[int], set[int]]:
    """(input channels of a conv, input features of a Linear) that a config fixes independently of the width:
    `_INPUT_CHANNEL_KEYS` and 1 (raw audio); `embedding_size` where it differs from `hidden_size` (ALBERT,
    ELECTRA), in the config and its sub-configs."""
    channels, features = {1}, set()
    pending = [config.to_dict()] if config is not None and hasattr(config, "to_dict") else []
    while pending:
        values = pending.pop()
        pending += [v for v in values.values() if isinstance(v, dict)]
        channels |= {values[k] for k in _INPUT_CHANNEL_KEYS if isinstance(values.get(k), int)}
        embedding_size = values.get("embedding_size")
        if isinstance(embedding_size, int) and embedding_size != values.get("hidden_size", embedding_size):
            features.add(embedding_size)
    return channels, features


def _input_layer_weights(model: nn.Module) -> set[int]:
    """ids of the weights of input layers: a conv whose input channels are a size of the raw input that the config
    fixes, or an embedding projection (a Linear named `*embed*`) reading `embedding_size` (`_input_sizes`). μP calls
    them input weights: fan-in finite, fan-out the width. A hidden Linear that happens to read `embedding_size`
    features (MobileBERT's bottlenecks) is no input layer."""
    channels, features = _input_sizes(getattr(model, "config", None))
    weights = set()
    for name, module in model.named_modules():
        conv = isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and module.in_channels in channels
        projection = isinstance(module, nn.Linear) and module.in_features in features and "embed" in name
        if conv or projection:
            weights.add(id(module._parameters.get("weight")))  # not a parametrized weight's computed tensor
    return weights


# transformers MoE layers that store each expert (in, out) without `use_experts_implementation`'s `is_transposed`
_IN_OUT_EXPERTS = ("Llama4TextExperts",)


def _fan_out(module: nn.Module, param: torch.Tensor) -> int:
    """Outputs per input: a Linear's or conv's rows; the last dimension of anything else (an embedding table, an
    added table, Conv1D's (in, out) weight); 1 for a 0-D scalar."""
    if param.dim() == 0:
        return 1
    rows_are_outputs = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and param.dim() >= 2
    return int(param.shape[0] if rows_are_outputs else param.shape[-1])


def _fan_in(module: nn.Module, leaf: str, param: torch.Tensor) -> int:
    """Inputs per output of `param`, named `leaf` in `module`: (out, in) unless stored (in, out) (Conv1D's, a weight
    the code multiplies from the right, `x @ self.w`: `right_operands`), one expert's of stacked experts; 0 for a
    vector."""
    if param.dim() < 2:
        return 0
    if isinstance(module, Conv1D):  # weight stored (in, out)
        return int(param.shape[0])
    if param.dim() == 2 and multiplies_from_the_right(module, leaf):  # `x @ self.w`: stored (in, out) too
        return int(param.shape[0])
    if param.dim() >= 3 and not isinstance(module, nn.modules.conv._ConvNd):
        # stacked experts of a transformers MoE layer: one (out, in) matrix per expert, or (in, out) where the
        # layer says `is_transposed` (`use_experts_implementation`: GPT-OSS, Aria) or multiplies with torch.bmm
        # (Llama 4); fan-in is one expert's
        original_class = getattr(module, "base_class", type(module))  # the class before conversion
        transposed = getattr(module, "is_transposed", original_class.__name__ in _IN_OUT_EXPERTS)
        return int(param.shape[-2] if transposed else param.shape[-1])
    # Linear (out, in), Conv (out, in/groups, *kernel), LSTM (4h, in); from the shape, as torch 2.6's DTensor
    # (an FSDP2-sharded parameter) has no sharding rule for indexing
    return math.prod(param.shape[1:])


def _text_config(model: nn.Module) -> Any:
    """The model's text config (`get_text_config()`: the config itself, or a multimodal model's language model's);
    the config itself where that is ambiguous (MusicGen's text encoder and decoder), or None."""
    config = getattr(model, "config", None)
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs
        return config


def _num_layers(model: nn.Module) -> int | None:
    """The depth L of u-μP's depth scaling: how many blocks the forward runs, `config.num_hidden_layers`; ALBERT's,
    whose `num_hidden_groups` groups of `inner_group_num` layers each run num_hidden_layers / num_hidden_groups times,
    runs num_hidden_layers · inner_group_num layers."""
    config = _text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    if layers and getattr(config, "num_hidden_groups", None):
        return layers * config.inner_group_num
    return layers


def _block_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the ModuleLists holding the model's repeated blocks: `num_hidden_layers` of them, or
    ALBERT's `num_hidden_groups` shared layer groups."""
    config = _text_config(model)
    blocks = getattr(config, "num_hidden_groups", None) or getattr(config, "num_hidden_layers", None)
    if not blocks:
        return ()
    return tuple(
        name + "."
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == blocks and name
    )


# where a config has no `hidden_size` (transformers' `attribute_map` already reads GPT-2's `n_embd`, BART's `d_model`,
# DistilBERT's `dim` as one), the attributes that name a width: one, or one per stage. A scalar `embed_dim` is no
# width (a VQ-GAN's is its codebook's dimension); a list of them is one per stage (CvT). Any other `*hidden_size(s)`
# (DPT's `fusion_hidden_size`, `neck_hidden_sizes`) is the width of a part of the model too
_WIDTH_KEYS = ("d_model", "n_embd", "n_embed", "dim", "d_latents")
_STAGE_WIDTH_KEYS = ("embed_dim", "embed_dims")
_WIDTH_SUFFIXES = ("hidden_size", "hidden_sizes")


def _is_width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_widths(config: PretrainedConfig, prefix: str = "") -> dict[str, int | list[int] | None]:
    """{attribute path: width} of a config: its `hidden_size` alone where it has one (Swin's, its last stage's, as its
    config sets it); else the widths its attributes name and, recursively, its sub-configs' (a `backbone_config`,
    SAM's `mask_decoder_config`). A (sub-)config that names none maps to None: its width is unknown."""
    width = getattr(config, "hidden_size", None)
    if _is_width(width):
        return {f"{prefix}hidden_size": width}
    widths: dict[str, int | list[int] | None] = {}
    for key, value in config.to_dict().items():
        per_stage = key in _STAGE_WIDTH_KEYS or key.endswith(_WIDTH_SUFFIXES)
        if (key in _WIDTH_KEYS or per_stage) and _is_width(value) and key != "embed_dim":
            widths[prefix + key] = value
        elif per_stage and isinstance(value, (list, tuple)) and value and all(_is_width(v) for v in value):
            widths[prefix + key] = list(value)
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            widths |= _config_widths(value, f"{prefix}{key}.")
    return widths or {prefix.rstrip(".") or "config": None}


def _hidden_size(model: nn.Module) -> int:
    """The width μP's width_mult = width / `mup_base_width` reads: the `hidden_size` of the model's text config
    (`_text_config`), else the one width that its attributes and sub-configs name. A model with several (ConvNeXt's
    per-stage `hidden_sizes`, SAM's vision encoder and mask decoder) or with a part that names none (a vocoder) is an
    error naming them: which width `mup_base_width` is the base model's value of is the user's to say. A config that
    is no transformers one (a custom model's) gives its `hidden_size`."""
    config = _text_config(model)
    if not isinstance(config, PretrainedConfig):  # a custom model's own config object
        if _is_width(width := getattr(config, "hidden_size", None)):
            return width
        raise ValueError(
            f"`mup` needs the model width: {type(model).__name__} has no transformers `config` and no "
            "`config.hidden_size`. Use `umup`, which reads each weight's own fan-in, or give the model a config "
            "with `hidden_size`."
        )
    widths = _config_widths(config)
    distinct = {
        w for value in widths.values() if value is not None for w in (value if isinstance(value, list) else [value])
    }
    if len(distinct) == 1 and None not in widths.values():
        return distinct.pop()
    found = "; ".join(
        f"`{path}` names none" if value is None else f"`{path}` = {value}" for path, value in widths.items()
    )
    raise ValueError(
        f"`mup` scales by one width_mult = hidden_size / `mup_base_width`, and {type(model).__name__}'s config has no "
        f"`hidden_size` but {'several widths' if len(distinct) > 1 else 'no single width'}: {found} (read from "
        f"`hidden_size`, {', '.join(f'`{k}`' for k in _WIDTH_KEYS)}, per-stage `embed_dim(s)` and any "
        "`*hidden_size(s)`). Set `model.config.hidden_size` to the width whose base-model value `mup_base_width` is "
        "(width_mult is one ratio for all widths that grow by one factor; the config saves it), or use "
        "`lr_rule='umup'`, which reads each weight's own fan-in."
    )


def _default_decay_names(model: nn.Module) -> set[str]:
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def describe_parameters(
    model: nn.Module,
    *,
    role_overrides: Mapping[str, Role] | None = None,
    decay_parameter_names: Iterable[str] | None = None,
    unassigned_role: Role | None = None,
) -> list[ParamInfo]:
    """Role, scale, fan-in, block membership and decay of every trainable parameter of `model`.

    Args:
        role_overrides: {regex over parameter names (re.fullmatch): role}; the first matching
            pattern wins over the automatic role.
        unassigned_role: the role of a <2-D parameter that fits none (attention sinks, Mamba-2's `A_log`, a vector
            used under a softplus); None: an error.
        decay_parameter_names: the names plain Trainer decays; defaults to
            `Trainer.get_decay_parameter_names(model)`.

    Raises:
        ValueError: a parameter fits no role (named, with its shape and module), or an override
            names an unknown role.
    """
    overrides = check_role_overrides(role_overrides or {})
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    for pattern in overrides:
        _check_pattern_matches("role_overrides", pattern, trainable, re.fullmatch)
    decay = set(_default_decay_names(model) if decay_parameter_names is None else decay_parameter_names)
    scales = weight_scales(model)
    readout_weights = {id(m.weight) for m in readout_modules(model) if hasattr(m, "weight")}
    blocks = _block_prefixes(model)

    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding_weights |= _input_layer_weights(model) - readout_weights  # an untied head reading embedding_size
    owner = parameter_owners(model)

    infos = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module, leaf = owner[id(param)]
        role = next((r for pattern, r in overrides.items() if re.fullmatch(pattern, name)), None)
        if role in _WEIGHT_ROLES and param.dim() < 2:
            raise ValueError(
                f"`role_overrides` gives `{name}` (shape {tuple(param.shape)}) the role `{role}`, which the rules "
                "scale by the weight's fan-in or width: it needs a ≥2-D weight. Use `norm` or `bias` (lr η)."
            )
        if role is None:
            if _ATTENTION_BIAS_TABLE.search(name):
                role = "bias"
            elif id(param) in embedding_weights:
                role = "embedding"  # an embedding tied to the output head too
            elif id(param) in readout_weights:
                role = "readout"
            elif is_bias_name(leaf) and (param.dim() <= 2 or is_vector(param)):  # 2-D: one bias per expert
                role = "bias"
            elif is_gain(module, leaf, param):
                role = "norm"  # before the shape of an added table can claim it; not converted
            elif _is_added_embedding(module, leaf, param):
                role = "embedding"
            elif param.dim() >= 2:
                role = "hidden_weight"
            elif param.numel() == 1:
                role = "norm"  # scalar-like (a temperature, a gate)
            elif unassigned_role is not None:
                role = unassigned_role
                logger.info(f"`{name}` (shape {tuple(param.shape)}) fits no learning-rate role: taking `{role}`.")
            else:
                raise ValueError(
                    f"Parameter `{name}` (shape {tuple(param.shape)}, in {type(module).__name__}) has no learning-rate "
                    f"role: it is neither an embedding, the readout, a norm gain, a bias nor a ≥2-D weight. Name its "
                    f"role with `role_overrides={{{re.escape(name)!r}: <one of {ROLES}>}}` (a key of recipes and "
                    "UnitScaleTrainingArguments; an argument of build_param_groups)."
                )
        infos.append(
            ParamInfo(
                name=name,
                param=param,
                role=role,
                scale=scales.get(id(param), 1.0),
                converted=id(param) in scales,
                fan_in=_fan_in(module, leaf, param),
                fan_out=_fan_out(module, param),
                residual=name.startswith(blocks),
                decay=name in decay,
            )
        )
    return infos


def parameter_roles(model: nn.Module, *, role_overrides: Mapping[str, Role] | None = None) -> dict[str, Role]:
    """{parameter name: role} for every trainable parameter, in `named_parameters` order."""
    return {info.name: info.role for info in describe_parameters(model, role_overrides=role_overrides)}


def _rule_settings(
    info: ParamInfo,
    rule: str,
    *,
    lr: float,
    eps: float,
    weight_decay: float,
    width_mult: float,
    depth: int | None,
    depth_scaling: bool,
) -> tuple[float, float, float, list[str]]:
    """(lr, eps, weight_decay, tag parts) of one parameter under `rule`, before user multipliers."""
    wd = weight_decay if info.decay else 0.0
    tags: list[str] = []
    if rule == "equivalent":
        if info.converted:
            # lr_Ŵ = η/s, eps_Ŵ = s·ε, wd_Ŵ = s·wd: AdamW on Ŵ moves W = s·Ŵ exactly as AdamW on W
            return lr / info.scale, eps * info.scale, wd * info.scale, [info.name]
        return lr, eps, wd, tags
    if rule == "umup":
        if info.role == "hidden_weight":
            lr = lr * info.fan_in**-0.5
            tags.append(f"fan_in={info.fan_in}")
        elif info.role == "embedding":
            d_model = info.fan_out
            lr = lr * d_model**-0.5
            tags.append(f"d_model={d_model}")
        if depth_scaling and info.residual:
            lr = lr * depth**-0.5
            tags.append(f"depth={depth}")
        return lr, eps, wd, tags
    if rule == "mup":
        if info.role == "hidden_weight":  # matrix-like: fan_in and fan_out both grow with width
            lr = lr / width_mult
            tags.append("matrix")
        elif info.role == "readout":  # MuReadout's 1/width_mult output multiplier, moved into Adam's lr
            lr = lr / width_mult
            tags.append("readout")
        return lr, eps, wd, tags
    raise ValueError(f"`lr_rule` must be one of {LR_RULES}, got {rule!r}.")


def check_lr_options(
    model: nn.Module,
    *,
    lr_rule: str = "equivalent",
    mup_base_width: int | None = None,
    umup_depth_scaling: bool = False,
    lr_multipliers: Mapping[str, float] | None = None,
    role_overrides: Mapping[str, Role] | None = None,
    decay_parameter_names: Iterable[str] | None = None,
) -> list[ParamInfo]:
    """Check the options of `build_param_groups` against `model` without building groups, so a trainer can refuse
    them before it evaluates or trains; returns every trainable parameter's `ParamInfo` under them.

    Args:
        model, lr_rule, mup_base_width, umup_depth_scaling, lr_multipliers, role_overrides, decay_parameter_names:
            as `build_param_groups` takes them.

    Raises:
        ValueError: an unknown rule, `mup` without `mup_base_width` or a model width, `umup` depth scaling on a
            model with no (or two) stacks of repeated blocks, a bad multiplier or role, a `lr_multipliers` or
            `role_overrides` pattern that matches no trainable parameter, or (under `umup`, `mup`) a parameter with
            no role; under `equivalent`, where the role changes nothing, such a parameter joins the `bias` role.
    """
    if lr_rule not in LR_RULES:
        raise ValueError(f"`lr_rule` must be one of {LR_RULES}, got {lr_rule!r}.")
    multipliers = check_lr_multipliers(lr_multipliers)
    infos = describe_parameters(
        model,
        role_overrides=role_overrides,
        decay_parameter_names=decay_parameter_names,
        # under `equivalent` an unconverted parameter gets η, ε and Trainer's decay whatever its role
        unassigned_role="bias" if lr_rule == "equivalent" else None,
    )
    for pattern in multipliers:
        _check_pattern_matches("lr_multipliers", pattern, [info.name for info in infos], re.search)
    if lr_rule == "mup":
        if not mup_base_width or mup_base_width <= 0:
            raise ValueError(f"`lr_rule='mup'` needs a positive `mup_base_width`, got {mup_base_width!r}.")
        _hidden_size(model)
    if lr_rule == "umup" and umup_depth_scaling:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"`umup_depth_scaling=True` scales by the depth L of one stack of blocks; {type(model).__name__} has "
                "an encoder and a decoder stack. Train it without depth scaling."
            )
        depth = _num_layers(model)
        if not (depth and _block_prefixes(model)):
            raise ValueError(
                "`umup_depth_scaling=True` needs the model's repeated blocks: found no ModuleList of "
                f"`config.num_hidden_layers` blocks (ALBERT's: of `num_hidden_groups` groups) in "
                f"{type(model).__name__}, whose depth L would be {depth}."
            )
    return infos


def build_param_groups(
    model: nn.Module,
    *,
    lr_rule: str = "equivalent",
    lr: float,
    eps: float,
    weight_decay: float,
    mup_base_width: int | None = None,
    umup_depth_scaling: bool = False,
    lr_multipliers: Mapping[str, float] | None = None,
    role_overrides: Mapping[str, Role] | None = None,
    decay_parameter_names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of `model` under `lr_rule` (see the module docstring for the table).

    Args:
        model: the model to train, usually converted by `unit_scale` (under `equivalent`, an unconverted model
            gets plain AdamW groups).
        lr_rule: `"equivalent"`, `"umup"` or `"mup"`.
        lr, eps, weight_decay: AdamW's η, ε and decoupled weight decay (each ≥ 0), which the rule scales per
            tensor.
        mup_base_width: under `mup`, the hidden size `lr` was tuned at: width_mult = hidden_size / mup_base_width.
            hidden_size is the text config's, or the one width the config names (`_hidden_size`).
            Required there; another rule ignores it with a warning.
        umup_depth_scaling: under `umup`, also multiply the lr of every tensor inside the L repeated blocks by
            L^-½ (L: the blocks run; a layer ALBERT shares gets L^-½ too; not for encoder-decoder models); another
            rule ignores it with a warning.
        lr_multipliers: {regex over parameter names: factor ≥ 0}, applied last to the lr only; `re.search`, and
            every matching pattern multiplies. A pattern that matches no trainable parameter is an error.
        role_overrides: {regex over parameter names: role}, `re.fullmatch`; the first matching pattern replaces
            the automatic role (needed under `umup` and `mup` for a parameter that fits none). A pattern that
            matches no trainable parameter is an error.
        decay_parameter_names: the parameter names that get weight decay; default
            `Trainer.get_decay_parameter_names(model)` (no decay on biases and norm weights).

    Returns:
        A list of torch param-group dicts with keys `params`, `lr`, `eps`, `weight_decay` and, for
        logging, `name`, `role`, `base_lr` (the lr at creation, so a schedule's factor is
        `lr / base_lr`) and, under `equivalent`, `weight_scale` (the group's s, 1.0 when not
        converted). Checked by `check_param_groups`.

    Raises:
        ValueError: a negative or non-finite `lr`, `eps` or `weight_decay`, or options that do not fit the model
            (`check_lr_options` lists them).
    """
    for option, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(
                f"`{option}` should be a finite number >= 0, as torch.optim.AdamW takes it; got {value!r}."
            )
    infos = check_lr_options(
        model,
        lr_rule=lr_rule,
        mup_base_width=mup_base_width,
        umup_depth_scaling=umup_depth_scaling,
        lr_multipliers=lr_multipliers,
        role_overrides=role_overrides,
        decay_parameter_names=decay_parameter_names,
    )
    multipliers = check_lr_multipliers(lr_multipliers)  # as floats
    _warn_about_ignored_options(lr_rule, mup_base_width=mup_base_width, umup_depth_scaling=umup_depth_scaling)
    width_mult = _hidden_size(model) / mup_base_width if lr_rule == "mup" else 1.0
    depth = _num_layers(model)
    depth_scaling = lr_rule == "umup" and umup_depth_scaling

    groups: dict[str, dict[str, Any]] = {}
    for info in infos:
        p_lr, p_eps, p_wd, tags = _rule_settings(
            info,
            lr_rule,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            width_mult=width_mult,
            depth=depth,
            depth_scaling=depth_scaling,
        )
        factor = 1.0
        for pattern, value in multipliers.items():
            if re.search(pattern, info.name):
                factor *= value
        if factor != 1.0:
            p_lr *= factor
            short = f"{factor:g}"  # exact: 0.1·3 and 0.3 are different factors and groups
            tags.append(f"lr_x{short if float(short) == factor else repr(factor)}")
        if info.role in _WEIGHT_ROLES and not info.decay:
            tags.append("no_decay")
        elif info.role not in _WEIGHT_ROLES and info.decay:
            tags.append("decay")
        name = info.role + (":" + ",".join(tags) if tags else "")
        settings = {"lr": p_lr, "eps": p_eps, "weight_decay": p_wd}
        if lr_rule == "equivalent":  # one s per group: the lr on W = s·Ŵ is lr·s
            settings["weight_scale"] = info.scale
        group = groups.get(name)
        if group is None:
            groups[name] = {"params": [info.param], "name": name, "role": info.role, "base_lr": p_lr, **settings}
        elif any(group[k] != v for k, v in settings.items()):
            raise RuntimeError(f"Internal error: parameters of group `{name}` disagree on {settings} vs {group}.")
        else:
            group["params"].append(info.param)
    result = list(groups.values())
    check_param_groups(model, result)
    return result


def _warn_about_ignored_options(lr_rule: str, *, mup_base_width: int | None, umup_depth_scaling: bool) -> None:
    """Name the options of another rule than `lr_rule` that are set (`mup_base_width` under `umup`): it ignores them."""
    for option, value, rule in (
        ("mup_base_width", mup_base_width, "mup"),
        ("umup_depth_scaling", umup_depth_scaling, "umup"),
    ):
        if value and lr_rule != rule:
            logger.warning(
                f"`{option}={value!r}` applies to `lr_rule='{rule}'` only; `lr_rule='{lr_rule}'` ignores it."
            )


def check_lr_multipliers(lr_multipliers: Any) -> dict[str, float]:
    """`lr_multipliers` as a dict of floats, checked: a mapping of regular expressions to non-negative factors; a factor
    given as a numeric string (from the command line or a JSON recipe) is read as its number."""
    if lr_multipliers is None:
        return {}
    return _check_regex_mapping(
        "lr_multipliers", lr_multipliers, "factor", "a finite non-negative number", _read_factor
    )


def _read_factor(value: Any) -> float | None:
    """`value` as a finite factor ≥ 0 (a number or a numeric string), or None."""
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 <= number < math.inf else None


def check_param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter of `model` in exactly one group, and nothing else; errors name the parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for p in group["params"]:
            label = group.get("name", "?")
            if id(p) not in names:
                raise ValueError(f"Group `{label}` holds a tensor of shape {tuple(p.shape)} that is not in the model.")
            if id(p) in seen:
                raise ValueError(f"Parameter `{names[id(p)]}` is in two groups: `{seen[id(p)]}` and `{label}`.")
            seen[id(p)] = label
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"Trainable parameter(s) in no optimizer group: {missing[:5]} ({len(missing)} in all).")


def summarize_param_groups(groups: list[dict[str, Any]]) -> str:
    """One line per role: groups, tensors, elements, the lr range on the trained tensor and on W = s·Ŵ."""
    lines = []
    for role in ROLES:
        members = [g for g in groups if g.get("role") == role]
        if not members:
            continue
        lrs = [g["lr"] for g in members]
        tensors = sum(len(g["params"]) for g in members)
        numel = sum(p.numel() for g in members for p in g["params"])
        line = f"{role:>13}: {len(members)} group(s), {tensors} tensor(s), {numel:,} elements; lr {_span(lrs)}"
        if all("weight_scale" in g for g in members):
            line += f" (on W = s·Ŵ: {_span([g['lr'] * g['weight_scale'] for g in members])})"
        lines.append(line)
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.4g}" if abs(high - low) <= 1e-6 * abs(high) else f"{low:.4g}..{high:.4g}"
