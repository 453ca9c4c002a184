"""Math answers through math-verify in bounded worker processes; code through pyflakes + sandbox."""

from __future__ import annotations

import time

import pytest

from fusechat.prompts.leetcode import JUDGE_IMPORTS as LEETCODE_PRELUDE
from fusechat.scoring.code_check import CodeChecker, extract_code, static_problems
from fusechat.scoring.math_check import MathChecker

# sympy tries to evaluate the tower exactly: math-verify does not come back from this one
MATH_HANG = "The answer is \\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def math_checker():
    with MathChecker(workers=2, timeout_s=1.5) as mc:
        yield mc


def test_math_statuses_and_extracted_answer(math_checker):
    items = [
        # the last box counts (math-verify reads boxes only a separator apart as one list answer)
        ("27", "First I got \\boxed{3}. Checking the second step again shows a sign error there so the answer is \\boxed{27}"),
        ("27", "So \\boxed{27}. Hmm, no: redoing the sum of the first ten terms more carefully gives \\boxed{28}"),
        ("\\frac{1}{2}", "Half of one is $\\frac{2}{4}$, i.e. \\boxed{0.5}."),
        ("(1,2)", "The interval is \\boxed{(1, 2)}"),
        ("27", "I cannot solve this."),
        ("27", ""),
    ]
    got = math_checker.check_many(items)
    assert [r.status for r in got] == ["correct", "incorrect", "correct", "correct", "unparseable", "unparseable"]
    assert got[0].detail == "27" and got[1].detail == "28"


def test_math_timeout_kills_the_worker_and_goes_on(math_checker):
    t0 = time.monotonic()
    got = math_checker.check_many([("2", MATH_HANG), ("4", "\\boxed{4}"), ("5", "\\boxed{5}")])
    assert [r.status for r in got] == ["timeout", "correct", "correct"]
    assert "1.5s" in got[0].detail
    assert time.monotonic() - t0 < 20
    assert math_checker.check_many([("6", "\\boxed{6}")])[0].status == "correct"  # replaced worker


def test_math_checks_from_threads(math_checker):
    # Prefect runs tasks in threads, where math-verify's signal timeouts would raise
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda i: math_checker.check_many([(str(i), f"\\boxed{{{i}}}")])[0].status, range(4)))
    assert got == ["correct"] * 4


def test_extract_code_prefers_the_last_python_block():
    text = "Try:\n```python\ndef f(): return 1\n```\nBetter:\n```py\ndef f(): return 2\n```\n```text\nout\n```"
    assert extract_code(text).strip() == "def f(): return 2"
    assert extract_code("```\nx = 1\n```").strip() == "x = 1"
    assert extract_code("x = 3") == "x = 3"


def test_static_analysis():
    assert static_problems("def f(:\n  pass") .startswith("syntax error")
    assert "undefined name 'undefined_helper'" in static_problems("def f():\n    return undefined_helper()\n")
    assert static_problems("import os\n\ndef f():\n    return os.sep\n") is None  # unused is fine
    assert static_problems("x = 1\0") is not None
    assert static_problems("def f(d: Dict) -> int:\n    return len(deque())\n", LEETCODE_PRELUDE) is None
    assert "'nothere'" in static_problems("def f():\n    return nothere\n", LEETCODE_PRELUDE)


def test_code_checker_end_to_end():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    undefined = "```python\ndef add(a, b):\n    return plus(a, b)\n```"
    broken = "```python\ndef add(a, b)\n    return a + b\n```"
    slow = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    with CodeChecker(workers=2, timeout_s=1.5, memory_mb=256) as cc:
        got = cc.check_many([(t, tests, "", "") for t in (good, wrong, undefined, broken, slow)] + [
            # LeetCode style: names from the judge's prelude, a Solution method bound by the setup
            ("class Solution:\n    def top(self, xs: List[int]) -> int:\n        return nsmallest(1, xs)[0]\n",
             ["assert top([3, 1, 2]) == 1"], "top = Solution().top", LEETCODE_PRELUDE),
            ("def top(xs: List[int]) -> int:\n    return min(xs)\n", ["assert top([2]) == 2"], "", ""),
        ])
    assert [r.status for r in got] == ["pass", "fail", "fail", "fail", "timeout", "pass", "fail"]
    assert "undefined name 'List'" in got[6].detail
    assert "pass: assert add(1, 2) == 3" in got[0].detail
    assert "fail: assert add(1, 2) == 3 -> AssertionError" in got[1].detail
    assert got[2].detail.startswith("static analysis: ") and "plus" in got[2].detail
    assert "syntax error" in got[3].detail


def test_exact_answer_collapses_whitespace_only():
    from fusechat.scoring.checks import exact_answer

    assert exact_answer("cat dog", "  cat \n  dog\n")
    assert not exact_answer("cat dog", "cat dog.")
    assert not exact_answer("cat dog", "Cat dog")
    assert not exact_answer("猫", "")
