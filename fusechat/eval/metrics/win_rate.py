"""Reward-model win rate of a model against a baseline on the same prompts, in percent.

A metric script for `evaluate.load(path)`; `evaluate` copies it into its module cache and imports
it, which needs one import per line.
"""

import datasets
import evaluate

_DESCRIPTION = "Percentage of prompts where the model's response out-scores the baseline's; ties count half."
_KWARGS = """
Args:
    predictions (list[float]): the reward of the model's response to each prompt.
    references (list[float]): the reward of the baseline's response to the same prompt.
Returns:
    win_rate (float): 100 * (wins + ties / 2) / prompts; nan for no prompts.
    wins, ties, losses (int)
"""


class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        wins = sum(p > r for p, r in zip(predictions, references))
        ties = sum(p == r for p, r in zip(predictions, references))
        n = len(predictions)
        rate = 100.0 * (wins + ties / 2) / n if n else float("nan")
        return {"win_rate": rate, "wins": int(wins), "ties": int(ties), "losses": int(n - wins - ties)}
