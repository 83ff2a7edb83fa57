"""hf_unitscale: unit scaling for pretrained Hugging Face models."""

from .config import UnitScaleConfig
from .convert import is_unit_scaled, merge_unit_scale, unit_scale, unit_scaled_modules

__all__ = [
    # conversion
    "UnitScaleConfig",
    "is_unit_scaled",
    "merge_unit_scale",
    "unit_scale",
    "unit_scaled_modules",
]

__version__ = "0.1.0"
