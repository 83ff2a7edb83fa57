"""The loss a measurement differentiates, as training differentiates it: calibration (`calibrate.py`), scale
reports (`analysis.py`) and recalibration during training (`callbacks.py`) run a model on a batch this way.

`model_inputs` puts the batch on the model's device and gives a causal LM without `labels` its own training
labels (its `input_ids`, padding masked to -100); `default_loss` is the model's loss, or without one the proxy
sum(logits²)/2/rows; `is_causal_lm` says whether the model's loss predicts labels[1:] from tokens[:-1] (the
label tokens a loss normalizes by).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["default_loss", "is_causal_lm", "model_inputs"]


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
