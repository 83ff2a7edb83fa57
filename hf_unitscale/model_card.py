"""The model card (README.md) of a unit-scaled checkpoint.

It states what a reader needs before loading the weights: that the model is unit-scaled, the
checkpoint format and the storage dtype of Ŵ, the lr rule, the calibration, a summary of the
per-layer scales s (weight), a (input) and c (output gradient), and exact code to load it with and
without `hf_unitscale`. The YAML metadata carries the tags `unit-scaling` and `hf_unitscale`,
`library_name: transformers` and `base_model` when it is known.

The section lives between two HTML-comment markers, so it can be refreshed inside a card someone
else wrote (a user's README, `Trainer.create_model_card`'s training summary) without touching the
rest: `update_model_card(model, folder, ...)` merges, it never clobbers, and `remove_model_card_section(folder)`
takes the section out again when the folder gets a plain (merged back) checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .checkpoint import UNIT_SCALED_WEIGHTS_NAME
from .config import CONFIG_KEY, UnitScaleConfig
from .convert import measure_weight_scale, unit_scaled_modules, uses_power_of_two_scales, weight_scales
from .modules import UnitScaledMatmulMixin
from .ops import apply_scale

__all__ = [
    "MODEL_CARD_TAGS",
    "model_card_section",
    "remove_model_card_section",
    "render_model_card",
    "update_model_card",
]

MODEL_CARD_TAGS = ("unit-scaling", "hf_unitscale")
BEGIN = "<!-- hf_unitscale:begin -->"
END = "<!-- hf_unitscale:end -->"

logger = logging.get_logger(__name__)

# up to this many converted layers get one row each; more are grouped by name pattern (".0." → ".N.")
MAX_LAYER_ROWS = 32

_FORMAT_TEXT = {
    "merged": (
        "a plain transformers checkpoint (`model.safetensors`) holding the merged weights W = s·Ŵ. Any "
        "transformers install loads it and computes the same function; `hf_unitscale` re-measures s from W as "
        "`unit_scale` does and restores the calibrated operand scales from the `unit_scaling` block of "
        "`config.json`."
    ),
    "unit-scaled": (
        f"`{UNIT_SCALED_WEIGHTS_NAME}` (or shards of it with an index) holding the unit-scale weights Ŵ, "
        "their scales s and the operand scales a, c exactly. There is deliberately no `model.safetensors`: "
        "plain transformers refuses this folder instead of loading Ŵ as if it were W."
    ),
    "compressed-tensors": (
        "the per-tensor FP8 `float-quantized` format of the `compressed-tensors` package: each linear layer "
        "stores `weight` = e4m3(Ŵ) and `weight_scale` = s, which the format dequantizes as W = weight·weight_scale; "
        "other tensors are stored merged."
    ),
}


def _base_model(config) -> str | None:
    """The Hub id the model was loaded from, if it looks like one (not a local path)."""
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def _scale_rows(model: nn.Module, scales: dict[int, float]) -> list[tuple[str, str, float, float | None, float | None]]:
    """(layer, kind, s, a, c) for every converted weight, s from `scales` ({id(Ŵ): s}); a, c are None for embeddings
    and generic layers."""
    rows = []
    for name, module in unit_scaled_modules(model).items():
        matmul = isinstance(module, UnitScaledMatmulMixin)
        for weight in module.unit_scaled_weights:
            label = name if weight == "weight" else f"{name}.{weight}"
            a = float(module.input_scale) if matmul else None
            c = float(module.grad_scale) if matmul else None
            rows.append((label, type(module).base_class.__name__, scales[id(getattr(module, weight))], a, c))
    return rows


def _merged_weight_files(folder: str | os.PathLike | None) -> list[Path]:
    """The merged checkpoint's weight files in `folder`: model.safetensors or the shards its index names."""
    if folder is None or not Path(folder).is_dir():
        return []
    index = Path(folder) / SAFE_WEIGHTS_INDEX_NAME
    names = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SAFE_WEIGHTS_NAME]
    )
    return [Path(folder) / name for name in names if (Path(folder) / name).is_file()]


