"""The recipe's checkers, one object for the score stage and the eval stage.

`Checkers(recipe)` starts the math checker (`scoring.math`: workers, timeout) and the code checker
(`scoring.code`: isolation, memory limit, timeout, workers) on first need and shares them between
calls; a code checker that holds no full isolation prints one warning. Both stages go through it,
so a recipe that insists on an isolation mode is obeyed, or stops the run, wherever model code runs.

A code check's prelude (lines run before the response's code, such as the imports LeetCode's judge
provides) comes with the prompt: the adapter that knows the judge writes it to the prompt's
`meta["test_prelude"]`.

`exact_answer` is the rule of prompts that carry one exact answer (the demo world's instruction and
Chinese rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusechat.recipe import Recipe
    from fusechat.scoring.code_check import CodeChecker, CodeResult
    from fusechat.scoring.math_check import MathChecker, MathResult

PRELUDE_KEY = "test_prelude"  # the prompt meta key of a code check's prelude


def exact_answer(expected: str, response: str) -> bool:
    """The response, whitespace runs collapsed and ends stripped, equals the expected answer."""
    return " ".join(response.split()) == expected


class Checkers:
    """Math and code checkers with the recipe's settings, started on first need; close() ends them."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.math: MathChecker | None = None
        self.code: CodeChecker | None = None

    def math_many(self, items: list[tuple[str, str]], progress=None) -> list[MathResult]:
        """(gold answer, response text) -> results, in order."""
        from fusechat.scoring.math_check import MathChecker

        if self.math is None:
            c = self.recipe.scoring.math
            self.math = MathChecker(workers=c.workers, timeout_s=c.timeout_s)
        return self.math.check_many(items, progress)

    def code_many(self, items: list[tuple[str, list[str], str, str]], progress=None) -> list[CodeResult]:
        """(response text, test asserts, setup after the code, prelude before it) -> results, in order."""
        from fusechat.scoring.code_check import CodeChecker

        if self.code is None:
            c = self.recipe.scoring.code
            self.code = CodeChecker(workers=c.workers, timeout_s=c.timeout_s, memory_mb=c.memory_mb,
                                    isolation=c.isolation)
            isolation = self.code.sandbox.isolation
            if not isolation["isolated"]:
                from rich.console import Console

                Console(stderr=True).print(f"[yellow]warning: code checks without full isolation: {isolation['reason']}")
        return self.code.check_many(items, progress)

    @property
    def isolation(self) -> dict | None:
        """What the code sandbox holds (mode, reason), or None when no code was checked."""
        return None if self.code is None else self.code.sandbox.isolation

    def close(self) -> None:
        for c in (self.math, self.code):
            if c is not None:
                c.close()

    def __enter__(self) -> Checkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
