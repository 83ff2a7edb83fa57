"""Saving, loading and sharing unit-scaled models: `save_pretrained`, `push_to_hub`, `from_pretrained`.

`unit_scale(model)` makes `model.save_pretrained(...)` (and so `Trainer.save_model`) and
`model.push_to_hub(...)` call the functions below. `save_pretrained` writes the `merged` format by
default (a plain checkpoint any transformers install loads with the same function), plus a model
card (`model_card.py`). `push_to_hub` saves into a temporary folder and uploads it with the
huggingface_hub client: transformers' own `push_to_hub` would overwrite our card with its own.
Loading never goes through a path that could silently drop the scales — see `checkpoint.py`. A save or push
replaces the weight files of every format (`WEIGHT_PATTERNS`); `trainer_push.py` makes Trainer's pushes do so.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import transformers
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from transformers import AutoConfig, CompressedTensorsConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import is_compressed_tensors_available, logging
from transformers.utils.hub import convert_file_size_to_int

from . import __version__
from .checkpoint import (
    CHECKPOINT_FORMATS,
    DEFAULT_MAX_SHARD_SIZE,
    check_state_dict_keys,
    check_storage_dtypes,
    compressed_tensors_checkpoint,
    load_unit_scaled_state_dict,
    merged_state_dict,
    operand_scales,
    read_checkpoint_format,
    read_embedding_dtype,
    read_operand_scales,
    read_unit_scaled_weights,
    read_weight_dtype,
    set_operand_scales,
    unit_scaled_state_dict,
    with_tied_names,
    write_unit_scaled_weights,
)
from .config import CONFIG_KEY, UnitScaleConfig, as_unit_scale_config
from .convert import convert_layers, convert_model, is_unit_scaled, matmul_layers
from .embedded import resolve_model_path
from .model_card import MODEL_CARD_TAGS, update_model_card

__all__ = [
    "WEIGHT_PATTERNS",
    "attach_checkpoint_methods",
    "concrete_model_class",
    "detach_checkpoint_methods",
    "file_stamps",
    "from_pretrained",
    "push_to_hub",
    "remove_stale_weights",
    "resolve_model_class",
    "save_pretrained",
    "weight_files",
]

logger = logging.get_logger(__name__)

# keys of the config block that describe a saved checkpoint rather than conversion options
_CHECKPOINT_KEYS = ("checkpoint_format", "weight_dtype", "embedding_dtype", "operand_scales", "hf_unitscale_version")
_UPLOAD_KWARGS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_LOADING_KWARGS = (*_HUB_KWARGS, "dtype", "torch_dtype", "attn_implementation", "quantization_config", "device_map")
# the top-level model weight files of every format (one file, shards, index) that a save or push replaces: a stale
# model.safetensors next to a unit-scaled checkpoint would be loaded by plain transformers as if it were the model.
# Only these names: optimizer states, training arguments, adapters and subfolders (Trainer's checkpoints) stay.
WEIGHT_PATTERNS = [
    pattern
    for stem, extension in (("model", ".safetensors"), ("pytorch_model", ".bin"), ("unit_scaled_model", ".safetensors"))
    for pattern in (f"{stem}{extension}", f"{stem}-*-of-*{extension}", f"{stem}{extension}.index.json")
]
_DEFAULT_WEIGHT_DTYPE = {"merged": None, "unit-scaled": "float32", "compressed-tensors": "e4m3"}


def _checkpoint_block(model: PreTrainedModel, checkpoint_format: str, **extra: Any) -> dict[str, Any]:
    block = dict(getattr(model.config, CONFIG_KEY, None) or UnitScaleConfig().to_dict())
    block.update(checkpoint_format=checkpoint_format, hf_unitscale_version=__version__, **extra)
    return block


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    checkpoint_format: str = "merged",
    weight_dtype: str | None = None,
    embedding_dtype: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    model_card: bool = True,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: str | list[str] | None = None,
    **kwargs: Any,
) -> None:
    """Save a unit-scaled model, with its model card. A model that is not unit-scaled is saved as transformers saves
    it (merged format only, with a warning): its config as it is, no model card.

    Args:
        model: the model to save: a unit-scaled `PreTrainedModel`, or an unconverted one (saved as above).
        save_directory: the folder to write (created if missing; an existing file is an error).
        checkpoint_format: `"merged"` (default) writes a plain transformers checkpoint W = s·Ŵ;
            `"unit-scaled"` writes Ŵ, s, a, c exactly; `"compressed-tensors"` writes per-tensor FP8
            weights with their scale (see `checkpoint.py`).
        weight_dtype: storage of Ŵ: `"float32"` (default), `"bfloat16"` or `"e4m3"` for the unit-scaled
            format; the compressed-tensors format is always `"e4m3"`; merged weights are written in the model's
            dtype, as transformers writes them: nothing is cast, so a `weight_dtype` given must name that dtype
            (the weights transformers keeps in float32 in a model of it, `_keep_in_fp32_modules`, stay float32).
        embedding_dtype: storage of embedding tables in the unit-scaled format; default `"int8"` (per-row
            scales) when `weight_dtype="e4m3"`, else `weight_dtype` — see `unit_scaled_state_dict` for why.
        state_dict: a full state dict to save instead of `model.state_dict()` (e.g. gathered from FSDP), with the
            model's keys (an error names missing and unexpected ones; a tied weight may be given under any one of
            its names).
        is_main_process: as in transformers: under torch.distributed, call this on every process with `True` only
            on the one that writes (the others write nothing).
        model_card: write README.md (`model_card.py`), merging into one already in `save_directory`.
        repo_id, base_model, tags: shown in the model card (its load code, metadata).
        kwargs: passed to `PreTrainedModel.save_pretrained` for the merged format; the other formats take
            `max_shard_size` (default "50GB", as transformers: larger checkpoints are split into shards with an
            index). `push_to_hub=True` pushes the saved folder with `push_to_hub` semantics (`repo_id`, `token`, …).

    Raises:
        NotADirectoryError: `save_directory` is an existing file (nothing is written).
        ValueError: a bad option, or `state_dict` keys that are not the model's (nothing is written).
        TypeError: `kwargs` that the unit-scaled or compressed-tensors format does not use (`safe_serialization`,
            …; nothing is written).
    """
    max_shard_size = kwargs.pop("max_shard_size", DEFAULT_MAX_SHARD_SIZE)
    weight_dtype = _check_save_options(model, checkpoint_format, weight_dtype, embedding_dtype, max_shard_size)
    if os.path.isfile(save_directory):
        raise NotADirectoryError(
            f"`save_directory` {str(save_directory)!r} is a file: a checkpoint is a folder (config, weights, card). "
            "Give a folder path; a missing folder is created."
        )
    converted = is_unit_scaled(model)
    if not converted and is_main_process:
        logger.warning(
            f"{type(model).__name__} is not unit-scaled: saving it as transformers would (its config as it is, no "
            "model card of ours). Call `hf_unitscale.unit_scale(model)` first to save it unit-scaled."
        )
    if state_dict is None and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} is sharded (FSDP2: its parameters are DTensors), so no rank holds its full "
            "weights: call `hf_unitscale.distributed.save_full_checkpoint(model, save_directory, ...)` on every rank "
            "(it gathers them and writes from rank 0), or pass a gathered `state_dict`."
        )
    if state_dict is not None:
        state_dict = with_tied_names(model, state_dict)  # every format reads a tied tensor under the name it needs
        if is_main_process:
            check_state_dict_keys(model, state_dict)
    push = kwargs.pop("push_to_hub", False)
    upload_kwargs = {k: kwargs.pop(k) for k in _UPLOAD_KWARGS if k in kwargs}
    if push:
        repo_id = repo_id or str(save_directory).rstrip("/").split("/")[-1]
        stamps_before = file_stamps(save_directory)
    if checkpoint_format == "merged":
        kwargs["max_shard_size"] = max_shard_size
    elif kwargs:
        raise TypeError(
            f"save_pretrained() got argument(s) {sorted(kwargs)} that the {checkpoint_format} format does not use; "
            "it takes `max_shard_size` and the arguments of this function."
        )
    # every tensor is built (and every storage option checked) before an earlier save's weights are deleted
    if checkpoint_format == "merged":
        tensors = merged_state_dict(model, state_dict)
        _check_merged_dtype(model, weight_dtype, tensors)
    elif is_main_process and checkpoint_format == "unit-scaled":
        if embedding_dtype is None:
            embedding_dtype = "int8" if weight_dtype == "e4m3" else weight_dtype
        tensors = unit_scaled_state_dict(model, state_dict, weight_dtype, embedding_dtype)
        extra_config = {}
        block = _checkpoint_block(model, "unit-scaled", weight_dtype=weight_dtype, embedding_dtype=embedding_dtype)
    elif is_main_process:
        tensors, quantization_config = compressed_tensors_checkpoint(model, state_dict)
        extra_config = {"quantization_config": quantization_config}
        block = _checkpoint_block(model, checkpoint_format, weight_dtype="e4m3", operand_scales=operand_scales(model))
    if is_main_process:
        remove_stale_weights(save_directory, checkpoint_format)
    config = model.config
    original_block = getattr(config, CONFIG_KEY, None)
    if checkpoint_format == "merged":
        if converted:  # an unconverted model's config is saved as it is: nothing of ours to record
            setattr(config, CONFIG_KEY, _checkpoint_block(model, "merged", operand_scales=operand_scales(model)))
        try:
            type(model).save_pretrained(
                model, save_directory, state_dict=tensors, is_main_process=is_main_process, **kwargs
            )
        finally:
            if converted:
                setattr(config, CONFIG_KEY, original_block)
    elif is_main_process:
        os.makedirs(save_directory, exist_ok=True)
        _write_config(model, save_directory, block, extra_config)
        write_unit_scaled_weights(tensors, save_directory, checkpoint_format, max_shard_size)
        logger.info(f"Saved {checkpoint_format} checkpoint ({weight_dtype} Ŵ) to {save_directory}.")
    if model_card and is_main_process and converted:
        update_model_card(
            model,
            save_directory,
            checkpoint_format=checkpoint_format,
            weight_dtype=weight_dtype,
            embedding_dtype=embedding_dtype,
            repo_id=repo_id,
            base_model=base_model,
            tags=tags,
        )
    if push and is_main_process:  # what this save wrote, as transformers uploads: not the folder's other files
        written = [name for name, stamp in file_stamps(save_directory).items() if stamps_before.get(name) != stamp]
        _upload(save_directory, repo_id, allow_patterns=written, **upload_kwargs)


def file_stamps(folder: str | os.PathLike, *, recursive: bool = False) -> dict[str, tuple[int, int]]:
    """{path relative to `folder`, '/'-separated: (mtime in ns, size)} of the files directly in `folder`, and with
    `recursive` of those in its subfolders too, hidden ones (`.git`, `.cache`) excepted; none if it does not exist."""
    stamps = {}
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")] if recursive else []
        for path in (Path(root, name) for name in names):
            try:
                stat = path.stat()
            except FileNotFoundError:  # a broken link
                continue
            stamps[path.relative_to(folder).as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return stamps


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The top-level model weight files of every format (one file, shards, index) in `folder`, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern) if path.is_file()})


def remove_stale_weights(save_directory: str | os.PathLike, checkpoint_format: str) -> None:
    """Delete weight files a save in another format left in `save_directory`: a stale model.safetensors next to
    a unit-scaled checkpoint would be loaded by plain transformers as if it were this model."""
    for path in weight_files(save_directory):
        logger.info(f"Removing {path}, left by an earlier save, before saving a {checkpoint_format} checkpoint.")
        path.unlink()


def _check_save_options(
    model: PreTrainedModel,
    checkpoint_format: str,
    weight_dtype: str | None,
    embedding_dtype: str | None,
    max_shard_size: int | str,
) -> str | None:
    """Check the options of `save_pretrained` that need no tensors, before anything is written, deleted or (by
    `push_to_hub`) created on the Hub; return the `weight_dtype` to write."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
    weight_dtype = _check_weight_dtype(checkpoint_format, weight_dtype)
    if checkpoint_format != "merged" and not is_unit_scaled(model):
        raise ValueError(
            f"{type(model).__name__} is not unit-scaled, so it has no Ŵ and s to write in the {checkpoint_format} "
            "format: call `hf_unitscale.unit_scale(model)` first, or save it with `checkpoint_format='merged'`."
        )
    if embedding_dtype is not None and checkpoint_format != "unit-scaled":
        raise ValueError(f"`embedding_dtype` applies to the unit-scaled format only, got {checkpoint_format!r}.")
    if checkpoint_format == "unit-scaled":
        check_storage_dtypes(weight_dtype, embedding_dtype)
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError as err:
        raise ValueError(f"`max_shard_size={max_shard_size!r}`: {err}") from err
    if shard_bytes <= 0:  # would write one file per tensor
        raise ValueError(f"`max_shard_size` should be a positive size such as '5GB' or 10**9, got {max_shard_size!r}.")
    return weight_dtype