def _loaded_scales(model: nn.Module, block: dict, folder: str | os.PathLike | None) -> dict[int, float]:
    """{id(Ŵ): s} that `hf_unitscale.from_pretrained` measures from the merged checkpoint in `folder`: `unit_scale`'s
    rule on each stored W, s = rms(W) or its power of two, which after training differs from the s Ŵ was trained
    with. A weight not found there (no folder) is measured on W = s·Ŵ in memory, what a save would store. A W with
    nan/inf values (a diverged run, saved as plain Trainer would save it) has s = nan, with a warning naming it."""
    config = UnitScaleConfig(power_of_two_scales=block.get("power_of_two_scales"))
    non_finite: list[str] = []

    def measure(name: str, weight: torch.Tensor) -> float:
        try:
            return float(measure_weight_scale(weight, name, uses_power_of_two_scales(weight, config)))
        except ValueError:  # W has nan/inf values: its only error
            non_finite.append(name)
            return math.nan

    params = dict(model.named_parameters(remove_duplicate=False))
    converted = weight_scales(model)
    scales = {}
    for path in _merged_weight_files(folder):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                param = params.get(name)
                if param is not None and id(param) in converted and id(param) not in scales:
                    scales[id(param)] = measure(name, weights.get_tensor(name))
    for name, module in unit_scaled_modules(model).items():
        for weight_name in module.unit_scaled_weights:
            weight = getattr(module, weight_name)
            if id(weight) not in scales:
                merged = apply_scale(weight.detach(), module.scale_of(weight_name).to(weight.device))
                scales[id(weight)] = measure(f"{name}.{weight_name}" if name else weight_name, merged)
    if non_finite:
        logger.warning(
            f"{len(non_finite)} saved weight(s) have nan/inf values (e.g. `{non_finite[0]}`): the model card lists "
            "their s as non-finite, and `hf_unitscale.from_pretrained` will refuse to convert them. Save from a good "
            "checkpoint to get a loadable one."
        )
    return scales


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.4g}" if math.isfinite(x) else "non-finite"


def _range(values: list[float | None]) -> str:
    """min … max (median) of the finite values, and how many are not finite."""
    values = [v for v in values if v is not None]
    finite = [v for v in values if math.isfinite(v)]
    non_finite = f"{len(values) - len(finite)} non-finite" if len(finite) < len(values) else ""
    if not finite:
        return non_finite or "–"
    lo, hi = min(finite), max(finite)
    text = _fmt(lo) if lo == hi else f"{_fmt(lo)} … {_fmt(hi)} (median {_fmt(statistics.median(finite))})"
    return f"{text}; {non_finite}" if non_finite else text


def _scale_table(model: nn.Module, scales: dict[int, float]) -> str:
    rows = _scale_rows(model, scales)
    if len(rows) <= MAX_LAYER_ROWS:
        lines = ["| layer | type | s | a (input) | c (output grad) |", "|---|---|---|---|---|"]
        lines += [f"| `{n}` | {k} | {_fmt(s)} | {_fmt(a)} | {_fmt(c)} |" for n, k, s, a, c in rows]
        return "\n".join(lines)
    groups: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for row in rows:
        groups[(re.sub(r"\.\d+(?=\.|$)", ".N", row[0]), row[1])].append(row)
    lines = [
        f"{len(rows)} converted weights, grouped by name pattern (`N` = layer index); ranges are min … max.",
        "",
        "| layers | type | count | s | a (input) | c (output grad) |",
        "|---|---|---|---|---|---|",
    ]
    for (pattern, kind), members in groups.items():
        s, a, c = ([m[i] for m in members] for i in (2, 3, 4))
        lines.append(f"| `{pattern}` | {kind} | {len(members)} | {_range(s)} | {_range(a)} | {_range(c)} |")
    return "\n".join(lines)


