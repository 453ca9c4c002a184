"""Accuracy of verdicts: the share of responses a checker accepted, in percent.

A metric script for `evaluate.load(path)`; `evaluate` copies it into its module cache and imports
it, which needs one import per line.
"""

import datasets
import evaluate

_DESCRIPTION = "Percentage of predictions equal to their references (1 = the checker accepted the response)."
_KWARGS = """
Args:
    predictions (list[int]): 1 for a response the checker accepted, else 0.
    references (list[int]): 1 for every row (the verdict every response should earn).
Returns:
    accuracy (float): 100 * mean(predictions == references); nan for no rows.
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"accuracy": float("nan")}
        hits = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": 100.0 * hits / len(predictions)}
