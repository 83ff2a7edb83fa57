"""`UnitScaleConfig`: how a model is converted, stored as the `unit_scaling` block of `config.json`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .formats import FORMATS, get_format
from .ops import BACKENDS, MatmulPrecision, check_backend

__all__ = ["CONFIG_KEY", "UnitScaleConfig", "as_unit_scale_config", "check_module_patterns"]

CONFIG_KEY = "unit_scaling"
_NULL = type(None)
# the types each scalar option takes
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "convert_other_modules": (bool,),
    "power_of_two_scales": (bool, _NULL),
    "forward_format": (str, _NULL),
    "backward_format": (str, _NULL),
    "backend": (str,),
    "calibration": (dict, _NULL),
    "lr_rule": (str, _NULL),
}
_NUMBER = (int, float)
# the types of the entries `calibrate` records in `calibration` (how a, c were measured); other entries (another
# version's, or details a user adds, such as the dataset) are kept as they are
_CALIBRATION_TYPES: dict[str, tuple[type, ...]] = {
    "num_batches": (int,),
    "num_tokens": (int,),
    "statistic": (str,),
    "loss": (str,),
    "loss_scale": _NUMBER,
    "headroom": (*_NUMBER, _NULL),
    "grad_underflow_budget": (*_NUMBER, _NULL),
    "input_rounding_search": (bool,),
    "precision": (str,),
    "mode": (str,),
}


@dataclass
class UnitScaleConfig:
    """Options of `unit_scale(model, config)`.

    Every weight W of an `nn.Linear`, transformers `Conv1D` or `nn.Embedding` (and, with
    `convert_other_modules`, every ≥2-D parameter of other modules, e.g. `nn.LSTM`, `nn.Conv2d`)
    becomes s·Ŵ with s = rms(W), rms(Ŵ) = 1. Gains and biases stay as they are, whatever their shape
    (`gains.py`: a layer scale stored (c, 1, 1) as a 1-D one). With
    `power_of_two_scales`, s = 2^round(log₂ rms(W)) instead, so rms(Ŵ) is within a factor √2 of 1
    and Ŵ = W/s is exact in every float dtype: conversion and the merged export W = s·Ŵ lose no bit.
    """

    exclude_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Regular expressions of modules to leave unconverted, with everything inside them (`bert.pooler` "
            "excludes `bert.pooler.dense`). Each must match a whole module name (re.fullmatch): unlike peft's "
            "`exclude_modules`, `pooler.dense` does not match `bert.pooler.dense`; write `.*pooler\\.dense` for every "
            "module whose name ends so. A pattern matching no module is an error. A weight tied across the boundary "
            "(an excluded `lm_head` tied to a converted embedding) is too. null: none, as []."
        },
    )
    convert_other_modules: bool = field(
        default=True,
        metadata={
            "help": "Also convert ≥2-D weights of other modules (LSTM, Conv2d, …) by multiplying s in at forward; "
            "their biases and gains (layer scales, of any shape) stay as they are."
        },
    )
    power_of_two_scales: bool | None = field(
        default=None,
        metadata={
            "help": "Round each s to the nearest power of two, so Ŵ = W/s and the merged W = s·Ŵ are exact and "
            "rms(Ŵ) is within a factor √2 of 1. null: only for weights stored in 16-bit floats (bf16/fp16), where "
            "s = rms(W) would round a fraction of the weights by one ulp (one bf16 ulp is 0.4–0.8%). Off for fp32 "
            "weights by default: weights dequantized from a low-bit checkpoint keep their grid under a power of two, "
            "and the E4M3 forward rounds some exactly half-way (see the README's FP8 section)."
        },
    )
    forward_format: str | None = field(
        default=None,
        metadata={"help": f"Format of forward GEMM operands (x/a and Ŵ): one of {sorted(FORMATS)} or null for none."},
    )
    backward_format: str | None = field(
        default=None,
        metadata={"help": f"Format of the output-gradient GEMM operand g/c: one of {sorted(FORMATS)} or null."},
    )
    backend: str = field(
        default="simulate",
        metadata={"help": f"GEMM backend for low-precision formats: one of {BACKENDS}."},
    )
    full_precision_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions over module names (re.fullmatch) of converted matmul layers that keep the "
            "full-precision path when formats are set; null: the output heads (LM head, classifier, …). [] casts "
            "every layer."
        },
    )
    calibration: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Set by calibration: how the static operand scales a, c were measured (the record `calibrate` "
            "writes: num_batches, num_tokens, loss, headroom, …)."
        },
    )
    lr_rule: str | None = field(
        default=None,
        metadata={
            "help": "Set by UnitScaleTrainer: the learning-rate rule the model was trained with ('equivalent', "
            "'umup' or 'mup')."
        },
    )

    def __post_init__(self) -> None:
        # a wrong type must not pass as truthy ("no" would convert other modules) or fail later, far from here
        for option, types in _SCALAR_TYPES.items():
            value = getattr(self, option)
            if not isinstance(value, types):
                names = " or ".join("None" if t is _NULL else t.__name__ for t in types)
                raise TypeError(f"`{option}` must be {names}, got {type(value).__name__} {value!r}.")
        for name in ("forward_format", "backward_format"):  # stored as `formats.FORMATS` names them ("E4M3": "e4m3")
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, get_format(value).name)
                except ValueError as err:
                    raise ValueError(f"`{name}`: {err}") from None
        check_backend(self.backend)
        self._check_recorded_options()
        if self.exclude_modules is None:
            self.exclude_modules = []
        for option in ("exclude_modules", "full_precision_modules"):
            setattr(self, option, check_module_patterns(getattr(self, option), option))
        _ = self.precision  # validates the format/backend combination

    def _check_recorded_options(self) -> None:
        """`lr_rule` and `calibration` are recorded by the library (UnitScaleTrainer, `calibrate`): refuse values it
        never writes, which the model card would show as the model's history."""
        from .lr_rules import LR_RULES  # lr_rules imports convert, which imports this module

        if self.lr_rule is not None and self.lr_rule not in LR_RULES:
            raise ValueError(
                f"`lr_rule` records the rule UnitScaleTrainer trained with: one of {LR_RULES} or None, got "
                f"{self.lr_rule!r}."
            )
        record = self.calibration
        if record is None:
            return
        if not all(isinstance(key, str) for key in record):  # config.json would turn them into strings
            raise TypeError(f"`calibration` (recorded by `calibrate`) must have str keys, got {record!r:.120}.")
        for key, types in _CALIBRATION_TYPES.items():
            value = record.get(key)
            if key in record and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
                names = " or ".join("None" if t is _NULL else t.__name__ for t in types)
                raise TypeError(
                    f"`calibration.{key}` (recorded by `calibrate`) must be {names}, got {type(value).__name__} "
                    f"{value!r}."
                )

    @property
    def precision(self) -> MatmulPrecision | None:
        """The GEMM precision converted matmul layers run with; None is the full-precision path."""
        if self.forward_format is None and self.backward_format is None:
            return None
        fmt = lambda name: None if name is None else get_format(name)  # noqa: E731
        return MatmulPrecision(fmt(self.forward_format), fmt(self.backward_format), self.backend)

    def is_excluded(self, module_name: str) -> bool:
        """Whether a pattern of `exclude_modules` matches the whole `module_name` (re.fullmatch)."""
        return any(re.fullmatch(pattern, module_name) for pattern in self.exclude_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UnitScaleConfig:
        """Build from a dict, naming any unknown key (a typo must not silently become a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown UnitScaleConfig option(s) {unknown}; valid options are {sorted(known)}.")
        return cls(**values)


def check_module_patterns(patterns: Any, option: str) -> list[str] | None:
    """`patterns` as a list of regular expressions over module names (a str is one, as peft's `target_modules` takes
    it; None stays None); an error naming `option` for another type or an entry that does not compile."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is None:
        return None
    if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`{option}` must be a list of regular expressions over module names (str), got "
            f"{type(patterns).__name__} {patterns!r}."
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{option}` entry {pattern!r} is not a regular expression: {err}.") from None
    return list(patterns)


def as_unit_scale_config(value: UnitScaleConfig | dict[str, Any] | None, argument: str) -> UnitScaleConfig | None:
    """`value` as a `UnitScaleConfig`: itself, built from its dict (as config.json's block stores it), or None; an
    error naming `argument` for anything else (a model name or path is not a config)."""
    if value is None or isinstance(value, UnitScaleConfig):
        return value
    if isinstance(value, dict):
        return UnitScaleConfig.from_dict(value)
    raise TypeError(
        f"`{argument}` must be a UnitScaleConfig or its dict (config.json's `{CONFIG_KEY}` block), got "
        f"{type(value).__name__} {value!r:.80}."
    )