def _calibration_text(block: dict, model: nn.Module) -> str:
    calibration = block.get("calibration")
    matmuls = [m for m in unit_scaled_modules(model).values() if isinstance(m, UnitScaledMatmulMixin)]
    calibrated = sum((float(m.input_scale), float(m.grad_scale)) != (1.0, 1.0) for m in matmuls)
    if not calibration and not calibrated:
        return "Not calibrated: every operand scale a, c is 1."
    details = ", ".join(f"{k}: `{v}`" for k, v in (calibration or {}).items()) or "no details recorded"
    return (
        f"Calibrated ({details}); {calibrated} of {len(matmuls)} matmul layers carry {_calibration_rule(calibration)}."
    )


def _calibration_rule(record: dict | None) -> str:
    """What `calibrate` made a and c, from the options it recorded: unit RMS is claimed only where none moved them."""
    if not record:
        return "operand scales a, c other than 1 (how they were set is not recorded)"
    if record.get("input_rounding_search"):
        rule = "scales a within a factor √2 of rms(input), where the forward cast errs least,"
    else:
        rule = "scales a = rms(input)"
    rule += " and c = rms(output gradient) over the non-zero elements of the calibration batches"
    moved = []
    if record.get("grad_underflow_budget") is not None:
        moved.append(
            f"c lowered where needed so that at most a fraction {record['grad_underflow_budget']} of a layer's "
            "non-zero output-gradient elements flush to zero, never so far that the gradient's peak saturates"
        )
    if record.get("headroom") is not None:
        moved.append(
            f"a, c raised where needed to keep each operand's peak at least {record['headroom']}x below its "
            "format's max"
        )
    if not moved:
        if record.get("input_rounding_search"):
            return rule + ", so each low-precision operand's RMS on them was within a factor √2 of 1"
        return rule + ", so each low-precision operand had unit RMS on them"
    return (
        f"{rule}, then {'; '.join(moved)}. Where a scale moved, its operand's RMS is not 1: above 1 where c was "
        "lowered, below 1 where a scale was raised"
    )


def _load_code(architecture: str, repo_id: str, checkpoint_format: str) -> str:
    with_package = (
        "```python\n"
        "import hf_unitscale\n\n"
        f'model = hf_unitscale.from_pretrained("{repo_id}")  # unit-scaled: W = s·Ŵ, same function\n'
        "```"
    )
    if checkpoint_format == "merged":
        without = (
            "Plain transformers loads the merged weights W = s·Ŵ (same outputs in full precision):\n\n"
            "```python\n"
            f"from transformers import {architecture}\n\n"
            f'model = {architecture}.from_pretrained("{repo_id}")\n'
            "```"
        )
    elif checkpoint_format == "compressed-tensors":
        without = (
            "Plain transformers loads it through its compressed-tensors quantizer "
            "(`pip install compressed-tensors`; on CPU the weights are dequantized at load):\n\n"
            "```python\n"
            f"from transformers import {architecture}\n\n"
            f'model = {architecture}.from_pretrained("{repo_id}")\n'
            "```"
        )
    else:
        without = (
            "Plain transformers cannot load this folder (it has no `model.safetensors`, on purpose). Convert it "
            "once to a plain checkpoint:\n\n"
            "```python\n"
            "import hf_unitscale\n\n"
            f'model = hf_unitscale.from_pretrained("{repo_id}")\n'
            'model.save_pretrained("plain-checkpoint")  # merged: W = s·Ŵ, loadable by any transformers\n'
            "```"
        )
    return f"With `hf_unitscale` (any format):\n\n{with_package}\n\nWithout `hf_unitscale`: {without}"


def _scale_text(scales: list[float]) -> str:
    """How s was chosen: rms(W), or a power of two (math.frexp's mantissa of 2^k is ½) for an exact conversion."""
    if scales and all(math.frexp(scale)[0] == 0.5 for scale in scales):
        return "s a power of two, so Ŵ = W/s is exact, and rms(Ŵ) within a factor √2 of 1 at conversion"
    return "s = rms(W), so rms(Ŵ) = 1 at conversion"


# the dtypes of Ŵ each storage dtype holds exactly; e4m3 and int8 rows round any float Ŵ
_EXACT_STORAGE = {"float32": (torch.float32, torch.bfloat16, torch.float16), "bfloat16": (torch.bfloat16,)}


