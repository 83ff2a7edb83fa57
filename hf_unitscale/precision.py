"""Turn low-precision GEMMs on and off on a converted model, and count what their casts clip.

`set_precision` sets the `MatmulPrecision` of every converted matmul layer (and the
`unit_scaling` config block, so it is saved with the model), except the layers named by
`full_precision_modules`, by default the output heads (`convert.readout_modules`): an LM head's
output gradient g = (softmax − onehot)/N sums to zero over the vocabulary, SmolLM2's tied embedding
W has a mean row holding 45% of its energy, and E5M2 rounding of g breaks that cancellation in
g @ W (SmolLM2-135M, E5M2 backward: the worst layer's weight-gradient cosine to fp32 is 0.88–0.95
with the head kept, 0.73 with it cast). `track_casts` attaches an
`OperandCounters` (input x/a, weight Ŵ, output gradient g/c) to every matmul layer;
`cast_statistics` reads them per layer and `summarize_casts` pools them into the fractions a
training log wants:

    saturated fraction   = #(|v| > format max) / #elements          (clipped to ±max)
    underflow fraction   = #(v ≠ 0 but cast to 0) / #non-zero elements (flushed to zero)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .config import CONFIG_KEY, UnitScaleConfig
from .convert import matmul_layers, module_pattern_hint, readout_modules
from .distributed import all_reduce_across_processes
from .formats import CastCounter, get_format
from .modules import UnitScaledMatmulMixin
from .ops import MatmulPrecision, OperandCounters

__all__ = [
    "OPERANDS",
    "apply_precision",
    "cast_statistics",
    "casts_uncounted",
    "full_precision",
    "full_precision_names",
    "set_precision",
    "summarize_casts",
    "track_casts",
]

logger = logging.get_logger(__name__)

OPERANDS = ("input", "weight", "grad_output")


def _matmul_layers(model: nn.Module) -> dict[str, UnitScaledMatmulMixin]:
    layers = matmul_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted matmul layer; call `unit_scale(model)` first.")
    return layers


def full_precision_names(patterns: list[str], layer_names: list[str], model_name: str) -> list[str]:
    """The names among `layer_names` that match a pattern (re.fullmatch); an error names a pattern matching none."""
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in layer_names):
            raise ValueError(
                f"`full_precision_modules` entry {pattern!r} matches no converted matmul layer of {model_name}: each "
                "entry is a regular expression that must match a whole module name (re.fullmatch). "
                + module_pattern_hint(pattern, layer_names, "To keep the layers")
            )
    return [name for name in layer_names if any(re.fullmatch(pattern, name) for pattern in patterns)]


def apply_precision(model: nn.Module, config: UnitScaleConfig) -> list[str]:
    """Give every converted matmul layer `config.precision`, except those matching `config.full_precision_modules`
    (re.fullmatch; None: the output heads), which keep the full-precision path. Returns the names kept."""
    layers = _matmul_layers(model)
    patterns = config.full_precision_modules
    if patterns is None:
        readouts = {id(m) for m in readout_modules(model)}
        kept = [name for name, layer in layers.items() if id(layer) in readouts]
    else:
        kept = full_precision_names(patterns, list(layers), type(model).__name__)
    precision = config.precision
    for name, layer in layers.items():
        layer.precision = None if name in kept else precision
    if precision is not None:
        logger.info(f"Low-precision GEMMs in {len(layers) - len(kept)} matmul layers; full precision in {kept}.")
    return kept


def set_precision(
    model: nn.Module,
    forward_format: str | None = "e4m3",
    backward_format: str | None = "auto",
    backend: str = "simulate",
    *,
    full_precision_modules: list[str] | None = None,
) -> MatmulPrecision | None:
    """Run the converted matmul layers' GEMMs with these operand formats (None, None: full precision).

    Args:
        model: a model converted by `unit_scale`.
        forward_format: the format of the forward operands x/a and Ŵ: a name from `formats.FORMATS` in any case
            ("e4m3", "E5M2", "bf16"), or None for full precision.
        backward_format: the format of the output gradient g/c; "auto" is "e5m2" with a forward format and None
            without one, so `set_precision(model, None)` is full precision.
        backend: "simulate" (cast and back, fp32 matmul) or "scaled_mm" (`torch._scaled_mm`; FP8 formats for both
            operands).
        full_precision_modules: regexes over module names (re.fullmatch) of layers that keep the full-precision
            path; None keeps the output heads, [] casts every layer.

    Returns:
        The `MatmulPrecision` set (None for full precision). `model.config.unit_scaling` records the settings,
        so the model saves and loads with them.

    Raises:
        ValueError: `model` has no converted matmul layer, an unknown format or backend, "scaled_mm" without FP8
            formats, or a `full_precision_modules` pattern that matches no layer.
    """
    if backward_format == "auto":
        backward_format = None if forward_format is None else "e5m2"
    # the saved block names formats as `FORMATS` does, whatever case they were given in
    forward_format, backward_format = (
        None if name is None else get_format(name).name for name in (forward_format, backward_format)
    )
    block = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    options = {
        "forward_format": forward_format,
        "backward_format": backward_format,
        "backend": backend,
        "full_precision_modules": full_precision_modules,
    }
    config = UnitScaleConfig.from_dict({**(block if isinstance(block, dict) else {}), **options})  # validates
    apply_precision(model, config)
    if isinstance(block, dict):
        block.update(options)
    return config.precision


def track_casts(model: nn.Module, enabled: bool = True) -> dict[str, OperandCounters]:
    """Attach fresh `OperandCounters` to every converted matmul layer (`enabled=False` detaches them).

    Counting costs a few elementwise passes per cast; counters only count when a layer runs a
    low-precision `precision`. Under gradient checkpointing the recomputed forward counts its input and
    weight casts again: the fractions stay right, the raw counts of those operands double. Returns the
    counters by layer name (empty when disabled).
    """
    counters = {}
    for name, layer in _matmul_layers(model).items():
        layer.cast_counters = OperandCounters.new() if enabled else None
        if enabled:
            counters[name] = layer.cast_counters
    return counters


def cast_statistics(
    model: nn.Module, *, reset: bool = False, all_processes: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """`{layer: {operand: CastCounter.as_dict()}}` for every layer with counters; `reset` zeroes them after.

    Without counters (no `track_casts(model)` first) it returns `{}` and warns once. Each process counts the
    casts of its own share of the batch. `all_processes=True` sums the counts of every process first, so a
    data-parallel run reports the casts of its global batch, as one process would; it is a collective (every
    rank must call it) and a no-op outside torch.distributed.
    """
    counters = {
        (name, operand): getattr(layer.cast_counters, operand)
        for name, layer in _matmul_layers(model).items()
        if layer.cast_counters is not None
        for operand in OPERANDS
    }
    if not counters:
        logger.warning_once(
            f"cast_statistics: no matmul layer of {type(model).__name__} counts its casts, so there is nothing to "
            "report. Call `track_casts(model)` before the forward and backward passes to count."
        )
    counts = [counter.counts for counter in counters.values()]
    if all_processes and counts:
        counts = all_reduce_across_processes(torch.stack([c.cpu() for c in counts])).unbind()
    result: dict[str, dict[str, dict[str, float]]] = {}
    for (name, operand), operand_counts in zip(counters, counts, strict=True):
        result.setdefault(name, {})[operand] = CastCounter(operand_counts).as_dict()
    if reset:
        for counter in counters.values():
            counter.reset()
    return result


def summarize_casts(statistics: dict[str, dict[str, dict[str, float]]], prefix: str = "fp8/") -> dict[str, float]:
    """Pool `cast_statistics` over layers into log entries, per operand:

    `{prefix}{operand}_saturated_fraction`, `{prefix}{operand}_underflow_fraction` (pooled over
    all layers), `{prefix}{operand}_max_layer_saturated_fraction` and
    `{prefix}{operand}_max_layer_underflow_fraction` (the worst layer).
    """
    summary: dict[str, float] = {}
    for operand in OPERANDS:
        rows = [layer[operand] for layer in statistics.values() if layer[operand]["seen"]]
        if not rows:
            continue
        seen = sum(r["seen"] for r in rows)
        nonzero = sum(r["nonzero"] for r in rows)
        saturated = sum(r["saturated"] for r in rows)
        underflowed = sum(r["underflowed"] for r in rows)
        summary[f"{prefix}{operand}_saturated_fraction"] = saturated / max(seen, 1)
        summary[f"{prefix}{operand}_underflow_fraction"] = underflowed / max(nonzero, 1)
        summary[f"{prefix}{operand}_max_layer_underflow_fraction"] = max(r["underflow_fraction"] for r in rows)
        summary[f"{prefix}{operand}_max_layer_saturated_fraction"] = max(r["saturated_fraction"] for r in rows)
    return summary


@contextlib.contextmanager
def _matmul_attribute_set(model: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Inside the block every converted matmul layer of `model` has `name` = `value`; each layer's own setting (an
    instance attribute, or the class default) is back afterwards."""
    layers = list(matmul_layers(model).values())
    saved = [(layer, name in layer.__dict__, layer.__dict__.get(name)) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, name, value)
        yield
    finally:
        for layer, present, before in saved:
            if present:
                setattr(layer, name, before)
            else:
                layer.__dict__.pop(name, None)


def casts_uncounted(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Inside the block the cast counters of `model` count nothing (evaluation's casts stay out of the training
    logs); every layer's counter, with what it had counted, is back afterwards."""
    return _matmul_attribute_set(model, "cast_counters", None)


def full_precision(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Inside the block every converted matmul of `model` runs its full-precision path (`precision=None`);
    each layer's own setting (an instance attribute or the class default) is restored afterwards."""
    return _matmul_attribute_set(model, "precision", None)