def _check_weight_dtype(checkpoint_format: str, weight_dtype: str | None) -> str | None:
    default = _DEFAULT_WEIGHT_DTYPE[checkpoint_format]
    if weight_dtype is None or weight_dtype == default:
        return default
    if checkpoint_format == "unit-scaled":
        return weight_dtype  # validated by checkpoint.check_storage_dtypes, which names the choices
    if checkpoint_format == "merged":
        return weight_dtype  # checked against the tensors written (_check_merged_dtype)
    raise ValueError(
        f"`weight_dtype={weight_dtype!r}` does not apply to the {checkpoint_format} format, which stores e4m3. Use "
        "`checkpoint_format='unit-scaled'` to choose the storage of Ŵ."
    )


def _kept_in_float32(model: PreTrainedModel, dtype: torch.dtype) -> list[str]:
    """The patterns of the parameters `from_pretrained(..., dtype=dtype)` keeps in float32: transformers' own dtype
    plan (`_get_dtype_plan`: `_keep_in_fp32_modules` under float16 only, `_keep_in_fp32_modules_strict` under float16
    and bfloat16; T5's `wo` is float32 in a float16 T5, bfloat16 in a bfloat16 one). A plain `nn.Module` has none."""
    plan = model._get_dtype_plan(dtype) if isinstance(model, PreTrainedModel) else {}
    return sorted(pattern for pattern, kept_dtype in plan.items() if kept_dtype == torch.float32)