def _storage_rounds(model: nn.Module, weight_dtype: str, embedding_dtype: str | None) -> bool:
    """Whether the unit-scaled format with these dtypes rounds some Ŵ of `model` (embedding tables are stored as
    `embedding_dtype`)."""
    for module in unit_scaled_modules(model).values():
        storage = (embedding_dtype or weight_dtype) if isinstance(module, nn.Embedding) else weight_dtype
        exact = _EXACT_STORAGE.get(storage, ())
        if any(getattr(module, weight).dtype not in exact for weight in module.unit_scaled_weights):
            return True
    return False


def _function_text(model: nn.Module, checkpoint_format: str, weight_dtype: str, embedding_dtype: str | None) -> str:
    """Whether loading the checkpoint gives the converted model's function back, or that its storage rounds Ŵ (no
    figure: what the rounding costs depends on the model and the data)."""
    if checkpoint_format == "compressed-tensors":
        stored = "Ŵ of its linear layers rounded to e4m3"
    elif checkpoint_format == "unit-scaled" and _storage_rounds(model, weight_dtype, embedding_dtype):
        stored = "Ŵ rounded to its storage dtype (below)"
    else:
        return "The model computes the same function as before conversion."
    return (
        f"The converted model computes the same function as before conversion, but this checkpoint stores {stored}, "
        "so the model loaded from it computes an approximation of that function, not the same one: measure the "
        "change on your data before relying on it."
    )


def model_card_section(
    model: nn.Module,
    *,
    checkpoint_format: str,
    weight_dtype: str | None = None,
    embedding_dtype: str | None = None,
    repo_id: str | None = None,
    folder: str | os.PathLike | None = None,
) -> str:
    """The unit-scaling section of the card, between its markers; a merged card lists the s a loader measures from
    the weights saved in `folder` (`_loaded_scales`)."""
    config = model.config
    block = dict(getattr(config, CONFIG_KEY, None) or {})
    if checkpoint_format == "merged":
        scales = _loaded_scales(model, block, folder)
        scales_note = (
            "s is what `hf_unitscale.from_pretrained` measures from the merged W stored here, as `unit_scale` does "
            "(the s Ŵ had before saving is not stored, only W = s·Ŵ); a, c are restored from `config.json`.\n\n"
        )
    else:
        scales, scales_note = weight_scales(model), ""
    # the class being saved, as config.json names it (a model loaded into another head class still has the
    # checkpoint's `architectures` in memory); under FSDP2 the class is `FSDP<Model>` (hub._write_config)
    architecture = type(model).__name__.removeprefix("FSDP")
    repo_id = repo_id or "path/to/this/checkpoint"
    dtype = {"merged": "the model dtype", "compressed-tensors": "e4m3"}.get(
        checkpoint_format, weight_dtype or "float32"
    )
    if checkpoint_format == "unit-scaled" and embedding_dtype not in (None, weight_dtype):
        rows = " with one fp32 scale per row" if embedding_dtype == "int8" else ""
        dtype = f"{dtype}; embedding tables {embedding_dtype}{rows}"
    lr_rule = block.get("lr_rule") or "not recorded (the model was not trained with `UnitScaleTrainer`)"
    precision = ", ".join(f"{k}: `{block.get(k)}`" for k in ("forward_format", "backward_format", "backend"))
    if block.get("forward_format") or block.get("backward_format"):
        kept = block.get("full_precision_modules")
        precision += ", kept in full precision: " + ("the output heads" if kept is None else f"`{kept}`")
    return "\n".join(
        [
            BEGIN,
            "## Unit scaling",
            "",
            f"This `{architecture}` is **unit-scaled** with `hf_unitscale`: every "
            f"converted weight is stored as W = s·Ŵ with {_scale_text(list(scales.values()))}, and its matmuls run as "
            "y = (s·a)·(q(x/a) @ q(Ŵ)ᵀ) + b with static operand scales a (input) and c (output gradient). "
            + _function_text(model, checkpoint_format, weight_dtype or "float32", embedding_dtype),
            "",
            f"- **Checkpoint format:** `{checkpoint_format}` — {_FORMAT_TEXT[checkpoint_format]}",
            f"- **Weight dtype (Ŵ):** {dtype}",
            f"- **Learning-rate rule:** {lr_rule}",
            f"- **Calibration:** {_calibration_text(block, model)}",
            f"- **Matmul precision:** {precision}",
            "",
            "### Per-layer scales",
            "",
            scales_note + _scale_table(model, scales),
            "",
            "### How to load",
            "",
            _load_code(architecture, repo_id, checkpoint_format),
            END,
        ]
    )


