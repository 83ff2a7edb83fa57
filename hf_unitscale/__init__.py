"""hf_unitscale: unit scaling for pretrained Hugging Face models.

`unit_scale(model)` rewrites every weight W as s·Ŵ (Ŵ unit-RMS and trainable under W's name, s a
stored scalar) without changing what the model computes.
"""

__version__ = "0.1.0"

from .config import UnitScaleConfig  # noqa: E402
from .convert import is_unit_scaled, merge_unit_scale, unit_scale, unit_scaled_modules  # noqa: E402
from .hub import from_pretrained, save_pretrained  # noqa: E402

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
]
