"""Saving and loading unit-scaled models: `save_pretrained`, `from_pretrained`.

`unit_scale(model)` makes `model.save_pretrained(...)` (and so `Trainer.save_model` and
`model.push_to_hub`) call `save_pretrained` below, which writes the `merged` format by default:
a plain checkpoint any transformers install loads with the same function. Loading a unit-scaled
model never goes through a path that could silently drop the scales — see `checkpoint.py`.
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.utils import cached_file, logging

from . import __version__
from .checkpoint import (
    CHECKPOINT_FORMATS,
    UNIT_SCALED_WEIGHTS_NAME,
    load_unit_scaled_state_dict,
    merged_state_dict,
    operand_scales,
    read_checkpoint_format,
    read_safetensors,
    set_operand_scales,
    unit_scaled_state_dict,
    write_unit_scaled_weights,
)
from .config import CONFIG_KEY, UnitScaleConfig
from .convert import _convert, is_unit_scaled, unit_scale

__all__ = ["attach_checkpoint_methods", "from_pretrained", "save_pretrained"]

logger = logging.get_logger(__name__)

# keys of the config block that describe a saved checkpoint rather than conversion options
_CHECKPOINT_KEYS = ("checkpoint_format", "weight_dtype", "operand_scales", "hf_unitscale_version")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _checkpoint_block(model: PreTrainedModel, checkpoint_format: str, **extra: Any) -> dict[str, Any]:
    block = dict(getattr(model.config, CONFIG_KEY, None) or UnitScaleConfig().to_dict())
    block.update(checkpoint_format=checkpoint_format, hf_unitscale_version=__version__, **extra)
    return block


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    checkpoint_format: str = "merged",
    weight_dtype: str = "float32",
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **kwargs: Any,
) -> None:
    """Save a unit-scaled model.

    Args:
        checkpoint_format: `"merged"` (default) writes a plain transformers checkpoint W = s·Ŵ;
            `"unit-scaled"` writes Ŵ, s, a, c exactly (see `checkpoint.py`).
        weight_dtype: storage of Ŵ in the unit-scaled format: `"float32"`, `"bfloat16"` or `"e4m3"`.
        state_dict: a full state dict to save instead of `model.state_dict()` (e.g. gathered from FSDP).
        kwargs: passed to `PreTrainedModel.save_pretrained` for the merged format (`push_to_hub`,
            `max_shard_size`, …).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
    config = model.config
    original_block = getattr(config, CONFIG_KEY, None)
    if checkpoint_format == "merged":
        if weight_dtype != "float32":
            raise ValueError(
                "`weight_dtype` applies to the unit-scaled format only; merged weights keep the model dtype."
            )
        setattr(config, CONFIG_KEY, _checkpoint_block(model, "merged", operand_scales=operand_scales(model)))
        try:
            type(model).save_pretrained(
                model,
                save_directory,
                state_dict=merged_state_dict(model, state_dict),
                is_main_process=is_main_process,
                **kwargs,
            )
        finally:
            setattr(config, CONFIG_KEY, original_block)
        return
    if kwargs.pop("push_to_hub", False):
        raise ValueError("Push unit-scaled checkpoints with `model.push_to_hub(..., checkpoint_format='unit-scaled')`.")
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    tensors = unit_scaled_state_dict(model, state_dict, weight_dtype)
    setattr(config, CONFIG_KEY, _checkpoint_block(model, "unit-scaled", weight_dtype=weight_dtype))
    try:
        config.architectures = [type(model).__name__]
        config.save_pretrained(save_directory)
    finally:
        setattr(config, CONFIG_KEY, original_block)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)
    write_unit_scaled_weights(tensors, save_directory)
    logger.info(f"Saved unit-scaled checkpoint ({weight_dtype} Ŵ) to {save_directory}.")


def attach_checkpoint_methods(model: PreTrainedModel) -> None:
    """Route `model.save_pretrained` to `save_pretrained` above, so no code path writes Ŵ as W."""
    model.save_pretrained = MethodType(save_pretrained, model)


def _model_class(config: PretrainedConfig, model_class: type[PreTrainedModel] | None) -> type[PreTrainedModel]:
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(
            f"config.json names no transformers architecture ({architectures}); pass `model_class=` "
            "(e.g. `AutoModelForSequenceClassification`)."
        )
    return getattr(transformers, architectures[0])


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_class: type[PreTrainedModel] | None = None,
    unit_scale_config: UnitScaleConfig | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a unit-scaled model from a Hub repo id or a local folder, whatever its format.

    - `unit-scaled` checkpoint: builds the model from its config and loads Ŵ, s, a, c exactly.
    - `merged` checkpoint: loads W with transformers, converts (s = rms(W)) and restores the
      calibrated a, c of the `unit_scaling` block.
    - plain checkpoint (no block): loads it and converts with `unit_scale_config` or the defaults.

    Args:
        model_class: the transformers class or Auto class to load with; defaults to the class
            named in `config.architectures`.
        kwargs: passed to `from_pretrained` of that class (`dtype`, `token`, `revision`, …).
    """
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    checkpoint_format = read_checkpoint_format(config.to_dict())
    block = dict(getattr(config, CONFIG_KEY, None) or {})
    stored_scales = block.get("operand_scales") or {}
    options = {k: v for k, v in block.items() if k not in _CHECKPOINT_KEYS}
    if unit_scale_config is None:
        unit_scale_config = UnitScaleConfig.from_dict(options) if options else UnitScaleConfig()
    cls = _model_class(config, model_class)
    if checkpoint_format != "unit-scaled":
        model = cls.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        if is_unit_scaled(model):
            return model
        unit_scale(model, unit_scale_config)
        set_operand_scales(model, stored_scales)
        return model
    weights_file = cached_file(pretrained_model_name_or_path, UNIT_SCALED_WEIGHTS_NAME, **hub_kwargs)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", getattr(config, "dtype", None) or torch.float32))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with no_init_weights():
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            model = cls._from_config(config, dtype=dtype)
        else:  # an Auto class
            model = cls.from_config(config, dtype=dtype)
    model.tie_weights()  # before converting: a tied weight is one Parameter, saved once
    _convert(model, unit_scale_config, measure=False)
    load_unit_scaled_state_dict(model, read_safetensors(weights_file), source=str(weights_file))
    return model.eval()