def _check_merged_dtype(model: PreTrainedModel, weight_dtype: str | None, tensors: dict[str, torch.Tensor]) -> None:
    """A merged checkpoint stores W = s·Ŵ in the model's dtype, cast to nothing: `weight_dtype` may only name that
    dtype, so that a dtype asked for is either what is written or an error, never silently another. The model's
    dtype is that of every weight but those transformers keeps in float32 in a model of it (`_kept_in_float32`):
    a float16 T5 as `from_pretrained` loads it (`wo` in float32) saves as it is, each weight in its own dtype."""
    if weight_dtype is None:
        return
    dtype = getattr(torch, weight_dtype, None)
    kept = _kept_in_float32(model, dtype) if isinstance(dtype, torch.dtype) else []
    kept_names = re.compile("|".join(pattern.replace("*", ".*") for pattern in kept)) if kept else None
    written = sorted(
        {
            str(tensor.dtype).removeprefix("torch.")
            for name, tensor in tensors.items()
            if tensor.is_floating_point() and not (kept_names and kept_names.search(name))
        }
    )
    if written == [weight_dtype]:
        return
    if kept:  # `model.to(dtype)` would cast them too, which `from_pretrained(..., dtype=dtype)` avoids
        cast = (
            f"load the model in it (`from_pretrained(..., dtype=torch.{weight_dtype})` keeps "
            f"{type(model).__name__}'s {kept} in float32; `model.to(torch.{weight_dtype})` would cast them too), "
        )
    elif isinstance(dtype, torch.dtype):
        cast = f"cast the model first (`model.to(torch.{weight_dtype})`), "
    else:
        cast = ""
    raise ValueError(
        f"`weight_dtype={weight_dtype!r}`: a merged checkpoint is written in the model's dtype "
        f"({', '.join(written)}), as transformers writes it, and nothing is cast on saving. Leave `weight_dtype` "
        f"unset, {cast}or save with `checkpoint_format='unit-scaled'`, which stores Ŵ as float32, bfloat16 or e4m3."
    )


