"""hf_unitscale: unit scaling for pretrained Hugging Face models.

`unit_scale(model)` rewrites every weight W as s·Ŵ (Ŵ unit-RMS and trainable under W's name, s a
stored scalar) without changing what the model computes; `UnitScaleTrainer` (and
`UnitScaleSeq2SeqTrainer`) fine-tunes it with per-group learning rates; `calibrate` + `set_precision`
run its matmuls in FP8 with static scales.

The names below are imported on first use (PEP 562, as transformers' `_LazyModule` does): `import hf_unitscale`
loads neither torch nor `transformers.Trainer` (with datasets, pandas, pyarrow), so that `hf-unitscale --help`
and a script that needs one submodule start in a fraction of a second.
"""

import importlib as _importlib
import pkgutil as _pkgutil
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the submodule that defines it
_SUBMODULE_OF = {
    **dict.fromkeys(["UnitScaleSeq2SeqTrainingArguments", "UnitScaleTrainingArguments"], "arguments"),
    "calibrate": "calibrate",
    "UnitScaleConfig": "config",
    **dict.fromkeys(["is_unit_scaled", "merge_unit_scale", "unit_scale", "unit_scaled_modules"], "convert"),
    **dict.fromkeys(["from_pretrained", "save_pretrained"], "hub"),
    **dict.fromkeys(["LR_RULES", "ROLES", "build_param_groups", "check_param_groups", "parameter_roles"], "lr_rules"),
    **dict.fromkeys(["cast_statistics", "set_precision", "track_casts"], "precision"),
    **dict.fromkeys(["UnitScaleSeq2SeqTrainer", "UnitScaleTrainer"], "trainer"),
}

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

if TYPE_CHECKING:  # type checkers and IDEs see the names statically
    from .arguments import UnitScaleSeq2SeqTrainingArguments, UnitScaleTrainingArguments
    from .calibrate import calibrate
    from .config import UnitScaleConfig
    from .convert import is_unit_scaled, merge_unit_scale, unit_scale, unit_scaled_modules
    from .hub import from_pretrained, save_pretrained
    from .lr_rules import LR_RULES, ROLES, build_param_groups, check_param_groups, parameter_roles
    from .precision import cast_statistics, set_precision, track_casts
    from .trainer import UnitScaleSeq2SeqTrainer, UnitScaleTrainer


if not TYPE_CHECKING:  # a type checker sees the imports above, and flags a misspelled name

    def __getattr__(name: str):
        """Import the submodule that defines the public `name` and cache the name here; or, for the name of a
        submodule (`hf_unitscale.embedded`, `hf_unitscale.hub`), that submodule, as the eager imports made it."""
        if name in _SUBMODULE_OF:
            value = getattr(_importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
            globals()[name] = value
            return value
        if name in {module.name for module in _pkgutil.iter_modules(__path__)}:
            return _importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """This package's module type. The import system binds a submodule on its package when it is first imported,
    which would make `hf_unitscale.calibrate` the submodule `calibrate.py` once any module had imported it, instead
    of the function `calibrate` it defines; a public name defined in its namesake submodule keeps the name."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, _types.ModuleType) and _SUBMODULE_OF.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
