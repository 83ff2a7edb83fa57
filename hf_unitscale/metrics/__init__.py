"""`evaluate` metric scripts shipped with the package, loaded by path so no Hub access is needed.

metric = load_metric("accuracy")      # evaluate.load(<package>/metrics/accuracy/accuracy.py)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["METRICS", "load_metric", "metric_path"]

_ROOT = Path(__file__).resolve().parent
METRICS = ("accuracy", "f1")


def metric_path(name: str) -> Path:
    """Path of the metric script `name` (one of `METRICS`)."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; the shipped metrics are {list(METRICS)}.")
    return _ROOT / name / f"{name}.py"


def load_metric(name: str, **kwargs):
    """`evaluate.load` of the shipped metric `name`; a name that is not shipped is passed to `evaluate.load` as is
    (a path, or a Hub metric when online)."""
    import evaluate

    path = metric_path(name) if name in METRICS else name
    return evaluate.load(str(path), **kwargs)
