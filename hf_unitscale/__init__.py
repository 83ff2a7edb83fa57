"""hf_unitscale: unit scaling for pretrained Hugging Face models.

`unit_scale(model)` rewrites every weight W as s·Ŵ (Ŵ unit-RMS and trainable under W's name, s a
stored scalar) without changing what the model computes; `UnitScaleTrainer` (and
`UnitScaleSeq2SeqTrainer`) fine-tunes it with per-group learning rates; `calibrate` + `set_precision`
run its matmuls in FP8 with static scales.
"""

__version__ = "0.1.0"

from .arguments import UnitScaleSeq2SeqTrainingArguments, UnitScaleTrainingArguments  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .config import UnitScaleConfig  # noqa: E402
from .convert import is_unit_scaled, merge_unit_scale, unit_scale, unit_scaled_modules  # noqa: E402
from .hub import from_pretrained, save_pretrained  # noqa: E402
from .lr_rules import LR_RULES, ROLES, build_param_groups, check_param_groups, parameter_roles  # noqa: E402
from .precision import cast_statistics, set_precision, track_casts  # noqa: E402
from .trainer import UnitScaleSeq2SeqTrainer, UnitScaleTrainer  # noqa: E402

__all__ = [
    # conversion
    "UnitScaleConfig",
    "is_unit_scaled",
    "merge_unit_scale",
    "unit_scale",
    "unit_scaled_modules",
    # checkpoints
    "from_pretrained",
    "save_pretrained",
    # learning-rate rules
    "LR_RULES",
    "ROLES",
    "build_param_groups",
    "check_param_groups",
    "parameter_roles",
    # training
    "UnitScaleSeq2SeqTrainer",
    "UnitScaleSeq2SeqTrainingArguments",
    "UnitScaleTrainer",
    "UnitScaleTrainingArguments",
    # low precision
    "calibrate",
    "cast_statistics",
    "set_precision",
    "track_casts",
]