def _card_data(
    model: nn.Module,
    data: ModelCardData | None,
    base_model: str | None,
    repo_id: str | None,
    tags: str | list[str] | None,
) -> ModelCardData:
    data = data if data is not None else ModelCardData()
    existing = list(data.tags or [])
    tags = [tags] if isinstance(tags, str) else list(tags or [])  # a str is one tag, as transformers' push_to_hub
    for tag in (*MODEL_CARD_TAGS, *(getattr(model, "model_tags", None) or []), *tags):
        if tag not in existing:
            existing.append(tag)
    data.tags = existing
    data.library_name = data.library_name or "transformers"
    base_model = base_model or _base_model(model.config)
    if base_model and not data.base_model and base_model != repo_id:
        data.base_model = base_model
    return data


def render_model_card(
    model: nn.Module,
    *,
    checkpoint_format: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: str | list[str] | None = None,
    existing: str | None = None,
    **storage: Any,
) -> str:
    """README.md text: `existing` (a card's text) with its metadata completed and its unit-scaling section
    replaced or appended; a new card when `existing` is None. `storage`: `weight_dtype`, `embedding_dtype`,
    `folder` of `model_card_section`."""
    section = model_card_section(model, checkpoint_format=checkpoint_format, repo_id=repo_id, **storage)
    if existing is None or not existing.strip():
        data = None
        title = f"# {repo_id.split('/')[-1]}\n\n" if repo_id else ""
        body = f"{title}{section}\n"
    else:
        card = ModelCard(existing, ignore_metadata_errors=True)
        data, body = card.data, card.text
        if (span := _section_span(body)) is not None:
            body = body[: span[0]] + section + body[span[1] :]
        else:
            body = f"{body.rstrip()}\n\n{section}\n"  # after the other card's title and text
    data = _card_data(model, data, base_model, repo_id, tags)
    return _card_text(data, body)


def _section_span(body: str) -> tuple[int, int] | None:
    """(start, stop) of the unit-scaling section in a card's text, markers included; None if it has none."""
    if BEGIN in body and END in body:
        return body.index(BEGIN), body.index(END) + len(END)
    return None


def _card_text(data: ModelCardData, body: str) -> str:
    metadata = data.to_yaml()
    return f"---\n{metadata}\n---\n\n{body.lstrip()}" if metadata else body.lstrip()


def remove_model_card_section(save_directory: str | os.PathLike) -> None:
    """Drop the unit-scaling section and tags from `save_directory/README.md`, if there is one, keeping the rest:
    for a folder that now holds a plain transformers checkpoint (`hf-unitscale merge`), which the card should
    not describe as unit-scaled."""
    path = Path(save_directory) / "README.md"
    if not path.exists():
        return
    card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    body = card.text
    if (span := _section_span(body)) is not None:
        body = f"{body[: span[0]].rstrip()}\n\n{body[span[1] :].lstrip()}".strip() + "\n"
    card.data.tags = [tag for tag in card.data.tags or [] if tag not in MODEL_CARD_TAGS] or None
    path.write_text(_card_text(card.data, body), encoding="utf-8")


def update_model_card(model: nn.Module, save_directory: str | os.PathLike, **card_options: Any) -> Path:
    """Write `save_directory/README.md`, merging into a card already there (whoever wrote it);
    `card_options` are those of `render_model_card` (`checkpoint_format`, `repo_id`, `tags`, ...).

    For `UnitScaleTrainer.create_model_card`: call the parent (it writes the training summary), then this.
    """
    path = Path(save_directory) / "README.md"
    existing = path.read_text(encoding="utf-8") if path.exists() else None
    path.write_text(
        render_model_card(model, existing=existing, folder=save_directory, **card_options), encoding="utf-8"
    )
    return path