def _write_config(
    model: PreTrainedModel, save_directory: str | os.PathLike, block: dict[str, Any], extra: dict[str, Any]
) -> None:
    """config.json with `block` as its `unit_scaling` entry (and `extra` entries), leaving model.config as it was."""
    config = model.config
    saved = {name: getattr(config, name, None) for name in (CONFIG_KEY, "architectures", "dtype", *extra)}
    try:
        setattr(config, CONFIG_KEY, block)
        config.dtype = str(model.dtype).removeprefix("torch.")  # the dtype `from_pretrained` rebuilds the model in
        # under FSDP2 the class is `FSDP<Model>`; transformers strips the prefix the same way
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        for name, value in extra.items():
            setattr(config, name, value)
        config.save_pretrained(save_directory)
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        for name in extra:
            if saved[name] is None:
                delattr(config, name)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)


def _upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    allow_patterns: list[str] | None = None,
) -> CommitInfo:
    """Upload `folder` (only `allow_patterns` of it, if given) in one commit that also deletes the repo's weight
    files of any format it does not upload."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload unit-scaled model (hf_unitscale)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=allow_patterns,
        delete_patterns=WEIGHT_PATTERNS,
    )


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    checkpoint_format: str = "merged",
    weight_dtype: str | None = None,
    embedding_dtype: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tags: str | list[str] | None = None,
    base_model: str | None = None,
) -> CommitInfo:
    """Upload a unit-scaled model to the Hub: config.json (with its `unit_scaling` block), safetensors
    weights in `checkpoint_format`, and a model card; weight files of another format already in the
    repo are deleted in the same commit. A README already in the repo is kept, with the unit-scaling
    section merged in. Returns the commit info; takes transformers' `push_to_hub` arguments.
    """
    _check_save_options(model, checkpoint_format, weight_dtype, embedding_dtype, max_shard_size)  # before the repo
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_unitscale_push_") as folder:
        try:  # merge into the repo's card rather than replace it
            card = api.hf_hub_download(repo_id, "README.md", revision=revision)
            shutil.copyfile(card, os.path.join(folder, "README.md"))
        except EntryNotFoundError:
            pass
        except Exception as err:  # e.g. a branch that does not exist yet: start a fresh card
            logger.info(f"Read no model card from {repo_id}@{revision} ({type(err).__name__}: {err}).")
        save_pretrained(
            model,
            folder,
            checkpoint_format=checkpoint_format,
            weight_dtype=weight_dtype,
            embedding_dtype=embedding_dtype,
            repo_id=repo_id,
            base_model=base_model,
            tags=tags,
            max_shard_size=max_shard_size,
        )
        return _upload(
            folder,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def attach_checkpoint_methods(model: PreTrainedModel) -> None:
    """Route `model.save_pretrained` and `model.push_to_hub` to the functions above, so no code path writes
    Ŵ as W or replaces our model card; tag the model so transformers' own cards (Trainer's) carry the tags."""
    model.save_pretrained = MethodType(save_pretrained, model)
    model.push_to_hub = MethodType(push_to_hub, model)
    model.add_model_tags(list(MODEL_CARD_TAGS))


def detach_checkpoint_methods(model: PreTrainedModel) -> None:
    """Undo `attach_checkpoint_methods` (after `merge_unit_scale`): transformers' own methods, no tags of ours."""
    for method in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(method, None)
    if model.model_tags:
        model.model_tags = [t for t in model.model_tags if t not in MODEL_CARD_TAGS] or None


