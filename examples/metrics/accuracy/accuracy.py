"""Accuracy: the fraction of predictions that equal their reference label.

A local `evaluate` metric, so that the examples run offline. Load it by path, never from the Hub:

    metric = evaluate.load("examples/metrics/accuracy")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.666...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions: (number correct) / (number of examples).
With `sample_weight`, each example counts with its weight; with `normalize=False`, the (weighted) count of correct
predictions is returned instead of the proportion.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground-truth labels.
    normalize (`bool`, defaults to `True`): Return the proportion of correct predictions; `False` returns the count.
    sample_weight (`list` of `float`, *optional*): Weight of each example; defaults to 1 for every example.

Returns:
    accuracy (`float`): In [0, 1] with `normalize=True`, else the (weighted) number of correct predictions.

Examples:
    >>> metric = evaluate.load("examples/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 3], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"`predictions` and `references` must have the same length, got {predictions.shape[0]} and "
                f"{references.shape[0]}."
            )
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"`sample_weight` must have one weight per example, got {weights.shape[0]}.")
        total = float(np.sum(correct * weights))
        if normalize:
            denominator = float(np.sum(weights))
            total = total / denominator if denominator > 0 else 0.0
        return {"accuracy": total}
