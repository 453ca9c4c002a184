"""Verdicts on responses, through the score stage's checkers.

Math and code go through `fusechat.scoring.checks.Checkers` built from the recipe, the object the
score stage uses: math-verify in killable worker processes against the gold answer; pyflakes, then
the tests in the sandbox with the recipe's isolation, limits and workers, after the item's prelude.
Rows with one exact answer (the demo world's instruction and Chinese rows) go through
`fusechat.scoring.checks.exact_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusechat.eval.sets import Item, response_code
from fusechat.recipe import Recipe
from fusechat.scoring.checks import Checkers, exact_answer
from fusechat.tables import RIGHT, WRONG

# a benchmark counts only a verified answer: a checker's timeout or error is not correct either
CORRECT = tuple(status for statuses in RIGHT.values() for status in statuses)
# the exact check's verdicts, in the math checker's words
EXACT_RIGHT, EXACT_WRONG = RIGHT["math"][0], WRONG["math"][0]


@dataclass
class Verdict:
    status: str  # none | correct | incorrect | unparseable | timeout | error | pass | fail
    detail: str = ""

    @property
    def correct(self) -> bool | None:
        return None if self.status == "none" else self.status in CORRECT


def check_all(recipe: Recipe, pairs: list[tuple[Item, str]], progress=None,
              checkers: Checkers | None = None) -> list[Verdict]:
    """(item, response text) -> verdicts, in order; `progress()` once per pair.

    `checkers`: the caller's (kept open, e.g. to read its sandbox report); else one for this call.
    """
    out: list[Verdict | None] = [None] * len(pairs)
    math_idx = [i for i, (item, _) in enumerate(pairs) if item.check == "math"]
    code_idx = [i for i, (item, _) in enumerate(pairs) if item.check == "code"]
    for i, (item, text) in enumerate(pairs):
        if item.check == "exact":
            out[i] = Verdict(EXACT_RIGHT if exact_answer(item.expected, text) else EXACT_WRONG)
        elif item.check == "none":
            out[i] = Verdict("none")
        if out[i] is not None and progress:
            progress()
    own = checkers is None
    checkers = Checkers(recipe) if own else checkers
    try:
        if math_idx:
            results = checkers.math_many([(pairs[i][0].gold, pairs[i][1]) for i in math_idx], progress)
            for i, r in zip(math_idx, results):
                out[i] = Verdict(r.status, r.detail)
        if code_idx:
            # the assembled program goes in as the text: without a fence, extraction keeps it whole
            items = [(response_code(pairs[i][0], pairs[i][1]), pairs[i][0].tests, pairs[i][0].setup,
                      pairs[i][0].prelude) for i in code_idx]
            for i, r in zip(code_idx, checkers.code_many(items, progress)):
                out[i] = Verdict(r.status, r.detail[:2000])
    finally:
        if own:
            checkers.close()
    return out  # type: ignore[return-value]
