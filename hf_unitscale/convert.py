"""`unit_scale(model)` and `merge_unit_scale(model)`: walk a model, swap its layers, restore them.

For every weight W of a supported layer:

    s = rms(W)        (fp32 scalar; s = 1 for an all-zero W)
    Ŵ = W / s         (in place, so the Parameter object, its name and any tying survive)

and the layer's class becomes its unit-scaled twin (see `modules.py`), whose forward multiplies
s back in: the converted model computes the same function. A weight tied to one already
converted (GPT-2's `lm_head` and `wte`) is divided once; its second layer gets its own copy of s.
`merge_unit_scale` is the inverse: W = s·Ŵ and the original classes.

The supported layers are nn.Linear, transformers' Conv1D and nn.Embedding, and (the generic path,
`convert_other_modules`) any other module with ≥2-D parameters: those are converted, except biases
and gains (`gains.py`: a vector such as SwiftFormer's layer scale (c, 1, 1) stays W, as 1-D ones do).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .config import CONFIG_KEY, UnitScaleConfig, as_unit_scale_config
from .direct_reads import modules_read_directly
from .gains import gain_parameters, is_norm_layer
from .modules import (
    EMBEDDING_CLASSES,
    MATMUL_CLASSES,
    SCALE_SUFFIX,
    UnitScaledMatmulMixin,
    UnitScaledModuleMixin,
    generic_unit_scaled_class,
)
from .ops import apply_scale
from .progress import progress
from .resize import resize_token_embeddings

__all__ = [
    "check_converted_with",
    "check_no_peft_adapters",
    "conversion_differences",
    "convert_layers",
    "convert_model",
    "is_unit_scaled",
    "matmul_layers",
    "measure_weight_scale",
    "merge_unit_scale",
    "module_pattern_hint",
    "readout_modules",
    "recorded_conversion",
    "unit_scale",
    "unit_scaled_modules",
    "uses_power_of_two_scales",
    "weight_scales",
]

logger = logging.get_logger(__name__)

# the GEMM precision options of `UnitScaleConfig`
_FORMAT_OPTIONS = ("forward_format", "backward_format")
# the options that decide which weights are converted and their s; a converted model cannot change them
CONVERSION_OPTIONS = ("exclude_modules", "convert_other_modules", "power_of_two_scales")
# torch's recurrent layers (nn.RNN, nn.LSTM, nn.GRU) name their biases bias_ih_l<k> and bias_hh_l<k>, plus
# `_reverse` for the backward direction
_RECURRENT_BIAS = re.compile(r"bias_(ih|hh)_l\d+(_reverse)?")


def _matmul_widths(layer: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an nn.Linear (weight out × in), a GPT-2 Conv1D (weight in × out) or a
    convolution (its channels)."""
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    if isinstance(layer, _ConvNd):
        return int(layer.in_channels), int(layer.out_channels)
    return int(layer.in_features), int(layer.out_features)


def _is_pointwise_conv(layer: nn.Module) -> bool:
    """A convolution with kernel size 1, one group, not transposed: at every position the matmul W·x over channels,
    as an nn.Linear on the channel axis (ParakeetForCTC's `ctc_head`, SegFormer's `classifier`)."""
    return (
        isinstance(layer, _ConvNd)
        and not layer.transposed
        and layer.groups == 1
        and all(k == 1 for k in layer.kernel_size)
    )


