"""The loss a measurement differentiates, as training differentiates it: calibration (`calibrate.py`), scale
reports (`analysis.py`) and recalibration during training (`callbacks.py`) run a model on a batch this way.

`model_inputs` puts the batch on the model's device and gives a causal LM without `labels` its own training
labels (its `input_ids`, padding masked to -100); `default_loss` is the model's loss, or without one the proxy
sum(logits²)/2/rows; `is_causal_lm` says whether the model is its type's causal-LM class (the models that get
their own labels). `loss_shifts_labels` and `trainer_num_items_in_batch` are Trainer's rule for the label tokens a
step's loss is normalized by, which calibration follows to see the gradients training sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "default_loss",
    "is_causal_lm",
    "loss_shifts_labels",
    "model_inputs",
    "trainer_num_items_in_batch",
]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is the causal-LM class of its model type (its loss predicts labels[1:] from tokens[:-1])."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ())
    names = (names,) if isinstance(names, str) else tuple(names)
    return type(model).__name__ in names


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """`batch` on the model's device; a causal LM without `labels` gets its own training labels
    (`input_ids`, padding masked to -100), so its loss is the one training differentiates."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "labels" not in inputs and "input_ids" in inputs and is_causal_lm(model):
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        inputs["labels"] = labels
    return inputs


def default_loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's loss; without one, the proxy sum(logits²)/2/rows (gradient logits/rows: the same
    1/rows normalization a mean loss has, so c is right up to an O(1) factor)."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is not None:
        return loss
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    rows = logits.numel() // logits.shape[-1]
    return logits.float().square().sum() / (2 * rows)


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether `model`'s loss predicts labels[1:] from tokens[:-1], by Trainer's rule (`Trainer._loss_shifts_labels`,
    transformers 5): its `loss_type` maps to `ForCausalLMLoss` and it is no encoder-decoder."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not is_encoder_decoder


def trainer_num_items_in_batch(
    inputs: Mapping[str, Any], args: Any, *, shifts_labels: bool, shared_batch: int = 1
) -> torch.Tensor | None:
    """Trainer's `num_items_in_batch` (`Trainer._get_num_items_in_batch`, transformers 5) for a step whose
    micro-batches, on every process, are like `inputs`: the label tokens its loss predicts (`shift_labels` when the
    batch has them, else `labels[..., 1:]` with `shifts_labels`, else `labels`; -100 is none) × the
    `gradient_accumulation_steps` micro-batches, × `world_size` with `average_tokens_across_devices` (Trainer sums
    every process's), ÷ `shared_batch` (the processes that hold one batch: tensor × context × sequence parallel).
    None for labels that are no tensor (DETR's list of dicts), which Trainer does not count."""
    labels = inputs.get("shift_labels")
    try:
        if labels is None:
            labels = inputs["labels"][..., 1:] if shifts_labels else inputs["labels"]
        num_items = labels.ne(-100).sum()
    except (TypeError, AttributeError):
        return None
    num_items = num_items * (getattr(args, "gradient_accumulation_steps", 1) or 1)
    if getattr(args, "average_tokens_across_devices", False) and getattr(args, "world_size", 1) > 1:
        num_items = num_items * args.world_size
    return num_items / shared_batch if shared_batch > 1 else num_items
