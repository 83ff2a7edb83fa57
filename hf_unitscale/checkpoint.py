"""The three checkpoint formats of a unit-scaled model, as state dicts and files.

- `merged`: a plain transformers checkpoint, W = s·Ŵ under the original names and nothing else,
  in `model.safetensors`. Any transformers install loads it and computes the same function. The
  `unit_scaling` block of `config.json` keeps the conversion options and the calibrated operand
  scales (a, c per layer), so `hf_unitscale.from_pretrained` restores them; s is re-measured,
  s = rms(W).
- `unit-scaled`: Ŵ under the original names (fp32, bf16 or E4M3: Ŵ has unit RMS, so FP8 with no
  further scale keeps it), every `<weight>_scale` s, `input_scale` a and `grad_scale` c, in
  `unit_scaled_model.safetensors` (or shards of it with an index, past `max_shard_size`). There is
  deliberately no `model.safetensors`: plain transformers fails loudly ("no file named
  model.safetensors") instead of loading Ŵ as W.
  It keeps training state exact (Trainer checkpoints use it) and stores Ŵ compactly. Tensors that
  are not converted (norm gains, biases) are stored as they are: they are a tiny part of the file.
- `compressed-tensors`: the per-tensor FP8 "float-quantized" format of the `compressed-tensors`
  package (read by transformers' compressed-tensors quantizer and by serving engines): each
  converted `nn.Linear` stores `weight` = e4m3(Ŵ) and `weight_scale` = s, since the format
  dequantizes as W = weight·weight_scale; every other tensor is stored merged (W = s·Ŵ). Linear
  layers whose weight is tied to another module (an lm head tied to the embedding) and
  transformers' `Conv1D` (not an `nn.Linear`) stay dense.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file, logging
from transformers.utils.hub import get_checkpoint_shard_files

from .config import CONFIG_KEY
from .convert import matmul_layers, unit_scaled_modules
from .formats import all_finite, cast_to_format, get_format
from .gains import gain_parameters
from .modules import SCALE_SUFFIX, UnitScaledMatmulMixin, UnitScaledModuleMixin
from .ops import apply_scale
from .progress import progress

__all__ = [
    "CHECKPOINT_FORMATS",
    "DEFAULT_MAX_SHARD_SIZE",
    "EMBEDDING_DTYPES",
    "UNIT_SCALED_INDEX_NAME",
    "UNIT_SCALED_WEIGHTS_NAME",
    "WEIGHT_DTYPES",
    "check_state_dict_keys",
    "check_storage_dtypes",
    "compressed_tensors_checkpoint",
    "decode_stored_weights",
    "has_unit_scaled_weights",
    "load_checkpoint_into",
    "load_unit_scaled_state_dict",
    "merged_state_dict",
    "operand_scales",
    "read_checkpoint_format",
    "read_config_block",
    "read_embedding_dtype",
    "read_operand_scales",
    "read_unit_scaled_weights",
    "read_weight_dtype",
    "set_operand_scales",
    "stored_gain_names",
    "unit_scaled_state_dict",
    "with_tied_names",
    "write_unit_scaled_weights",
]

logger = logging.get_logger(__name__)

UNIT_SCALED_WEIGHTS_NAME = "unit_scaled_model.safetensors"
UNIT_SCALED_INDEX_NAME = "unit_scaled_model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' default for save_pretrained
CHECKPOINT_FORMATS = ("merged", "unit-scaled", "compressed-tensors")
# storage dtype of Ŵ in the unit-scaled format
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
# storage of embedding tables: the same, or int8 rows with an fp32 scale per row (`<weight>_row_scale`)
EMBEDDING_DTYPES = {**WEIGHT_DTYPES, "int8": torch.int8}
ROW_SCALE_SUFFIX = "_row_scale"
E4M3_MAX = get_format("e4m3").max


def _module_names(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """Every state-dict name of each `kind` module: a module under several names (T5's one embedding as `shared`
    and both stacks' `embed_tokens` after a resize) has its tensors under each of them."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, kind)]


def _converted_weight_names(model: nn.Module) -> dict[str, str]:
    """{state-dict name of each converted weight Ŵ: name of its scale s}."""
    return {
        f"{name}.{weight}" if name else weight: f"{name}.{weight}{SCALE_SUFFIX}" if name else weight + SCALE_SUFFIX
        for name, module in _module_names(model, UnitScaledModuleMixin)
        for weight in module.unit_scaled_weights
    }


def _operand_scale_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.{buffer}"
        for name, _ in _module_names(model, UnitScaledMatmulMixin)
        for buffer in ("input_scale", "grad_scale")
    ]


