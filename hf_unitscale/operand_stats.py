"""RMS statistics of GEMM operands, shared by calibration (`calibrate.py`) and scale reports (`analysis.py`).

An operand's scale is its RMS over non-zero elements (padding zeroes whole gradient rows, ReLU
zeroes inputs; zeros are exact in every format). Over several batches the per-batch mean squares
are averaged, then rooted:

    rms = sqrt( mean_b  ( Σ_{t≠0} t² / #{t≠0} )_b )

so one outlier batch does not dominate as a max would, and several tensors seen in one batch
(a layer called twice) pool into that batch's mean square.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .ops import rms

__all__ = ["RmsAccumulator", "default_loss", "model_inputs"]


class RmsAccumulator:
    """Running sqrt(mean over batches of the non-zero mean square) of one operand."""

    def __init__(self) -> None:
        self.sum_sq = self.count = 0.0  # the current batch
        self.ms_total = 0.0  # Σ over finished batches of their mean square
        self.batches = 0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        count = float((t != 0).sum())
        # rms over non-zero elements, squared back to a sum so several tensors per batch pool correctly
        self.sum_sq += float(rms(t, nonzero_only=True)) ** 2 * count
        self.count += count

    def end_batch(self) -> None:
        if self.count:
            self.ms_total += self.sum_sq / self.count
            self.batches += 1
        self.sum_sq = self.count = 0.0

    def value(self) -> float:
        """The pooled RMS; nan when no batch saw a non-zero element."""
        return math.sqrt(self.ms_total / self.batches) if self.batches else math.nan


def _is_causal_lm(model: nn.Module) -> bool:
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
    if "labels" not in inputs and "input_ids" in inputs and _is_causal_lm(model):
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
