"""Verdicts on responses: the score stage's checkers, and the demo world's exact rule.

Math goes through `MathChecker` (math-verify in killable worker processes, against the gold
answer), code through `CodeChecker` (pyflakes, then the tests in the sandbox), the demo world's
instruction and Chinese rows through `fusechat.demo.world.evaluate_response`. Those are the rules
the demo world's evaluator applies to its math and code rows as well, here with the time bound and
the worker pools that many checks need.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusechat.eval.sets import Item, response_code
from fusechat.recipe import Recipe

CORRECT = ("correct", "pass")


@dataclass
class Verdict:
    status: str  # none | correct | incorrect | unparseable | timeout | error | pass | fail
    detail: str = ""

    @property
    def correct(self) -> bool | None:
        return None if self.status == "none" else self.status in CORRECT


def check_all(recipe: Recipe, pairs: list[tuple[Item, str]], progress=None) -> list[Verdict]:
    """(item, response text) -> verdicts, in order; `progress()` once per pair."""
    out: list[Verdict | None] = [None] * len(pairs)
    math_idx = [i for i, (item, _) in enumerate(pairs) if item.check == "math"]
    code_idx = [i for i, (item, _) in enumerate(pairs) if item.check == "code"]
    for i, (item, text) in enumerate(pairs):
        if item.check == "exact":
            from fusechat.demo.world import evaluate_response

            out[i] = Verdict("correct" if evaluate_response(item.domain, item.row, text) else "incorrect")
        elif item.check == "none":
            out[i] = Verdict("none")
        if out[i] is not None and progress:
            progress()
    if math_idx:
        from fusechat.scoring.math_check import MathChecker

        c = recipe.scoring.math
        with MathChecker(workers=c.workers, timeout_s=c.timeout_s) as checker:
            results = checker.check_many([(pairs[i][0].gold, pairs[i][1]) for i in math_idx], progress)
        for i, r in zip(math_idx, results):
            out[i] = Verdict(r.status, r.detail)
    if code_idx:
        from fusechat.scoring.code_check import CodeChecker

        c = recipe.scoring.code
        with CodeChecker(workers=c.workers, timeout_s=c.timeout_s, memory_mb=c.memory_mb) as checker:
            # the assembled program goes in as the text: without a fence, extraction keeps it whole
            items = [(response_code(pairs[i][0], pairs[i][1]), pairs[i][0].tests, pairs[i][0].setup, "")
                     for i in code_idx]
            results = checker.check_many(items, progress)
        for i, r in zip(code_idx, results):
            out[i] = Verdict(r.status, r.detail[:2000])
    return out  # type: ignore[return-value]