# what wraps a model and prefixes its state dict's keys: torch.compile, DistributedDataParallel / DataParallel
_WRAPPER_PREFIXES = {"_orig_mod.": "a torch.compile'd model", "module.": "a DDP / DataParallel-wrapped model"}


def with_tied_names(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with each tied tensor of `model` (`_tied_aliases`: a tied weight, its scale buffers) under all its
    names, as `model.state_dict()` holds it, where it gives the tensor under any one of them (transformers'
    de-duplicated state dicts keep one name of a tied weight, not always the first)."""
    state_dict = dict(state_dict)
    aliases = _tied_aliases(model)
    for alias, first in aliases.items():  # first names first: a tied group may have several aliases
        if first not in state_dict and alias in state_dict:
            state_dict[first] = state_dict[alias]
    for alias, first in aliases.items():
        if first in state_dict:
            state_dict.setdefault(alias, state_dict[first])
    return state_dict


def check_state_dict_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a `state_dict` to save for `model` whose keys are not the model's own (pass it through
    `with_tied_names` first, so a tied tensor may be given under any one of its names): the checkpoint would lack
    tensors, or hold ones no loader reads. Names missing and unexpected keys, and a wrapper's key prefix to strip."""
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not (missing or unexpected):
        return
    for prefix, wrapper in _WRAPPER_PREFIXES.items():
        if unexpected and all(k.startswith(prefix) and k.removeprefix(prefix) in expected for k in unexpected):
            raise ValueError(
                f"`state_dict`'s keys start with `{prefix}` (e.g. {unexpected[0]!r}), as {wrapper}'s do, so they are "
                f"not {type(model).__name__}'s: pass the unwrapped model's state dict, or "
                f"`{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}`. Nothing was written."
            )
    raise ValueError(
        f"`state_dict` does not match {type(model).__name__}'s: missing {len(missing)} key(s) {missing[:5]}, "
        f"unexpected {len(unexpected)} {unexpected[:5]}. Pass the model's full state dict. Nothing was written."
    )


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain state dict W = s·Ŵ of a converted model (or of `state_dict`, e.g. gathered from FSDP).

    Tied weights (one storage under two names) stay one tensor, so transformers de-duplicates them.
    """
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    merged_by_storage: dict[tuple, torch.Tensor] = {}
    for weight_name, scale_name in _converted_weight_names(model).items():
        scale = state_dict.pop(scale_name)
        if weight_name not in state_dict:
            continue
        weight = state_dict[weight_name]
        key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape))
        if key not in merged_by_storage:
            merged_by_storage[key] = apply_scale(weight, scale)
        state_dict[weight_name] = merged_by_storage[key]
    for name in _operand_scale_names(model):
        state_dict.pop(name, None)
    return state_dict


def check_storage_dtypes(weight_dtype: str | None, embedding_dtype: str | None) -> None:
    """Refuse a `weight_dtype` or `embedding_dtype` the unit-scaled format cannot store, naming the choices."""
    for option, value in (("weight_dtype", weight_dtype), ("embedding_dtype", embedding_dtype)):
        allowed = WEIGHT_DTYPES if option == "weight_dtype" else EMBEDDING_DTYPES
        if value is not None and value not in allowed:
            raise ValueError(f"`{option}` must be one of {sorted(allowed)}, got {value!r}.")


def unit_scaled_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    weight_dtype: str = "float32",
    embedding_dtype: str | None = None,
) -> dict[str, torch.Tensor]:
    """Ŵ (stored as `weight_dtype`; embedding tables as `embedding_dtype`, default the same), s, a, c and every
    other tensor as it is; each shared (tied) tensor saved once.

    `embedding_dtype="int8"` stores each row r of an embedding table as int8 q_r with an fp32 row scale
    k_r = max|Ŵ_r| / 127 (tensor `<weight>_row_scale`), Ŵ_r ≈ k_r·q_r. Why not E4M3 there: with 3 mantissa
    bits E4M3 has ~3.6% RMS relative error whatever the scale, int8 over a row's range has ~1% for
    Gaussian-like rows, at the same byte; a tied embedding is also the readout, where that error reaches the
    logits (SmolLM2-135M on Austen: eval loss +0.82% all-E4M3, +0.32% with int8 embedding rows).
    """
    check_storage_dtypes(weight_dtype, embedding_dtype)
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    converted = _converted_weight_names(model)
    embeddings = _embedding_weight_names(model)
    # a state dict gathered from FSDP2 holds a tied weight twice, as two tensors: skip aliases by name too
    aliases = _parameter_aliases(model)
    seen: set[tuple] = set()
    out = {}
    clipped: list[str] = []
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen or name in aliases:
            if tensor.numel() != 1:
                continue  # the alias of a tied tensor: restored by tying on load
            # a scale that `tie_weights` made one tensor under two modules (transformers 5 ties every key its tied
            # weight's name prefixes, so `decoder.weight_scale` too): stored under each name, as the loader reads it
            tensor = tensor.clone()
        seen.add(key)
        dtype = (embedding_dtype or weight_dtype) if name in embeddings else weight_dtype
        if name in converted and dtype == "int8":
            tensor, out[name + ROW_SCALE_SUFFIX] = _int8_rows(tensor)
        elif name in converted and dtype == "e4m3":
            peak = float(tensor.detach().abs().max())
            if peak > E4M3_MAX:
                clipped.append(f"{name} (max |Ŵ| {peak:.4g})")
            tensor = cast_to_format(tensor.float(), get_format("e4m3"))
        elif name in converted:
            tensor = tensor.to(WEIGHT_DTYPES[dtype])
        out[name] = tensor.detach().contiguous()
    if clipped:
        logger.warning(
            f"E4M3 storage saturates at ±{E4M3_MAX:g}: the entries of {len(clipped)} tensor(s) beyond it are stored "
            f"as ±{E4M3_MAX:g}, which changes the model: {', '.join(clipped[:8])}. Store them in bfloat16 "
            "(`weight_dtype='bfloat16'`), or use the compressed-tensors format, whose scale adapts per tensor."
        )
    return out


def _embedding_weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in unit_scaled_modules(model).items() if isinstance(m, nn.Embedding)}


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 row scales k) with Ŵ ≈ k·q, k = max|row| / 127 (1 for an all-zero row)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def decode_stored_weights(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Undo `embedding_dtype="int8"`: every `<weight>` with a `<weight>_row_scale` becomes k·q in fp32."""
    state_dict = dict(state_dict)
    for row_name in [k for k in state_dict if k.endswith(ROW_SCALE_SUFFIX)]:
        name = row_name[: -len(ROW_SCALE_SUFFIX)]
        row_scale = state_dict.pop(row_name)
        if name not in state_dict:
            raise ValueError(f"{source}: row scales `{row_name}` have no weight `{name}`; the file is corrupt.")
        weight = state_dict[name]
        if weight.dtype != torch.int8 or row_scale.shape != (weight.shape[0], 1):
            raise ValueError(
                f"{source}: `{name}` ({weight.dtype}, {tuple(weight.shape)}) does not match its row scales "
                f"`{row_name}` {tuple(row_scale.shape)}; the file is corrupt."
            )
        if not (torch.isfinite(row_scale).all() and (row_scale > 0).all()):
            raise ValueError(f"{source}: row scales `{row_name}` are not all positive finite numbers.")
        state_dict[name] = weight.float() * row_scale.float()
    return state_dict


def compressed_tensors_checkpoint(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, `quantization_config`) of the compressed-tensors per-tensor FP8 export.

    The format dequantizes W = weight·weight_scale, which for a unit-scaled layer is e4m3(Ŵ)·s: Ŵ
    has unit RMS, so its largest entries (a few units) sit far below E4M3's 448 and the cast only
    rounds; a tensor whose peak passes 448 is stored as e4m3(Ŵ/h) with scale s·h, h = max|Ŵ|/448.
    Every `nn.Linear` that is not quantized (excluded, or tied to another module) is listed in
    `ignore`, so the loader expects no scale for it.
    """
    source = dict(model.state_dict() if state_dict is None else state_dict)
    tensors = merged_state_dict(model, source)
    aliases = _tied_aliases(model)
    tied = set(aliases) | set(aliases.values())
    converted = unit_scaled_modules(model)
    ignore = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight_name = f"{name}.weight" if name else "weight"
        if name not in converted or weight_name in tied:
            ignore.append(name)
            continue
        weight = source[weight_name].float()
        # Ŵ's entries beyond E4M3's max (a few units at unit RMS, so rarely) move into the stored scale
        headroom = max(1.0, float(weight.abs().max()) / E4M3_MAX)
        tensors[weight_name] = cast_to_format(weight / headroom, get_format("e4m3"))
        tensors[weight_name + SCALE_SUFFIX] = source[weight_name + SCALE_SUFFIX].float().reshape(1) * headroom
    for alias in aliases:
        tensors.pop(alias, None)  # tied: restored by tying on load, stored once
    quantization_config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return {k: v.detach().contiguous() for k, v in tensors.items()}, quantization_config


def operand_scales(model: nn.Module) -> dict[str, list[float]]:
    """{layer: [a, c]} for every converted matmul layer whose static scales are not both 1."""
    return {
        name: [float(module.input_scale), float(module.grad_scale)]
        for name, module in matmul_layers(model).items()
        if (float(module.input_scale), float(module.grad_scale)) != (1, 1)
    }


def _disagreement(converted_by: str | None, saved: str) -> str:
    """Who is to blame when a checkpoint's tensors or scales do not fit the converted model: the block of
    config.json that converted it (`saved` names what it disagrees with), or the caller's options `converted_by`."""
    if converted_by is None:
        return f"The `{CONFIG_KEY}` block of config.json disagrees with {saved}."
    return (
        f"The model was converted with {converted_by}, whose options differ from those the checkpoint was saved "
        f"with (its config.json's `{CONFIG_KEY}` block): load it without {converted_by} to convert it as saved."
    )


@torch.no_grad()
def set_operand_scales(model: nn.Module, scales: dict[str, list[float]], *, converted_by: str | None = None) -> None:
    """Set a, c from `operand_scales` output; an unknown layer name is an error, blaming `converted_by` (the
    options the model was converted with, e.g. "`unit_scale_config`") or else the checkpoint's block."""
    modules = unit_scaled_modules(model)
    for name, (input_scale, grad_scale) in scales.items():
        module = modules.get(name)
        if not isinstance(module, UnitScaledMatmulMixin):
            raise ValueError(
                f"The checkpoint's `{CONFIG_KEY}.operand_scales` names layer `{name}`, which is not a unit-scaled "
                f"matmul layer of this model. {_disagreement(converted_by, 'the model')}"
            )
        module.input_scale.fill_(input_scale)
        module.grad_scale.fill_(grad_scale)


@torch.no_grad()
def load_unit_scaled_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str = "checkpoint",
    weight_dtype: str | None = None,
    embedding_dtype: str | None = None,
    converted_by: str | None = None,
) -> None:
    """Copy a unit-scaled state dict into a converted model, refusing anything that would change its function.

    Errors name the tensor: a missing scale, a scale s, a or c that is not a positive finite number, a missing or
    unexpected tensor (the conversion options, `converted_by`'s or else the config's, disagree with the weights),
    a shape mismatch, a non-finite value (a corrupt file), a Ŵ stored in another dtype than the config's
    `weight_dtype`, unequal scales of a tied weight. A gain stored as Ŵ and s (by hf_unitscale before gains
    stayed unconverted) loads as W = s·Ŵ.
    """
    int8_rows = {k[: -len(ROW_SCALE_SUFFIX)] for k in state_dict if k.endswith(ROW_SCALE_SUFFIX)}
    state_dict = _merge_stored_gains(model, decode_stored_weights(state_dict, source), source)
    expected = model.state_dict()
    converted = _converted_weight_names(model)
    scale_names = {*converted.values(), *_operand_scale_names(model)}  # s, a, c: each a positive finite number
    embeddings = _embedding_weight_names(model)
    aliases = _tied_aliases(model)
    missing = [k for k in expected if k not in state_dict and k not in aliases]
    unexpected = [k for k in state_dict if k not in expected]
    missing_scales = [k for k in missing if k in converted.values()]
    if missing_scales:
        raise ValueError(
            f"{source} is missing the scale(s) {missing_scales[:5]} of unit-scaled weights: without s the weights "
            "Ŵ cannot be turned back into W. The file is truncated or was not written by hf_unitscale."
        )
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model built from its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. {_disagreement(converted_by, 'the saved weights')}"
        )
    loaded = {}
    values = sum(tensor.numel() for tensor in state_dict.values())
    for name, tensor in progress(
        state_dict.items(), total=len(state_dict), values=values, desc="Loading unit-scaled weights", unit="tensor"
    ):
        target = expected[name]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{source}: `{name}` has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}. "
                "For a new head size (`num_labels=…`), pass `ignore_mismatched_sizes=True` to initialize it anew, as "
                "in transformers."
            )
        if name in scale_names and not (torch.isfinite(tensor).all() and tensor > 0):
            raise ValueError(f"{source}: scale `{name}` = {tensor.item()} is not a positive finite number.")
        stored = "int8" if name in int8_rows else _dtype_name(tensor.dtype)
        option, wanted = ("weight_dtype", weight_dtype)
        if name in embeddings and embedding_dtype is not None:
            option, wanted = ("embedding_dtype", embedding_dtype)
        if wanted is not None and name in converted and stored != wanted:
            raise ValueError(
                f"{source}: `{name}` is stored as {stored}, but the `{CONFIG_KEY}` block of config.json says "
                f"{option}={wanted!r}: the config disagrees with the weights."
            )
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"{source}: `{name}` has non-finite values (nan/inf); the file is corrupt.")
        loaded[name] = tensor.to(target.dtype)
    model.load_state_dict(loaded, strict=False)
    for alias, source_name in aliases.items():
        if alias in converted.values() and not torch.equal(expected[alias], expected[source_name]):
            raise ValueError(f"{source}: tied scales `{alias}` and `{source_name}` differ.")