def resolve_model_class(
    config: PretrainedConfig, model_class: type[PreTrainedModel] | str | None
) -> type[PreTrainedModel]:
    """The class to load `config`'s checkpoint with: `model_class`, a class or the name of a transformers class (as
    the CLI's --model-class takes it), or by default the class named in `config.architectures`."""
    if isinstance(model_class, str):  # a class name, as the CLI's --model-class takes it
        if not isinstance(getattr(transformers, model_class, None), type):
            raise ValueError(
                f"`model_class={model_class!r}` names no transformers class; pass a class (e.g. "
                "`transformers.AutoModelForSequenceClassification`) or the name of one."
            )
        return getattr(transformers, model_class)
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(
            f"config.json names no transformers architecture ({architectures}); pass `model_class=` "
            "(e.g. `AutoModelForSequenceClassification`)."
        )
    return getattr(transformers, architectures[0])


def concrete_model_class(cls: type, config: PretrainedConfig) -> type[PreTrainedModel]:
    """`cls` itself, or the class an Auto class (`AutoModelForSequenceClassification`) picks for `config`."""
    if issubclass(cls, PreTrainedModel):
        return cls
    if type(config) not in cls._model_mapping:
        raise ValueError(f"{cls.__name__} has no model class for a {type(config).__name__}.")
    return _get_model_class(config, cls._model_mapping)  # the mapping may hold several; transformers' choice


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_class: type[PreTrainedModel] | str | None = None,
    unit_scale_config: UnitScaleConfig | dict[str, Any] | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a unit-scaled model from a Hub repo id or a local folder, whatever its format.

    - `unit-scaled` checkpoint: builds the model from its config and loads Ŵ, s, a, c exactly.
    - `merged` checkpoint: loads W with transformers, converts (measuring s as `unit_scale` does) and
      restores the calibrated a, c of the `unit_scaling` block.
    - plain checkpoint (no block): loads it and converts with `unit_scale_config` or the defaults.

    The GEMM precision the block records (FP8 formats, backend, `full_precision_modules`) is set again: a model
    saved training in FP8 loads running in FP8 (`set_precision(model, None)` for full precision).

    Into another class than the one saved (`model_class=AutoModelForSequenceClassification, num_labels=3` on a
    base model's checkpoint, or the reverse), W loads as transformers loads it across classes (base-model
    prefix, new heads initialized) and a, c follow their layers; a unit-scaled checkpoint is loaded as saved
    first, then its W = s·Ŵ.

    Args:
        pretrained_model_name_or_path: a Hub repo id, a local folder, or `embedded:minilm` / `embedded:smollm2`.
        model_class: the transformers class or Auto class (or its name) to load with; defaults to the class
            named in `config.architectures`.
        kwargs: as in transformers, those naming config attributes (`num_labels`, `id2label`, …) update the
            config; the rest go to `from_pretrained` of that class (`dtype`, `token`, `revision`, …). A
            unit-scaled checkpoint is built from its config instead, in the dtype it was saved in unless `dtype`
            says otherwise; it takes `dtype`, `attn_implementation` and the Hub arguments, and names any other.
        unit_scale_config: conversion options (a `UnitScaleConfig` or its dict) for a plain checkpoint; for one
            hf_unitscale saved, they replace the options its `unit_scaling` block records (default: the block's).

    Returns:
        The model, unit-scaled, in eval mode as transformers returns it.

    Raises:
        ImportError: a compressed-tensors checkpoint without the `compressed-tensors` package (≥ 0.15).
        TypeError: `kwargs` that a unit-scaled checkpoint does not take (named), or a `unit_scale_config` that is
            neither a `UnitScaleConfig` nor a dict.
        ValueError: a `unit_scaling` block or `unit_scale_config` with an unknown or invalid option, or a weights
            file that is corrupt or truncated (named), or tensors and scales that do not fit the model.
    """
    pretrained_model_name_or_path = resolve_model_path(pretrained_model_name_or_path)  # `embedded:<name>` too
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    config_changed = config is not None  # a config of the caller's, or one the kwargs update: sizes may differ
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        # as in transformers: arguments naming config attributes (num_labels, id2label, …) update the config
        for key in [k for k in kwargs if k not in _LOADING_KWARGS and hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
            config_changed = True
    checkpoint_format = read_checkpoint_format(config.to_dict())
    quantization = getattr(config, "quantization_config", None) or {}
    quant_method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if "compressed-tensors" in (checkpoint_format, quant_method) and not is_compressed_tensors_available():
        # ours or another's; what transformers raises here names neither the checkpoint's format nor the extra
        raise ImportError(
            f"{pretrained_model_name_or_path} is a compressed-tensors checkpoint; reading it needs the "
            "`compressed-tensors` package, 0.15 or newer as transformers requires: "
            "pip install 'hf_unitscale[compressed-tensors]'"
        )
    block = dict(getattr(config, CONFIG_KEY, None) or {})
    stored_scales = read_operand_scales(config.to_dict())
    options = {k: v for k, v in block.items() if k not in _CHECKPOINT_KEYS}
    unit_scale_config = as_unit_scale_config(unit_scale_config, "unit_scale_config")
    # what a tensor or scale that does not fit the converted model is blamed on: the caller's options, or the block
    converted_by = None if unit_scale_config is None else "`unit_scale_config`"
    if unit_scale_config is None:
        unit_scale_config = _block_options(options)
    cls = resolve_model_class(config, model_class)
    saved_class = (getattr(config, "architectures", None) or [None])[0]
    generation_config = None
    another_class = saved_class and concrete_model_class(cls, config).__name__ != saved_class
    resized = config_changed and kwargs.get("ignore_mismatched_sizes")
    if checkpoint_format == "unit-scaled" and not resized:
        kwargs.pop("ignore_mismatched_sizes", None)  # the saved class and config: every size matches
    if checkpoint_format == "unit-scaled" and saved_class and (another_class or resized):
        # another class than the one saved (its base model, another head), or heads of another size: load Ŵ, s, a, c
        # exactly as saved, then W = s·Ŵ into `cls` as transformers loads across classes and sizes (base-model
        # prefix, new or resized heads initialized)
        saved = from_pretrained(
            pretrained_model_name_or_path,
            model_class=getattr(transformers, saved_class),
            **{k: kwargs[k] for k in (*_HUB_KWARGS, "dtype", "torch_dtype") if k in kwargs},
        )
        stored_scales, kwargs["state_dict"] = operand_scales(saved), merged_state_dict(saved)
        generation_config = saved.generation_config if saved.can_generate() else None
        pretrained_model_name_or_path, cls, checkpoint_format = None, concrete_model_class(cls, config), "merged"
        del saved
    if checkpoint_format != "unit-scaled":
        if checkpoint_format == "compressed-tensors" and "quantization_config" not in kwargs:
            # dense weights W = e4m3(Ŵ)·s at load time (compressed-tensors would otherwise defer it to the
            # first forward, after `unit_scale` has measured the FP8 tensors)
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        try:
            with warnings.catch_warnings():  # "the checkpoint's quantization_config is used": expected
                warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
                model = cls.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        except SafetensorError as err:  # safetensors' message does not name the file
            raise ValueError(
                f"Could not read the weights (model.safetensors) of {pretrained_model_name_or_path}: {err}. The file "
                "is corrupt or truncated; re-download or re-save it."
            ) from err
        if checkpoint_format == "compressed-tensors":
            _drop_quantization(model)
        if generation_config is not None and model.can_generate():
            model.generation_config = generation_config  # a model built from a state dict reads no files
        if is_unit_scaled(model):
            return model
        # an adapter folder beside the weights, which transformers loads, is refused; the block's a, c are set next
        convert_model(model, unit_scale_config, reloading=checkpoint_format is not None)
        set_operand_scales(
            model,
            _as_named_in(model, stored_scales, across_classes=saved_class != type(model).__name__),
            converted_by=converted_by,
        )
        return model
    unused = sorted(set(kwargs) - {*_HUB_KWARGS, "dtype", "torch_dtype", "attn_implementation"})
    if unused:
        raise TypeError(
            f"from_pretrained() got argument(s) {unused} that a unit-scaled checkpoint does not take: it builds the "
            "model from its config and loads Ŵ, s, a, c exactly. It takes `dtype`, `attn_implementation` and "
            f"{list(_HUB_KWARGS)}; move the model with `.to(device)` afterwards."
        )
    # before `convert_layers` replaces the block with its conversion options
    weight_dtype, embedding_dtype = read_weight_dtype(config.to_dict()), read_embedding_dtype(config.to_dict())
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
    if dtype == "auto":  # the dtype the model was saved in
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    build_kwargs = {"dtype": dtype, "attn_implementation": kwargs.get("attn_implementation")}
    with no_init_weights():
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            model = cls._from_config(config, **build_kwargs)
        else:  # an Auto class
            model = cls.from_config(config, **build_kwargs)
    model.tie_weights()  # before converting: a tied weight is one Parameter, saved once
    convert_layers(model, unit_scale_config, measure=False, reloading=True)
    load_unit_scaled_state_dict(
        model,
        read_unit_scaled_weights(pretrained_model_name_or_path, **hub_kwargs),
        source=str(pretrained_model_name_or_path),
        weight_dtype=weight_dtype,
        embedding_dtype=embedding_dtype,
        converted_by=converted_by,
    )
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:  # no generation_config.json: the one derived from config.json stays
            pass
    return model.eval()


def _block_options(options: dict[str, Any]) -> UnitScaleConfig:
    """The conversion options of config.json's block, with an error that says where a bad one comes from."""
    try:
        return UnitScaleConfig.from_dict(options)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"config.json's `{CONFIG_KEY}` block: {err} The file is corrupt or was edited: re-save the checkpoint, or "
            "pass `unit_scale_config=` to convert with other options."
        ) from None


