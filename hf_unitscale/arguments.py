"""`UnitScaleTrainingArguments`: `TrainingArguments` plus the unit-scaling options;
`UnitScaleSeq2SeqTrainingArguments`: the same on `Seq2SeqTrainingArguments`.

Every field carries its help text, so `HfArgumentParser` builds the command-line flags and reads
JSON and YAML files. `lr_multipliers` and `role_overrides` are mappings, which argparse cannot type: like
`lr_scheduler_kwargs` they take a JSON string on the command line
(`--lr_multipliers '{"classifier": 10}'`) and a plain mapping in JSON/YAML files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import logging

from .calibrate import check_headroom
from .config import check_module_patterns
from .formats import FP8_FORMAT_PAIRS, get_format
from .lr_rules import LR_RULES, ROLES, LrRule, check_lr_multipliers, check_role_overrides
from .ops import check_backend

__all__ = [
    "UnitScaleSeq2SeqTrainingArguments",
    "UnitScaleTrainingArguments",
    "deepspeed_optimizer_error",
    "unit_scale_options",
]

logger = logging.get_logger(__name__)

# the `checkpoint.CHECKPOINT_FORMATS` that `save_model` and `push_to_hub` write (a test keeps them a subset)
SaveFormat = Literal["merged", "unit-scaled"]
SAVE_FORMATS: tuple[str, ...] = get_args(SaveFormat)


@dataclass
class UnitScaleTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the learning-rate rule and FP8 options of `UnitScaleTrainer`."""

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "lr_multipliers", "role_overrides"]

    lr_rule: LrRule = field(
        default="equivalent",
        metadata={
            "help": "Per-group learning-rate rule: `equivalent` (exactly plain AdamW on W: lr = η/s, eps = s·ε, "
            "weight_decay = s·wd per weight), `umup` (u-μP: hidden η·fan_in^-½, embedding η·d_model^-½) or `mup` "
            "(μP: matrix-like η/width_mult). See `hf_unitscale.lr_rules`."
        },
    )
    mup_base_width: int | None = field(
        default=None,
        metadata={"help": "Base width (hidden size) for `lr_rule=mup`: width_mult = hidden_size / mup_base_width."},
    )
    umup_depth_scaling: bool = field(
        default=False,
        metadata={
            "help": "With `lr_rule=umup`, also multiply the lr of every tensor inside the L repeated blocks by L^-½. "
            "Off by default: the pretrained forward has no 1/√L residual multipliers."
        },
    )
    lr_multipliers: dict | str | None = field(
        default=None,
        metadata={
            "help": "Learning-rate multipliers applied last, as {regex over parameter names: factor} "
            "(re.search; every matching pattern multiplies). A JSON string on the command line: '{\"classifier\": 10}'."
        },
    )
    role_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": f"Learning-rate roles for parameters the automatic roles miss or misjudge, as {{regex over "
            f"parameter names: role}} with roles {', '.join(ROLES)} (re.fullmatch: a pattern matches whole names; the "
            'first matching pattern wins). A JSON string on the command line: \'{".*sinks": "bias"}\'.'
        },
    )
    fp8: bool = field(
        default=False,
        metadata={"help": "Train with FP8 matmuls (formats: `fp8_format`) using calibrated static scales."},
    )
    fp8_format: str = field(
        default="HYBRID",
        metadata={
            "help": "With `fp8`, the operand formats, named as accelerate's `fp8_format` (any case): 'HYBRID' (E4M3 "
            "forward, E5M2 output gradients) or 'E4M3' (E4M3 for both; pair it with `calibration_headroom`, as "
            "E4M3's max is 448)."
        },
    )
    fp8_full_precision_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "With `fp8`, regular expressions over module names (re.fullmatch) of matmul layers kept in full "
            "precision. Default: the output heads (LM head, classifier, …). An empty list casts every layer (on the "
            "command line: `--fp8_full_precision_modules '[]'`)."
        },
    )
    fp8_backend: str | None = field(
        default=None,
        metadata={
            "help": "With `fp8`, the GEMM backend (any case): 'simulate' (cast to FP8 and back, fp32 matmul; every "
            "device) or 'scaled_mm' (`torch._scaled_mm`: FP8 tensor cores on GPUs of compute capability 8.9+; CPU in "
            "recent torch). None: the model's own (`unit_scaling.backend`, default 'simulate')."
        },
    )
    fp8_eval: bool = field(
        default=True,
        metadata={
            "help": "With `fp8`, run evaluation and prediction with the FP8 matmuls the model trains with (True), or "
            "with every matmul in full precision (False): the function the merged export computes when served in "
            "fp32/bf16."
        },
    )
    calibration_batches: int = field(
        default=4,
        metadata={"help": "With `fp8`, the number of training batches the calibration pass measures a, c over."},
    )
    recalibrate_every: int = field(
        default=0,
        metadata={"help": "With `fp8`, recalibrate the static scales every this many optimizer steps (0: never)."},
    )
    calibration_headroom: float | None = field(
        default=None,
        metadata={
            "help": "With `fp8`, keep every calibrated operand's largest element at least this factor (finite, "
            ">= 1, typically 2 to 16) below its format's max (E4M3 448, E5M2 57344) by raising its scale where "
            "needed; at most the format's max/smallest subnormal (E4M3 229376), past which every element rounds to "
            "0 or ±its smallest subnormal. None: a = rms(x), c = rms(g)."
        },
    )
    calibration_grad_underflow_budget: float | None = field(
        default=None,
        metadata={
            "help": "With `fp8`, lower a layer's gradient scale c from rms(g) where its cast would flush more than "
            "this fraction of the non-zero output-gradient elements to zero (e.g. 1e-4), never so far that the peak "
            "comes within `calibration_headroom` (or 1) of the format's max; None: c is not lowered."
        },
    )
    calibration_input_rounding_search: bool = field(
        default=False,
        metadata={
            "help": "With `fp8`, choose each input scale a within a factor sqrt(2) of rms(x) to minimize x's "
            "forward-format rounding error on the calibration batches (helps where outlier features repeat "
            "from token to token, as in Llama models); False: a = rms(x)."
        },
    )

    save_format: SaveFormat = field(
        default="merged",
        metadata={
            "help": "Format of `save_model()` and `push_to_hub()`: `merged` (a plain transformers checkpoint W = s·Ŵ) "
            "or `unit-scaled` (Ŵ, s, a, c; needs hf_unitscale to load). Checkpoints written during training are "
            "always unit-scaled, so resuming is exact."
        },
    )

    def __post_init__(self) -> None:
        _check_option_types(self)
        self.lr_multipliers = _from_json("lr_multipliers", self.lr_multipliers, "factor", '{"classifier": 10}')
        if self.lr_multipliers is not None:
            self.lr_multipliers = check_lr_multipliers(self.lr_multipliers)
        self.role_overrides = _from_json("role_overrides", self.role_overrides, "role", '{".*sinks": "bias"}')
        if self.role_overrides is not None:
            self.role_overrides = check_role_overrides(self.role_overrides)
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"`lr_rule` must be one of {LR_RULES}, got {self.lr_rule!r}.")
        if self.lr_rule == "mup" and (self.mup_base_width is None or self.mup_base_width <= 0):
            raise ValueError(
                "`lr_rule='mup'` needs `mup_base_width` (the hidden size the lr was tuned at), got "
                f"{self.mup_base_width!r}."
            )
        self.fp8_format = self.fp8_format.upper()  # names as accelerate's, of any case, like `fp8_backend`'s
        if self.fp8_format not in FP8_FORMAT_PAIRS:
            raise ValueError(f"`fp8_format` must be one of {sorted(FP8_FORMAT_PAIRS)}, got {self.fp8_format!r}.")
        if self.fp8_full_precision_modules in ("[]", ["[]"]):  # the command line's empty list: no regex reads so
            self.fp8_full_precision_modules = []
        self.fp8_full_precision_modules = check_module_patterns(
            self.fp8_full_precision_modules, "fp8_full_precision_modules"
        )
        if self.fp8_backend is not None:
            self.fp8_backend = self.fp8_backend.lower()
            check_backend(self.fp8_backend, "fp8_backend")
        if self.calibration_batches < 1:
            raise ValueError(f"`calibration_batches` should be a positive integer, got {self.calibration_batches}.")
        if self.save_format not in SAVE_FORMATS:
            raise ValueError(f"`save_format` must be one of {SAVE_FORMATS}, got {self.save_format!r}.")
        if self.recalibrate_every < 0:
            raise ValueError(f"`recalibrate_every` should be 0 (never) or positive, got {self.recalibrate_every}.")
        check_headroom(  # against the formats only where they are used
            self.calibration_headroom,
            "calibration_headroom",
            formats=[get_format(name) for name in FP8_FORMAT_PAIRS[self.fp8_format]] if self.fp8 else (),
        )
        budget = self.calibration_grad_underflow_budget
        if budget is not None and not 0 <= budget < 1:
            raise ValueError(
                f"`calibration_grad_underflow_budget` should be a fraction in [0, 1) or None, got {budget}."
            )
        if not self.fp8:
            _warn_about_ignored_fp8_options(self)
        if self.fp8 and self.fp16:
            raise ValueError(
                "`fp8=True` with `fp16=True`: fp16's GradScaler multiplies the loss by up to 2^16 after calibration "
                "measured c, and the FP8 casts saturate instead of overflowing, so the scaler never sees an inf and "
                "gradients clip silently. Use `bf16=True` (no loss scaling) or full precision with `fp8=True`."
            )
        # before TrainingArguments builds a DeepSpeed config (which needs deepspeed installed)
        error = deepspeed_optimizer_error(self.deepspeed)
        if error:
            raise ValueError(error)
        super().__post_init__()