def _merge_stored_gains(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state_dict` with W = s·Ŵ for each gain (`gains.is_gain`) stored as Ŵ and `<name>_scale` s, which the model
    holds unconverted: earlier versions of hf_unitscale converted the gains of ≥2 dimensions that the generic path
    met (SwiftFormer's layer scales (c, 1, 1), ConvNeXt V2's GRN γ (1, 1, 1, c), weight_norm's g). W is computed in
    fp32 and rounded once, to the model's dtype."""
    gains = gain_parameters(model)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    gain_names = {name for name, param in parameters.items() if id(param) in gains}
    stored = sorted(name for name in gain_names if name in state_dict and name + SCALE_SUFFIX in state_dict)
    if not stored:
        return state_dict
    state_dict = dict(state_dict)
    for name in stored:
        scale = state_dict.pop(name + SCALE_SUFFIX)
        if not (scale.numel() == 1 and torch.isfinite(scale).all() and scale > 0):
            raise ValueError(
                f"{source}: scale `{name}{SCALE_SUFFIX}` = {scale.tolist()} is not a positive finite number."
            )
        state_dict[name] = apply_scale(state_dict[name].to(parameters[name].dtype), scale.float())
    logger.info(
        f"{source} stores {len(stored)} gain(s) as Ŵ and s (`{stored[0]}`, …), as hf_unitscale did before gains "
        "stayed unconverted: loaded as W = s·Ŵ."
    )
    return state_dict


def stored_gain_names(model: nn.Module, checkpoint_dir: str | os.PathLike) -> list[str]:
    """The gains of `model` that a local unit-scaled checkpoint folder stores as Ŵ and `<name>_scale` (written
    before gains stayed unconverted, see `_merge_stored_gains`), read from the files' key lists only."""
    if not has_unit_scaled_weights(checkpoint_dir):
        return []
    keys = set()
    for path in unit_scaled_weight_files(checkpoint_dir):
        with safe_open(path, framework="pt") as f:
            keys.update(f.keys())
    gains = gain_parameters(model)
    names = (name for name, param in model.named_parameters(remove_duplicate=False) if id(param) in gains)
    return sorted(name for name in names if name + SCALE_SUFFIX in keys)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in EMBEDDING_DTYPES.items() if d == dtype), str(dtype))


def _parameter_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters reachable under several names (tied weights)."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return aliases


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """`_parameter_aliases`, plus the scale buffers of tied converted weights (equal copies, one per module)."""
    aliases = _parameter_aliases(model)
    converted = _converted_weight_names(model)
    for alias, source in list(aliases.items()):
        if alias in converted and source in converted:
            aliases[converted[alias]] = converted[source]
    return aliases


def read_config_block(config_dict: dict) -> dict[str, Any] | None:
    """config.json's `unit_scaling` block (None for a plain checkpoint): a dict, as `UnitScaleConfig.to_dict()` and
    the checkpoint keys `save_pretrained` adds make it."""
    block = config_dict.get(CONFIG_KEY)
    if block is not None and not isinstance(block, dict):
        raise ValueError(
            f"config.json's `{CONFIG_KEY}` must be a dict of hf_unitscale's options (as `save_pretrained` writes it), "
            f"got {type(block).__name__} {block!r:.80}. The file is corrupt or was edited: re-save the checkpoint, "
            f"or delete the key to load it as a plain checkpoint."
        )
    return block


def read_checkpoint_format(config_dict: dict) -> str | None:
    """`merged`, `unit-scaled`, `compressed-tensors` (one of `CHECKPOINT_FORMATS`), or None for a plain checkpoint
    with no `unit_scaling` block."""
    block = read_config_block(config_dict)
    if block is None:
        return None
    fmt = block.get("checkpoint_format", "merged")
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"`{CONFIG_KEY}.checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {fmt!r}.")
    return fmt


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """load_file with an error that names the file when it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Could not read weights file {path}: {err}. It is corrupt or truncated; re-download or re-save it."
        ) from err


def read_weight_dtype(config_dict: dict) -> str | None:
    """The `weight_dtype` of a unit-scaled checkpoint's config block, validated."""
    return _read_block_dtype(config_dict, "weight_dtype", WEIGHT_DTYPES)


def read_embedding_dtype(config_dict: dict) -> str | None:
    """The `embedding_dtype` of a unit-scaled checkpoint's config block (None: as `weight_dtype`), validated."""
    return _read_block_dtype(config_dict, "embedding_dtype", EMBEDDING_DTYPES)


def read_operand_scales(config_dict: dict) -> dict[str, list[float]]:
    """The `operand_scales` {layer: [a, c]} of a checkpoint's config block, validated: each a, c a positive finite
    number, as the unit-scaled format's `input_scale`, `grad_scale` are (a = 0 makes the FP8 forward nan)."""
    scales = (read_config_block(config_dict) or {}).get("operand_scales") or {}
    where = f"config.json's `{CONFIG_KEY}.operand_scales`"
    if not isinstance(scales, dict):
        raise ValueError(f"{where} must map each layer name to [a, c], got {type(scales).__name__} {scales!r:.80}.")
    for name, value in scales.items():
        pair = value if isinstance(value, list | tuple) and len(value) == 2 else None
        if pair is None or not all(_is_positive_number(v) for v in pair):
            raise ValueError(
                f"{where} holds {value!r} for layer `{name}`: each entry is [a, c], the layer's input and gradient "
                "scales, two positive finite numbers. The file is corrupt or was edited; re-save the checkpoint."
            )
    return scales


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_block_dtype(config_dict: dict, key: str, allowed: dict) -> str | None:
    value = (read_config_block(config_dict) or {}).get(key)
    if value is not None and value not in allowed:
        raise ValueError(f"`{CONFIG_KEY}.{key}` must be one of {sorted(allowed)}, got {value!r}.")
    return value


def write_unit_scaled_weights(
    state_dict: dict[str, torch.Tensor],
    save_directory: str | os.PathLike,
    checkpoint_format: str = "unit-scaled",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """`unit_scaled_model.safetensors` (`model.safetensors` for compressed-tensors), or, when the tensors exceed
    `max_shard_size`, shards `…-0000k-of-0000n.safetensors` and an `….safetensors.index.json` mapping each
    tensor to its shard, as transformers shards a checkpoint. Returns the files written."""
    stem = "model" if checkpoint_format == "compressed-tensors" else "unit_scaled_model"
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    folder = Path(save_directory)
    written = []
    for filename, names in split.filename_to_tensors.items():
        path = folder / filename
        save_file(
            {name: state_dict[name] for name in names},
            str(path),
            metadata={"format": "pt", "hf_unitscale": checkpoint_format},
        )
        written.append(path)
    if split.is_sharded:
        index = {
            "metadata": {**split.metadata, "hf_unitscale": checkpoint_format},
            "weight_map": split.tensor_to_filename,
        }
        path = folder / f"{stem}.safetensors.index.json"
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def unit_scaled_weight_files(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> list[str]:
    """Local paths of a unit-scaled checkpoint's weights in a folder or Hub repo: `unit_scaled_model.safetensors`,
    or every shard its index names (downloaded and cached for a repo). `hub_kwargs` as for `cached_file`."""
    where = str(pretrained_model_name_or_path)
    single = cached_file(where, UNIT_SCALED_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if single is not None:
        return [single]
    index = cached_file(where, UNIT_SCALED_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is None:
        raise ValueError(
            f"{where} holds neither {UNIT_SCALED_WEIGHTS_NAME} nor {UNIT_SCALED_INDEX_NAME}: it is not a unit-scaled "
            "checkpoint (merged checkpoints load with `hf_unitscale.from_pretrained`, which re-measures the scales)."
        )
    try:
        shards, _ = get_checkpoint_shard_files(where, index, **hub_kwargs)
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"Could not read the shard index {index}: {err!r}. Re-download or re-save it.") from err
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise ValueError(f"{index} names shard(s) that are missing: {missing[:3]}. Re-download or re-save it.")
    return shards


def read_unit_scaled_weights(
    pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Every tensor of a unit-scaled checkpoint (one file or its shards), as one state dict."""
    state_dict = {}
    for path in unit_scaled_weight_files(pretrained_model_name_or_path, **hub_kwargs):
        state_dict.update(read_safetensors(path))
    return state_dict


def load_checkpoint_into(model: nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load a unit-scaled checkpoint folder (one weights file or shards) into an already converted model, in place,
    with the record of how its a, c were calibrated (`unit_scaling.calibration`: the saved config and model card
    describe it)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = (
        json.loads((checkpoint_dir / "config.json").read_text()) if (checkpoint_dir / "config.json").exists() else {}
    )
    load_unit_scaled_state_dict(
        model,
        read_unit_scaled_weights(checkpoint_dir),
        source=str(checkpoint_dir),
        weight_dtype=read_weight_dtype(config),
        embedding_dtype=read_embedding_dtype(config),
    )
    block = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(block, dict) and "calibration" in config.get(CONFIG_KEY, {}):
        block["calibration"] = config[CONFIG_KEY]["calibration"]


def has_unit_scaled_weights(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether a local folder holds a unit-scaled checkpoint's weights (one file or a shard index)."""
    return any(
        os.path.isfile(os.path.join(checkpoint_dir, name))
        for name in (UNIT_SCALED_WEIGHTS_NAME, UNIT_SCALED_INDEX_NAME)
    )