def _holds_layer_stack(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def _changing_width(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """Those of `layers` that change the width, held in a child of `model` that changes it too: from the input of the
    child's first of `layers` to the output of its last (a lone layer's own widths) is not h → h, as SigLIP's
    attention-pooling `head` (attention, then a residual MLP h → i → h) is."""
    kept = []
    for child in model.children():
        members = {id(m) for m in child.modules()}
        held = [m for m in layers if id(m) in members]
        if held and _matmul_widths(held[0])[0] != _matmul_widths(held[-1])[1]:
            kept += [m for m in held if _matmul_widths(m)[0] != _matmul_widths(m)[1]]
    return kept


def _followed_by_norm(model: nn.Module) -> set[int]:
    """ids of the modules whose next sibling (in registration order) is a normalization layer: the conv of a
    conv-norm-activation block (MobileNetV2's `conv_1x1`), whose output is normalized, not read out."""
    return {
        id(child)
        for parent in model.modules()
        for child, following in zip(parent.children(), list(parent.children())[1:], strict=False)
        if is_norm_layer(following)
    }


def readout_modules(model: nn.Module) -> list[nn.Module]:
    """The output heads: `get_output_embeddings()` (tied or not) and each matmul layer outside the base model whose
    output width is no other layer's input width there, i.e. one that feeds no further head layer (a classifier, a
    next-sentence or multiple-choice head beside the LM head; a head's inner `dense`, h → h before an h → labels
    layer, is not one). A matmul layer is an nn.Linear, a GPT-2 Conv1D, or a pointwise convolution (kernel size 1,
    one group; fan-in in_channels) whose output no normalization layer follows: ParakeetForCTC's `ctc_head`,
    SegFormer's `classifier`, DPT's depth head's last conv. A convolution of any kernel is a layer that a matmul
    layer may feed. Where that finds no matmul layer outside the base model, the last nn.Linear or Conv1D there.

    A model that is its own base model (a bare `BertModel`, `T5ForQuestionAnswering`, CLIP's classifier) has as
    body its children that hold a stack of layers (an nn.ModuleList); of the layers outside them only those
    registered after the body that change the width, in a child of the model that changes it too, count
    (`qa_outputs`, `classifier`; not `BertModel`'s h → h pooler, nor the MLP of `SiglipVisionModel`'s
    attention-pooling `head`, h → h as a whole, nor `ElectraModel`'s `embeddings_project`, an input projection)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output() if callable(get_output) else None
    heads = [output_embeddings] if output_embeddings is not None else []
    base = getattr(model, "base_model", model)
    bodies = [base] if base is not model else [c for c in model.children() if _holds_layer_stack(c)]
    inside = {id(m) for body in bodies for m in body.modules()}
    outside = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D, _ConvNd)) and id(m) not in inside]
    if base is model:  # after the body (not an input projection), changing the width (not a pooler)
        order = {id(m): index for index, m in enumerate(model.modules())}
        body_end = max((order[i] for i in inside if i in order), default=-1)
        outside = _changing_width(model, [m for m in outside if order[id(m)] > body_end])
    widths = {id(m): _matmul_widths(m) for m in outside}
    normalized = _followed_by_norm(model)
    linears = [m for m in outside if not isinstance(m, _ConvNd)]
    matmuls = [m for m in outside if not isinstance(m, _ConvNd) or (_is_pointwise_conv(m) and id(m) not in normalized)]
    final = [m for m in matmuls if all(widths[id(m)][1] != widths[id(o)][0] for o in outside if o is not m)]
    heads += [m for m in final or linears[-1:] if m is not output_embeddings]
    return heads


def is_unit_scaled(model: nn.Module) -> bool:
    """Whether any module of `model` has been converted by `unit_scale`."""
    return any(isinstance(m, UnitScaledModuleMixin) for m in model.modules())


def unit_scaled_modules(model: nn.Module) -> dict[str, UnitScaledModuleMixin]:
    """The converted modules of `model` by qualified name, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UnitScaledModuleMixin)}