@dataclass
class UnitScaleSeq2SeqTrainingArguments(UnitScaleTrainingArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`, `generation_num_beams`,
    `generation_config`, …) with the options of `UnitScaleTrainingArguments`, for `UnitScaleSeq2SeqTrainer`.

    The fields of both; validation runs `UnitScaleTrainingArguments.__post_init__`, then `TrainingArguments`'s;
    `to_dict` is `Seq2SeqTrainingArguments`' (a `GenerationConfig` becomes a dict).
    """


def _check_option_types(args: UnitScaleTrainingArguments) -> None:
    """Refuse an option of the wrong Python type, naming it. The command line and YAML/JSON files give typed values;
    Python code may pass a string such as "no", which as a bool would mean True."""
    for name, types in _OPTION_TYPES.items():
        value = getattr(args, name)
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            names = " or ".join("None" if t is _NULL else t.__name__ for t in types)
            hint = " (True or False; true/false on the command line and in YAML/JSON files)" if bool in types else ""
            raise TypeError(f"`{name}` must be {names}{hint}, got {type(value).__name__} {value!r}.")


def _warn_about_ignored_fp8_options(args: UnitScaleTrainingArguments) -> None:
    """Name the FP8 options set away from their defaults that `fp8=False` ignores (a forgotten `fp8=True`)."""
    fields = UnitScaleTrainingArguments.__dataclass_fields__
    ignored = [f"{name}={getattr(args, name)!r}" for name in _FP8_FIELDS if getattr(args, name) != fields[name].default]
    if ignored:
        logger.warning(
            f"`fp8=False` ignores the FP8 option(s) {', '.join(ignored)}: training runs in full precision. They take "
            "effect with `fp8=True`."
        )


def _from_json(name: str, value: Any, meaning: str, example: str) -> Any:
    """A mapping field's value: a JSON string (the command line) parsed, "" as None, anything else as it is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"`{name}` must be a JSON object of regex → {meaning}, e.g. '{example}'; could not parse {value!r}: {err}."
        ) from None


def deepspeed_optimizer_error(deepspeed: dict | str | None) -> str | None:
    """The error for a DeepSpeed config that brings its own optimizer (which would drop the groups), else None."""
    if deepspeed is None:
        return None
    config = deepspeed
    if isinstance(config, str):
        if not os.path.isfile(config):
            return None  # TrainingArguments reports a missing file
        with open(config) as f:
            config = json.load(f)
    if isinstance(config, dict) and "optimizer" in config:
        return (
            "The DeepSpeed config defines its own `optimizer`, which would replace UnitScaleTrainer's per-group "
            "learning rates (lr = η/s, eps = s·ε per unit-scaled weight) with one group and silently change training. "
            "Remove the `optimizer` block from the DeepSpeed config: DeepSpeed then wraps the optimizer "
            "UnitScaleTrainer builds."
        )
    return None


def unit_scale_options(args: TrainingArguments) -> dict[str, Any]:
    """The unit-scaling options of `args`; defaults when `args` is a plain `TrainingArguments`."""
    defaults = {f: UnitScaleTrainingArguments.__dataclass_fields__[f].default for f in _OPTION_FIELDS}
    return {name: getattr(args, name, default) for name, default in defaults.items()}


_NULL = type(None)
# the Python types of the options whose values are not checked against a list of choices
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "mup_base_width": (int, _NULL),
    "umup_depth_scaling": (bool,),
    "fp8": (bool,),
    "fp8_format": (str,),
    "fp8_backend": (str, _NULL),
    "fp8_eval": (bool,),
    "calibration_batches": (int,),
    "recalibrate_every": (int,),
    "calibration_headroom": (float, int, _NULL),
    "calibration_grad_underflow_budget": (float, int, _NULL),
    "calibration_input_rounding_search": (bool,),
}
# the options only `fp8=True` reads
_FP8_FIELDS = (
    "fp8_format",
    "fp8_full_precision_modules",
    "fp8_backend",
    "fp8_eval",
    "calibration_batches",
    "recalibrate_every",
    "calibration_headroom",
    "calibration_grad_underflow_budget",
    "calibration_input_rounding_search",
)
_OPTION_FIELDS = (
    "lr_rule",
    "mup_base_width",
    "umup_depth_scaling",
    "lr_multipliers",
    "role_overrides",
    "fp8",
    *_FP8_FIELDS,
    "save_format",
)
