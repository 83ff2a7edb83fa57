"""Accuracy as an `evaluate` metric script, shipped with hf_unitscale so it loads offline:

evaluate.load(str(hf_unitscale.metrics.metric_path("accuracy")))

accuracy = (1/N) Σ w_i·[prediction_i = reference_i] / mean(w)   (w = sample_weight, default 1)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to their reference label, optionally weighted by sample_weight."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) or, if False, the number of correct predictions.
    sample_weight (list of float): per-example weights (default: all 1).
Returns:
    accuracy (float): in [0, 1] when normalize is True.
Example:
    >>> metric = evaluate.load("hf_unitscale/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                "`predictions` and `references` should have the same length, got "
                f"{len(predictions)} and {len(references)}."
            )
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        correct = float(np.sum(weights * (predictions == references)))
        return {"accuracy": correct / float(np.sum(weights)) if normalize else correct}
