"""F1 score as an `evaluate` metric script, shipped with hf_unitscale so it loads offline:

    evaluate.load(str(hf_unitscale.metrics.metric_path("f1")))

Per class k: precision_k = TP_k/(TP_k+FP_k), recall_k = TP_k/(TP_k+FN_k),
F1_k = 2·TP_k / (2·TP_k + FP_k + FN_k) (0 when the denominator is 0). `average="binary"` reports
F1 of `pos_label`; "macro" the mean over classes; "micro" pools TP/FP/FN over classes; "weighted"
weights F1_k by the number of references of class k.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Harmonic mean of precision and recall: F1 = 2·TP / (2·TP + FP + FN)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str): "binary" (default), "macro", "micro" or "weighted".
    pos_label (int): the positive class for average="binary" (default 1).
    labels (list of int): classes to average over (default: all that occur).
Returns:
    f1 (float): in [0, 1].
Example:
    >>> metric = evaluate.load("hf_unitscale/metrics/f1")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""

AVERAGES = ("binary", "macro", "micro", "weighted")


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        if average not in AVERAGES:
            raise ValueError(f"`average` should be one of {AVERAGES}, got {average!r}.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                "`predictions` and `references` should have the same length, got "
                f"{len(predictions)} and {len(references)}."
            )
        if average == "binary":
            classes = [pos_label]
        else:
            classes = (
                list(labels) if labels is not None else sorted(set(references.tolist()) | set(predictions.tolist()))
            )
        counts = [
            (
                float(np.sum((predictions == k) & (references == k))),
                float(np.sum((predictions == k) & (references != k))),
                float(np.sum((predictions != k) & (references == k))),
            )
            for k in classes
        ]
        if average == "micro":
            tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
            return {"f1": _f1(tp, fp, fn)}
        scores = [_f1(*c) for c in counts]
        if average == "weighted":
            support = np.array([np.sum(references == k) for k in classes], dtype=np.float64)
            return {"f1": float(np.dot(scores, support) / support.sum()) if support.sum() else 0.0}
        return {"f1": float(np.mean(scores)) if scores else 0.0}