def _as_named_in(
    model: PreTrainedModel, scales: dict[str, list[float]], *, across_classes: bool
) -> dict[str, list[float]]:
    """Operand scales saved from a base model (`encoder.…`) or from a model with a head (`bert.encoder.…`), by
    `model`'s layer names: transformers loads weights across the `base_model_prefix`, so they follow. Loading
    into another class drops the scales of layers it lacks (another head's), as transformers drops their
    weights; into the saved class, an unknown name stays, for `set_operand_scales` to refuse."""
    prefix, layers = model.base_model_prefix, set(matmul_layers(model))
    renamed = {}
    for name, value in scales.items():
        if prefix and name not in layers:
            if f"{prefix}.{name}" in layers:
                name = f"{prefix}.{name}"
            elif name.removeprefix(f"{prefix}.") in layers:
                name = name.removeprefix(f"{prefix}.")
        if name not in layers and across_classes:
            logger.info(f"Not restoring the operand scales of `{name}`: {type(model).__name__} has no such layer.")
            continue
        renamed[name] = value
    return renamed


def _drop_quantization(model: PreTrainedModel) -> None:
    """A compressed-tensors checkpoint loaded on CPU is dequantized into plain Linear layers: forget the
    quantizer, so the unit-scaled model saves, trains and pushes as a plain one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for attribute in ("is_quantized", "quantization_method"):
        model.__dict__.pop(attribute, None)