def matmul_layers(model: nn.Module) -> dict[str, UnitScaledMatmulMixin]:
    """The converted matmul layers of `model` (those with static operand scales a, c) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UnitScaledMatmulMixin)}


def weight_scales(model: nn.Module) -> dict[int, float]:
    """{id(Ŵ): s} for every unit-scaled weight of `model` (W = s·Ŵ); a tied weight appears once, with its first
    scale."""
    scales: dict[int, float] = {}
    for module in unit_scaled_modules(model).values():
        for weight_name in module.unit_scaled_weights:
            scales.setdefault(id(getattr(module, weight_name)), float(module.scale_of(weight_name)))
    return scales


def measure_weight_scale(weight: torch.Tensor, name: str, power_of_two: bool) -> torch.Tensor:
    """s = rms(W) = ‖W‖₂ / √n as an fp32 scalar, or with `power_of_two` 2^round(log₂ rms(W)); 1 for an all-zero W;
    an error naming the tensor if W is not finite."""
    w = weight.detach()
    # one pass: fp32 norms of rows (short sums, accurate), then their norm in fp64; a single fp32
    # reduction over a 28M-element embedding drifts by ~1e-3. nan/inf anywhere makes s non-finite.
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    row_norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.promote_types(w.dtype, torch.float32))
    scale = (torch.linalg.vector_norm(row_norms.double()) / math.sqrt(w.numel())).float()
    if not torch.isfinite(scale):
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise ValueError(
                f"Cannot unit-scale `{name}`: it has {bad} non-finite value(s) (nan/inf). "
                "Fix or re-initialize this weight before converting."
            )
        scale = (torch.linalg.vector_norm(w.double()) / math.sqrt(w.numel())).float()  # squares overflowed fp32
    if power_of_two:
        scale = torch.exp2(torch.round(torch.log2(scale)))
    return torch.where(scale > 0, scale, torch.ones_like(scale)).cpu()


def uses_power_of_two_scales(weight: torch.Tensor, config: UnitScaleConfig) -> bool:
    """`config.power_of_two_scales`, or where it is None, whether W is stored in a float narrower than fp32."""
    if config.power_of_two_scales is not None:
        return config.power_of_two_scales
    return weight.is_floating_point() and torch.finfo(weight.dtype).bits < 32


def is_bias_name(leaf: str) -> bool:
    """A bias by its parameter name: `bias`, a stacked one such as GPT-OSS's per-expert `gate_up_proj_bias`, or a
    recurrent layer's (`nn.LSTM`'s `bias_ih_l0`, `bias_hh_l1_reverse`)."""
    return leaf == "bias" or leaf.endswith("_bias") or _RECURRENT_BIAS.fullmatch(leaf) is not None


def _other_weights(module: nn.Module, gains: set[int]) -> tuple[str, ...]:
    """Names of a module's own ≥2-D parameters other than biases and gains (ids in `gains`: a layer scale stored
    (c, 1, 1) stays W, as a 1-D one does): the weights the generic path rescales."""
    return tuple(
        name
        for name, p in module.named_parameters(recurse=False)
        if p.dim() >= 2 and not is_bias_name(name) and id(p) not in gains
    )


def _excluded_names(model: nn.Module, config: UnitScaleConfig) -> set[str]:
    """Names of the modules `config.exclude_modules` leaves unconverted: those a pattern matches (re.fullmatch) and
    everything inside them; an error names a pattern that matches no module."""
    names = [name for name, _ in model.named_modules()]
    for pattern in config.exclude_modules:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ValueError(
                f"`exclude_modules` entry {pattern!r} matches no module of {type(model).__name__}: each entry is a "
                "regular expression that must match a whole module name (re.fullmatch), not a name's end as in peft. "
                + module_pattern_hint(pattern, names[1:], "To exclude the modules")
            )
    excluded = {name for name in names if config.is_excluded(name)}
    return {name for name in names if any(name == top or name.startswith(top + ".") for top in excluded)}


def module_pattern_hint(pattern: str, names: list[str], action: str) -> str:
    """How to fix a regex over module names (re.fullmatch) that matches none of `names`: the regex that matches the
    names ending in it (`pooler.dense` → `.*pooler\\.dense`), said as "`action` whose name ends in it", else the names
    closest to it, else two examples."""
    suffix = ".*" + (re.escape(pattern) if re.fullmatch(r"[\w.]+", pattern) else f"(?:{pattern})")
    ending = [name for name in names if re.fullmatch(suffix, name)]
    if ending:
        return f"{action} whose name ends in it ({_listed_names(ending)}), write r'{suffix}'."
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    if close:
        return f"The closest module names: {_listed_names(close)}."
    return f"Module names look like {_listed_names(names[:1] + names[-1:])}."


def _listed_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(repr(name) for name in names[:shown]) + (
        f", … ({len(names)} modules)" if len(names) > shown else ""
    )


def _check_ties_stay_inside(model: nn.Module, plan: list[tuple[str, nn.Module, type, tuple[str, ...]]]) -> None:
    """A weight shared by a module to convert and one that stays (excluded, or not convertible) would be divided
    by s for one and read as W by the other: refuse, naming both."""
    converted = {
        id(getattr(module, weight)): f"{name}.{weight}" for name, module, _, weights in plan for weight in weights
    }
    planned = {id(module) for _, module, _, _ in plan}
    for name, module in model.named_modules():
        if id(module) in planned:
            continue
        for weight, param in module.named_parameters(recurse=False):
            if id(param) in converted:
                raise ValueError(
                    f"`{name}.{weight}` stays unconverted but is tied to `{converted[id(param)]}`, which would become "
                    "s·Ŵ: both read one Parameter, so one of them would compute with Ŵ. Convert both or neither "
                    "(adjust `exclude_modules`)."
                )


def _check_scale_names_free(plan: list[tuple[str, nn.Module, type, tuple[str, ...]]]) -> None:
    """Refuse a module that already has an attribute named as a buffer the conversion adds (`<weight>_scale`, and
    `input_scale`, `grad_scale` of a matmul layer; a quantization library's, say): registering it would fail halfway
    through the model or overwrite that attribute."""
    for name, module, unit_class, weight_names in plan:
        added = [weight + SCALE_SUFFIX for weight in weight_names]
        added += ["input_scale", "grad_scale"] if issubclass(unit_class, UnitScaledMatmulMixin) else []
        taken = [attribute for attribute in added if hasattr(module, attribute)]
        if taken:
            raise ValueError(
                f"Cannot unit-scale `{name}` ({type(module).__name__}): it already has `{taken[0]}`, a name the "
                f"conversion gives its scale buffer. Remove that attribute, or leave the module unconverted "
                f"(`exclude_modules=[r'{re.escape(name)}']`). Nothing was converted."
            )


def _check_weights_have_values(model: nn.Module, plan: list[tuple[str, nn.Module, type, tuple[str, ...]]]) -> None:
    """Refuse weights on the meta device (a model built under `init_empty_weights`): s = rms(W) needs W's values,
    and s = 1 with Ŵ = W, filled in later, would leave the model unit-scaled in name only."""
    empty = [f"{name}.{w}" if name else w for name, m, _, weights in plan for w in weights if getattr(m, w).is_meta]
    if empty:
        raise ValueError(
            f"Cannot unit-scale {type(model).__name__}: {len(empty)} weight(s) are on the meta device (e.g. "
            f"`{empty[0]}`; a model built under `init_empty_weights`), and s = rms(W) needs their values. Load the "
            "weights first (`from_pretrained`, or `load_state_dict(state_dict, assign=True)`), or load and convert "
            "in one step with `hf_unitscale.from_pretrained(path)`."
        )


def _check_weights_are_dense(model: nn.Module, plan: list[tuple[str, nn.Module, type, tuple[str, ...]]]) -> None:
    """Refuse quantized weights (an integer or 8-bit float dtype, or a tensor subclass such as torchao's or
    bitsandbytes'): Ŵ = W/s of stored codes would not keep the model's function, and their quantizer reads them."""
    for name, module, _, weight_names in plan:
        for weight_name in weight_names:
            weight = getattr(module, weight_name)
            dense = type(weight) in (torch.Tensor, nn.Parameter)
            if dense and weight.is_floating_point() and weight.element_size() > 1:
                continue
            quantizer = getattr(model, "hf_quantizer", None)
            method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
            loaded_by = (
                f" (loaded with transformers' {getattr(method, 'value', method)} quantizer)" if quantizer else ""
            )
            stored = weight.dtype if dense else type(weight).__name__
            raise ValueError(
                f"Cannot unit-scale {type(model).__name__}{loaded_by}: its weight "
                f"`{f'{name}.{weight_name}' if name else weight_name}` is quantized ({stored}), and unit scaling needs "
                "dense floating-point weights W to measure s = rms(W) and store Ŵ = W/s. Load the unquantized model, "
                "or dequantize it first (`model.dequantize()` where its quantizer supports it); a compressed-tensors "
                "checkpoint loads dequantized and unit-scaled with `hf_unitscale.from_pretrained(path)`. Nothing was "
                "converted."
            )


def _conversion_plan(
    model: nn.Module, config: UnitScaleConfig, *, level: int
) -> list[tuple[str, nn.Module, type, tuple[str, ...]]]:
    """(name, module, unit-scaled class, weight names) for every module to convert; the modules that stay unconverted
    although convertible (their weights read directly, the model's own) are named at logging `level`."""
    excluded, read_directly = _excluded_names(model, config), modules_read_directly(model)
    gains = gain_parameters(model) if config.convert_other_modules else set()
    plan, left = [], []
    for name, module in model.named_modules():
        if isinstance(module, UnitScaledModuleMixin) or name in excluded:
            continue
        if id(module) in read_directly:
            left.append(f"`{name}` ({read_directly[id(module)]})")
            continue
        base = type(module)
        if base in MATMUL_CLASSES:
            plan.append((name, module, MATMUL_CLASSES[base], ("weight",)))
        elif base in EMBEDDING_CLASSES and module.max_norm is None:
            plan.append((name, module, EMBEDDING_CLASSES[base], ("weight",)))
        elif config.convert_other_modules and (weights := _other_weights(module, gains)):
            if not name:  # the model itself: its class, forward signature and other methods must stay its own
                logger.log(
                    level,
                    f"{type(module).__name__}'s own weight(s) {', '.join(f'`{w}`' for w in weights)} stay unconverted: "
                    "the generic path would replace the model's class, which Trainer (forward's signature), "
                    "`config.architectures` and methods other than `forward` that read them rely on.",
                )
                continue
            plan.append((name, module, generic_unit_scaled_class(base), weights))
    if left:
        logger.log(
            level,
            f"{len(left)} module(s) stay unconverted because other code reads their weights directly, where s would "
            f"not be applied: {'; '.join(left)}.",
        )
    _check_ties_stay_inside(model, plan)
    return plan


def check_no_peft_adapters(model: nn.Module) -> None:
    """Refuse a model with PEFT adapter layers (LoRA, …): peft merges ΔW into the stored weight, which holds
    Ŵ = W/s after conversion, so the merged model would compute W + s·ΔW; converting the adapters' own matrices
    would change what peft saves."""
    if "peft" not in sys.modules:  # no adapter layer exists without peft imported
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if adapters:
        raise ValueError(
            f"{type(model).__name__} has PEFT adapter layers (`{adapters[0]}`, {len(adapters)} in all), which "
            "hf_unitscale does not support: peft would merge ΔW into Ŵ = W/s (the merged model computes W + s·ΔW). "
            "Merge them first (`model = model.merge_and_unload()`) and unit-scale the result, or train the adapters "
            "with a plain `Trainer`."
        )


def unit_scale(model: nn.Module, config: UnitScaleConfig | dict | None = None) -> nn.Module:
    """Rewrite every supported weight W of `model` as s·Ŵ, in place, keeping the model's function.

    Args:
        model: a transformers `PreTrainedModel` or any `nn.Module`.
        config: conversion options (a `UnitScaleConfig` or its dict); defaults to `UnitScaleConfig()`. Stored on
            `model.config.unit_scaling` when the model has a transformers config.

    Returns:
        `model`, converted. Ŵ stays trainable under each weight's original name; s, and the
        static operand scales a, c of matmul layers, are fp32 buffers `<weight>_scale`,
        `input_scale` and `grad_scale`.

    Raises:
        TypeError: `model` is not an `nn.Module` (a name or path: load the model first), `config` is neither a
            `UnitScaleConfig` nor a dict, or an option has the wrong type (`convert_other_modules="no"`).
        ValueError: an unknown option; an `exclude_modules` entry that matches no module (the error suggests the
            regex or the closest names), or an exclusion that splits a tied weight (GPT-2's `lm_head` without
            `wte`); a weight that is not finite, quantized or on the meta device (named; every weight is checked
            before any layer changes, so the model is left as it was); nothing in `model` can be converted, it has
            PEFT adapters, or it is already unit-scaled with other options than `config` (named; without `config`,
            converting again only warns).
    """
    return convert_model(model, config, reloading=False)


@torch.no_grad()
def convert_model(model: nn.Module, config: UnitScaleConfig | dict | None, *, reloading: bool) -> nn.Module:
    """`unit_scale`, its checks included. `reloading`: `hf_unitscale.from_pretrained` converts a checkpoint that
    hf_unitscale saved, whose block's a, c it sets next (no warning about the block), and whose modules that stay
    unconverted were named when it was first converted (named again at info level, not on every load)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`unit_scale` converts a loaded model (an nn.Module), got {type(model).__name__} {model!r:.80}; load it "
            "first (`AutoModel.from_pretrained(...)`), or use `hf_unitscale.from_pretrained(path)`, which converts."
        )
    check_no_peft_adapters(model)
    config = as_unit_scale_config(config, "config")
    if is_unit_scaled(model):
        if config is not None:
            check_converted_with(model, config, "config")
        formats = [option for option in _FORMAT_OPTIONS if getattr(config, option, None) is not None]
        precision = f" (its {' and '.join(formats)} too: `set_precision` sets a converted model's)" if formats else ""
        logger.warning(f"{type(model).__name__} is already unit-scaled; `unit_scale` does nothing{precision}.")
        return model
    config = config or UnitScaleConfig()
    if not reloading:
        _warn_about_a_saved_block(model, config)
    return convert_layers(model, config, measure=True, reloading=reloading)


def _warn_about_a_saved_block(model: nn.Module, config: UnitScaleConfig) -> None:
    """A merged checkpoint loaded by plain transformers keeps its `unit_scaling` block: the conversion options, a, c
    and FP8 formats it was saved with. Converting with `config` keeps the model's function (a = c = 1, full
    precision unless `config` sets formats) and replaces the block; the recorded values may not fit these weights
    (trained on since, or a config copied onto others), so they are not applied, and this names those that differ."""
    block = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(block, dict):
        return
    recorded = [f"a, c of {len(block['operand_scales'])} layers"] if block.get("operand_scales") else []
    recorded += [
        f"{option} {block[option]!r} (converting with {getattr(config, option)!r})"
        for option in (*CONVERSION_OPTIONS, *_FORMAT_OPTIONS)
        if option in block and block[option] != getattr(config, option)
    ]
    if recorded:
        logger.warning(
            f"`{type(model).__name__}.config.{CONFIG_KEY}` records {', '.join(recorded)} of a checkpoint saved by "
            "hf_unitscale. `unit_scale` converts with its `config` (a = c = 1) and does not apply them: they may not "
            "fit these weights. To load the checkpoint with them, use `hf_unitscale.from_pretrained(path)`."
        )


def recorded_conversion(block: dict) -> UnitScaleConfig:
    """The conversion options (`CONVERSION_OPTIONS`) a `unit_scaling` block records; one it does not record has its
    default."""
    return UnitScaleConfig.from_dict({k: v for k, v in block.items() if k in CONVERSION_OPTIONS})


def _resolved_power_of_two_scales(value: bool | None, model: nn.Module) -> bool | None:
    """`power_of_two_scales` as conversion applies it to `model`: None means per weight, narrower than fp32
    (`uses_power_of_two_scales`), so it is False when every floating parameter is fp32 or wider, True when every
    one is narrower, and stays None for a model of mixed widths."""
    if value is not None:
        return value
    narrow = {torch.finfo(p.dtype).bits < 32 for p in model.parameters() if p.is_floating_point()}
    return narrow.pop() if len(narrow) == 1 else None


def conversion_differences(recorded: dict, config: UnitScaleConfig, model: nn.Module) -> list[tuple[str, Any, Any]]:
    """(option, value in `recorded`, value in `config`) for every conversion option (`CONVERSION_OPTIONS`) in which a
    `unit_scaling` block `recorded` and `config` differ as conversion applies them to `model`
    (`power_of_two_scales=None` equals False on an fp32 model, True on a bf16 one)."""
    options = recorded_conversion(recorded)

    def applied(option: str, settings: UnitScaleConfig) -> Any:
        value = getattr(settings, option)
        return _resolved_power_of_two_scales(value, model) if option == "power_of_two_scales" else value

    return [
        (option, getattr(options, option), getattr(config, option))
        for option in CONVERSION_OPTIONS
        if applied(option, options) != applied(option, config)
    ]


def check_converted_with(model: nn.Module, config: UnitScaleConfig, argument: str) -> None:
    """Refuse `config` (passed as `argument`) for a model already unit-scaled with other conversion options than its
    `config.unit_scaling` block records (`exclude_modules`, `convert_other_modules`, `power_of_two_scales`): a
    converted model cannot take them, and dropping them silently would train or save another model than the one
    asked for. The GEMM precision is not a conversion option: `set_precision` (or `fp8=True`) sets it on a converted
    model, so its fields are not compared."""
    block = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    fix = f"Undo the conversion first (`merge_unit_scale(model)`) to convert with `{argument}`, or drop `{argument}`."
    if not isinstance(block, dict):
        raise ValueError(
            f"{type(model).__name__} is already unit-scaled and records no conversion options (it has no "
            f"`config.{CONFIG_KEY}`), so `{argument}` can neither be applied nor checked against them. {fix}"
        )
    differing = [
        f"`{option}`: {recorded!r} in the model, {wanted!r} in `{argument}`"
        for option, recorded, wanted in conversion_differences(block, config, model)
    ]
    if differing:
        raise ValueError(
            f"{type(model).__name__} is already unit-scaled with other options than `{argument}` "
            f"({'; '.join(differing)}), which a converted model cannot take. {fix}"
        )


def _weight_values(plan: list[tuple[str, nn.Module, type, tuple[str, ...]]]) -> int:
    """How many weight values `plan` converts (a tied weight once)."""
    weights = {id(w): w for _, module, _, names in plan for w in (getattr(module, n) for n in names)}
    return sum(weight.numel() for weight in weights.values())


def _measured_scales(
    plan: list[tuple[str, nn.Module, type, tuple[str, ...]]], config: UnitScaleConfig, values: int
) -> dict[int, torch.Tensor]:
    """{id(W): s} for every weight of `plan` (a tied one once), measured without changing any: an error (a
    non-finite W) leaves the model as it was. A progress bar for ≥ `progress.MIN_VALUES` weight `values`."""
    scales: dict[int, torch.Tensor] = {}
    rounded_by_dtype = 0  # weights whose 16-bit dtype made `power_of_two_scales=None` round s
    for name, module, _, weight_names in progress(
        plan, total=len(plan), values=values, desc="Measuring weight scales", unit="module"
    ):
        for weight_name in weight_names:
            param = getattr(module, weight_name)
            if id(param) in scales:
                continue
            power_of_two = uses_power_of_two_scales(param, config)
            rounded_by_dtype += power_of_two and config.power_of_two_scales is None
            scales[id(param)] = measure_weight_scale(
                param, f"{name}.{weight_name}" if name else weight_name, power_of_two
            )
    if rounded_by_dtype:
        logger.info(
            f"{rounded_by_dtype} weights are stored in 16-bit floats: their scales s are powers of two, so "
            "Ŵ = W/s and the merged W = s·Ŵ are exact (`UnitScaleConfig.power_of_two_scales`)."
        )
    return scales


@torch.no_grad()
def convert_layers(model: nn.Module, config: UnitScaleConfig, *, measure: bool, reloading: bool) -> nn.Module:
    """Swap the layers of `model`; with `measure=False` (loading a unit-scaled checkpoint) leave the
    weights alone and set s = 1, to be overwritten by the checkpoint's Ŵ and s. `reloading` (a checkpoint
    hf_unitscale saved): the modules that stay unconverted are named at info level, not as a warning."""
    plan = _conversion_plan(model, config, level=logging.INFO if reloading else logging.WARNING)
    if not plan:
        raise ValueError(
            f"Found nothing to unit-scale in {type(model).__name__}: no nn.Linear, Conv1D or nn.Embedding, and no "
            "other module with ≥2-D weights (or all were excluded by `exclude_modules` / `convert_other_modules`)."
        )
    if measure:
        _check_weights_have_values(model, plan)
        _check_weights_are_dense(model, plan)
    _check_scale_names_free(plan)  # after: a quantized layer's own `weight_scale` is named as quantization
    matmul_names = [name for name, _, unit_class, _ in plan if issubclass(unit_class, UnitScaledMatmulMixin)]
    if config.precision is not None and config.full_precision_modules:
        from .precision import full_precision_names  # precision imports this module

        # check before any layer is swapped, so a bad pattern leaves the model as it was
        full_precision_names(config.full_precision_modules, matmul_names, type(model).__name__)
    # every s before any Ŵ = W/s: a weight that cannot be unit-scaled raises with the model as it was
    values = _weight_values(plan) if measure else 0  # swapping alone (a checkpoint's Ŵ, s follow) is quick
    scale_of_param = _measured_scales(plan, config, values) if measure else {}
    divided: set[int] = set()
    desc = f"Unit-scaling {type(model).__name__}"
    for _, module, unit_class, weight_names in progress(plan, total=len(plan), values=values, desc=desc, unit="module"):
        for weight_name in weight_names:
            param = getattr(module, weight_name)
            if measure and id(param) not in divided:  # a tied weight is divided once
                param.copy_(apply_scale(param, scale_of_param[id(param)].to(param.device), divide=True))
                divided.add(id(param))
            scale = scale_of_param.get(id(param), torch.ones((), dtype=torch.float32))
            scale = scale.to(param.device if param.device.type != "meta" else "cpu")
            module.register_buffer(weight_name + SCALE_SUFFIX, scale.clone())
        module.__class__ = unit_class
        if isinstance(module, UnitScaledMatmulMixin):
            device = module.weight.device if module.weight.device.type != "meta" else "cpu"
            module.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            module.register_buffer("grad_scale", torch.ones((), dtype=torch.float32, device=device))
        elif unit_class.unit_scaled_weights != weight_names:
            module.unit_scaled_weights = weight_names
    if config.precision is not None and matmul_names:
        from .precision import apply_precision  # precision imports this module

        apply_precision(model, config)
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        setattr(model.config, CONFIG_KEY, config.to_dict())
    from .hub import attach_checkpoint_methods  # hub imports this module

    # the model and any transformers model inside it (its base model, `model.bert`): each one's own save would
    # write Ŵ as W, and its own resize would copy Ŵ into a plain embedding
    for pretrained in (m for m in model.modules() if isinstance(m, PreTrainedModel)):
        attach_checkpoint_methods(pretrained)
        pretrained.resize_token_embeddings = MethodType(resize_token_embeddings, pretrained)
    logger.info(f"Unit-scaled {len(plan)} modules of {type(model).__name__}.")
    return model


def _check_merged_weights_finite(converted: dict[str, nn.Module]) -> None:
    """Refuse, naming the weight, a merge whose W = s·Ŵ would not be finite, before anything is merged."""
    for name, module in converted.items():
        for weight_name in module.unit_scaled_weights:
            param, scale = getattr(module, weight_name), module.scale_of(weight_name)
            if torch.isfinite(apply_scale(param, scale.to(param.device))).all():
                continue
            if torch.isfinite(param).all() and torch.isfinite(scale).all():
                problem = (
                    f"s·Ŵ overflows {param.dtype} (s = {float(scale):g}, max |Ŵ| = {float(param.abs().max()):g}); "
                    "cast the model to float32 (`model.float()`) before merging"
                )
            else:  # a diverged training step, or a corrupt checkpoint
                problem = (
                    "Ŵ has nan/inf values" if not torch.isfinite(param).all() else f"its scale s is {float(scale)}"
                ) + "; reload the weight from a good checkpoint before merging"
            raise ValueError(f"Cannot merge `{name}.{weight_name}`: {problem}. Nothing was merged.")


@torch.no_grad()
def merge_unit_scale(model: nn.Module) -> nn.Module:
    """Undo `unit_scale` in place: W = s·Ŵ, original module classes, scale buffers removed.

    Args:
        model: a model converted by `unit_scale`; an unconverted one is returned unchanged, with a warning.

    Returns:
        `model` itself, a plain transformers model again: its `unit_scaling` config block (formats, a, c, the
        calibration record) is removed, and transformers' own `save_pretrained`, `push_to_hub` and
        `resize_token_embeddings` replace the ones `unit_scale` attached.

    Raises:
        ValueError: some s·Ŵ would not be finite: Ŵ or s is nan/inf, or the product overflows the weight's dtype
            (the error names the weight). Every weight is checked before any is changed: the model stays as it was.
    """
    converted = unit_scaled_modules(model)
    if not converted:
        logger.warning(f"{type(model).__name__} is not unit-scaled; `merge_unit_scale` does nothing.")
        return model
    _check_merged_weights_finite(converted)
    merged: set[int] = set()
    for module in converted.values():
        for weight_name in module.unit_scaled_weights:
            param = getattr(module, weight_name)
            scale = module.scale_of(weight_name)
            if id(param) not in merged:
                param.copy_(apply_scale(param, scale.to(param.device)))  # as `merged_state_dict` writes it
                merged.add(id(param))
            delattr(module, weight_name + SCALE_SUFFIX)
        for buffer in ("input_scale", "grad_scale"):
            if buffer in module._buffers:
                delattr(module, buffer)
        for attribute in ("precision", "cast_counters", "unit_scaled_weights"):
            module.__dict__.pop(attribute, None)
        module.__class__ = module.base_class
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    from .hub import detach_checkpoint_methods  # hub imports this module

    for pretrained in (m for m in model.modules() if isinstance(m, PreTrainedModel)):
        detach_checkpoint_methods(pretrained)
        pretrained.__dict__.pop("resize_token_embeddings", None)
    return model
