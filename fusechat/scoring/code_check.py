"""Code responses: extract the program, reject it statically, else run the prompt's asserts.

A response passes only if its code survives static analysis (pyflakes: no syntax error, no
undefined name) and every test assert passes in the sandbox (`fusechat.scoring.sandbox`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from fusechat.scoring.sandbox import Check, CheckResult, Sandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


@dataclass
class CodeResult:
    status: str  # one of fusechat.tables.CODE_STATUSES
    detail: str


def extract_code(text: str) -> str:
    """The last ```python fenced block; else the last untagged block; else the whole text."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    for wanted in (lambda t: t in _PYTHON_TAGS, lambda t: t == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return text


def _prelude_names(prelude: str) -> frozenset[str]:
    # the prelude is the project's own trusted text: run it to learn the names it provides
    namespace: dict = {}
    exec(prelude, namespace)
    return frozenset(namespace)


def static_problems(code: str, prelude: str = "") -> str | None:
    """Why pyflakes rejects the code (syntax error, undefined names), or None when it does not.

    Names the prelude provides count as defined; the prelude is not prepended to the code because
    its star imports would make pyflakes stop reporting undefined names altogether.
    """
    from pyflakes import checker, messages

    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"syntax error: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return f"unparseable code: {type(e).__name__}: {e}"[:500]
    known = _prelude_names(prelude) if prelude else frozenset()
    found = checker.Checker(tree, filename="<response>", builtins=known).messages
    undefined = [m for m in found if isinstance(m, (messages.UndefinedName, messages.UndefinedLocal))]
    if undefined:
        return "; ".join(f"line {m.lineno}: " + m.message % m.message_args for m in undefined[:5])
    return None


def _describe(result: CheckResult) -> str:
    lines = [result.detail]
    for t in result.tests:
        lines.append(f"{t['status']}: {t['test'][:200]}" + (f" -> {t['error']}" if t["error"] else ""))
    return "\n".join(lines)


class CodeChecker:
    """Static analysis in this process, execution in a pool of sandbox servers."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024, isolation: str = "auto"):
        self.sandbox = Sandbox(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)

    def check_many(self, items: list[tuple[str, list[str], str, str]], progress=None) -> list[CodeResult]:
        """(response text, test asserts, setup after the code, prelude before it) -> results, in order."""
        results: list[CodeResult | None] = [None] * len(items)
        to_run: list[tuple[int, Check]] = []
        for i, (text, tests, setup, prelude) in enumerate(items):
            code = extract_code(text)
            problem = static_problems(code, prelude)
            if problem:
                results[i] = CodeResult("fail", f"static analysis: {problem}")
                if progress:
                    progress()
            else:
                to_run.append((i, Check(code=code, tests=list(tests), setup=setup, prelude=prelude)))
        ran = self.sandbox.run_many([c for _, c in to_run], progress=progress)
        for (i, _), r in zip(to_run, ran):
            results[i] = CodeResult(r.status, _describe(r))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self) -> CodeChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
