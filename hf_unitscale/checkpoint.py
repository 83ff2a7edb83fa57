"""The two checkpoint formats of a unit-scaled model, as state dicts and files.

- `merged`: a plain transformers checkpoint, W = s·Ŵ under the original names and nothing else,
  in `model.safetensors`. Any transformers install loads it and computes the same function. The
  `unit_scaling` block of `config.json` keeps the conversion options and the calibrated operand
  scales (a, c per layer), so `hf_unitscale.from_pretrained` restores them; s is re-measured,
  s = rms(W).
- `unit-scaled`: Ŵ under the original names (fp32, bf16 or E4M3: Ŵ has unit RMS, so FP8 with no
  further scale keeps it), every `<weight>_scale` s, `input_scale` a and `grad_scale` c, in
  `unit_scaled_model.safetensors`. There is deliberately no `model.safetensors`: plain
  transformers fails loudly ("no file named model.safetensors") instead of loading Ŵ as W.
  It keeps training state exact (Trainer checkpoints use it) and stores Ŵ compactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_KEY
from .convert import unit_scaled_modules
from .formats import cast_to_format, get_format
from .modules import SCALE_SUFFIX, UnitScaledMatmulMixin

__all__ = [
    "CHECKPOINT_FORMATS",
    "UNIT_SCALED_WEIGHTS_NAME",
    "WEIGHT_DTYPES",
    "load_checkpoint_into",
    "load_unit_scaled_state_dict",
    "merged_state_dict",
    "operand_scales",
    "read_checkpoint_format",
    "set_operand_scales",
    "unit_scaled_state_dict",
]

UNIT_SCALED_WEIGHTS_NAME = "unit_scaled_model.safetensors"
MERGED_WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_FORMATS = ("merged", "unit-scaled")
# storage dtype of Ŵ in the unit-scaled format
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}


def _converted_weight_names(model: nn.Module) -> dict[str, str]:
    """{state-dict name of each converted weight Ŵ: name of its scale s}."""
    return {
        f"{name}.{weight}" if name else weight: f"{name}.{weight}{SCALE_SUFFIX}" if name else weight + SCALE_SUFFIX
        for name, module in unit_scaled_modules(model).items()
        for weight in module.unit_scaled_weights
    }


def _operand_scale_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.{buffer}"
        for name, module in unit_scaled_modules(model).items()
        if isinstance(module, UnitScaledMatmulMixin)
        for buffer in ("input_scale", "grad_scale")
    ]


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
            merged_by_storage[key] = (weight.float() * scale.float()).to(weight.dtype)
        state_dict[weight_name] = merged_by_storage[key]
    for name in _operand_scale_names(model):
        state_dict.pop(name, None)
    return state_dict


def unit_scaled_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, weight_dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    """Ŵ (stored as `weight_dtype`), s, a, c and every other tensor; each shared (tied) tensor saved once."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"`weight_dtype` must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    converted = _converted_weight_names(model)
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue  # the alias of a tied tensor: restored by tying on load
        seen.add(key)
        if name in converted and weight_dtype == "e4m3":
            tensor = cast_to_format(tensor.float(), get_format("e4m3"))
        elif name in converted:
            tensor = tensor.to(WEIGHT_DTYPES[weight_dtype])
        out[name] = tensor.detach().contiguous()
    return out


def operand_scales(model: nn.Module) -> dict[str, list[float]]:
    """{layer: [a, c]} for every converted matmul layer whose static scales are not both 1."""
    return {
        name: [float(module.input_scale), float(module.grad_scale)]
        for name, module in unit_scaled_modules(model).items()
        if isinstance(module, UnitScaledMatmulMixin) and (float(module.input_scale), float(module.grad_scale)) != (1, 1)
    }


@torch.no_grad()
def set_operand_scales(model: nn.Module, scales: dict[str, list[float]]) -> None:
    """Set a, c from `operand_scales` output; an unknown layer name is an error."""
    modules = unit_scaled_modules(model)
    for name, (input_scale, grad_scale) in scales.items():
        module = modules.get(name)
        if not isinstance(module, UnitScaledMatmulMixin):
            raise ValueError(
                f"The checkpoint's `{CONFIG_KEY}.operand_scales` names layer `{name}`, which is not a unit-scaled "
                "matmul layer of this model: the config block disagrees with the model."
            )
        module.input_scale.fill_(input_scale)
        module.grad_scale.fill_(grad_scale)


@torch.no_grad()
def load_unit_scaled_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy a unit-scaled state dict into a converted model, refusing anything that would change its function.

    Errors name the tensor: a missing or non-finite scale, a missing or unexpected tensor (the
    config's conversion options disagree with the weights), a shape mismatch, unequal scales of a
    tied weight.
    """
    expected = model.state_dict()
    converted = _converted_weight_names(model)
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
            f"{unexpected[:5]}. The `{CONFIG_KEY}` block of config.json disagrees with the saved weights."
        )
    for name, tensor in state_dict.items():
        target = expected[name]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{source}: `{name}` has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}."
            )
        if name in converted.values() and not (torch.isfinite(tensor).all() and tensor > 0):
            raise ValueError(f"{source}: scale `{name}` = {tensor.item()} is not a positive finite number.")
    model.load_state_dict(
        {k: v.to(expected[k].dtype) if v.dtype != expected[k].dtype else v for k, v in state_dict.items()}, strict=False
    )
    for alias, source_name in aliases.items():
        if alias in converted.values() and not torch.equal(expected[alias], expected[source_name]):
            raise ValueError(f"{source}: tied scales `{alias}` and `{source_name}` differ.")


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters reachable under several names, and for their scales."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    converted = _converted_weight_names(model)
    for alias, source in list(aliases.items()):
        if alias in converted and source in converted:
            aliases[converted[alias]] = converted[source]
    return aliases


def read_checkpoint_format(config_dict: dict) -> str | None:
    """`merged`, `unit-scaled`, or None for a plain checkpoint with no `unit_scaling` block."""
    block = config_dict.get(CONFIG_KEY)
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


def write_unit_scaled_weights(state_dict: dict[str, torch.Tensor], save_directory: str | os.PathLike) -> Path:
    path = Path(save_directory) / UNIT_SCALED_WEIGHTS_NAME
    save_file(state_dict, str(path), metadata={"format": "pt", "hf_unitscale": "unit-scaled"})
    return path


def load_checkpoint_into(model: nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load a checkpoint folder of either format into an already converted model, in place."""
    checkpoint_dir = Path(checkpoint_dir)
    config = (
        json.loads((checkpoint_dir / "config.json").read_text()) if (checkpoint_dir / "config.json").exists() else {}
    )
    fmt = read_checkpoint_format(config)
    if fmt == "unit-scaled" or (checkpoint_dir / UNIT_SCALED_WEIGHTS_NAME).exists():
        state_dict = read_safetensors(checkpoint_dir / UNIT_SCALED_WEIGHTS_NAME)
        load_unit_scaled_state_dict(model, state_dict, source=str(checkpoint_dir / UNIT_SCALED_WEIGHTS_NAME))
        return
    raise ValueError(
        f"{checkpoint_dir} holds no {UNIT_SCALED_WEIGHTS_NAME}; load merged checkpoints with "
        "`hf_unitscale.from_pretrained`, which re-measures the scales."
    )
