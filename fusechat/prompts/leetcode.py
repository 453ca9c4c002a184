"""Tests for greengerong/leetcode, which ships none: derived from the statement's examples.

Each "**Input:** a = ..., b = ...  **Output:** ..." pair becomes one assert calling the reference
Python solution's function with the example's arguments in order. An assert is kept only if the
reference solution passes it: that drops examples whose literals do not mean what they say in
Python (linked lists and trees written as arrays, "any order" answers, float formatting), and
design problems ("MinStack", ...) never parse into a call at all. A problem left without a passing
assert has no tests, and the code filter drops it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_EXAMPLE = re.compile(
    r"\*{0,2}Input:?\*{0,2}:?[ \t]*(?P<input>[^\n]+)\n+\s*\*{0,2}Output:?\*{0,2}:?[ \t]*(?P<output>[^\n]+)"
)
# LeetCode's judge pre-imports these, and the reference solutions rely on it; the code checker
# runs model answers after the same lines.
JUDGE_IMPORTS = (
    "from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
    "from heapq import *\nfrom bisect import *\nimport math, string, re\n"
)
_TIMEOUT_S = 10


@dataclass
class Derived:
    tests: list[str] = field(default_factory=list)
    setup: str = ""
    function: str = ""
    signature: str = ""
    note: str = ""


def _unescape(text: str) -> str:
    # the statements are markdown: \[ \] \_ \* escape list brackets and underscores
    return re.sub(r"\\([\[\]_*`\\])", r"\1", text).replace("`", "").strip()


def _literal(text: str):
    """A LeetCode literal (JSON-like: true/false/null) as a Python value; ValueError if not one."""
    python = re.sub(
        r'"(?:\\.|[^"\\])*"|\b(true|false|null)\b',
        lambda m: {"true": "True", "false": "False", "null": "None"}[m.group(1)] if m.group(1) else m.group(0),
        text.strip().rstrip("."),
    )
    try:
        return ast.literal_eval(python)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"not a literal: {text!r}") from e


def _top_level_split(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (a regex cannot track the nesting)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_example(input_text: str, output_text: str) -> tuple[list[str], list, object]:
    """(argument names, argument values, expected value); ValueError when it is not a call."""
    names, values = [], []
    for part in _top_level_split(_unescape(input_text)):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*", part, flags=re.S)
        if not m:
            raise ValueError(f"input is not `name = value, ...`: {input_text!r}")
        names.append(m.group(1))
        values.append(_literal(m.group(2)))
    return names, values, _literal(_unescape(output_text))


def _pick_function(code: str, arg_names: list[str]) -> tuple[str, list[str]] | None:
    """The reference function (or Solution method) whose parameters match the example's names."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    candidates = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name == "Solution":
            candidates += [n for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    params = {n.name: [a.arg for a in n.args.args if a.arg != "self"] for n in candidates}
    exact = [name for name, p in params.items() if p == arg_names]
    same_arity = [name for name, p in params.items() if len(p) == len(arg_names)]
    chosen = exact[-1] if exact else (same_arity[-1] if len(same_arity) == 1 else None)
    return (chosen, params[chosen]) if chosen else None


def _passing(code: str, setup: str, tests: list[str]) -> list[bool] | str:
    """Which asserts the reference passes, run in a separate interpreter; a string says why none ran.

    A plain subprocess with a timeout, not the scoring sandbox: this is the data set's own reference
    code, run once per problem while reading the data set.
    """
    harness = (
        f"{JUDGE_IMPORTS}\n{code}\n{setup}\nimport json as _json\n_ok = []\n"
        f"for _t in _json.loads({json.dumps(json.dumps(tests))}):\n"
        "    try:\n        exec(_t, globals())\n        _ok.append(True)\n"
        "    except BaseException:\n        _ok.append(False)\n"
        "print('\\n' + _json.dumps(_ok))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.py"
        script.write_text(harness)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", str(script)], cwd=tmp, capture_output=True, text=True,
                timeout=_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return f"the reference solution timed out after {_TIMEOUT_S} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the reference solution did not run: {last}"
    return json.loads(lines[-1])


def derive_tests(content: str, reference: str) -> Derived:
    examples = _EXAMPLE.findall(content)
    if not examples:
        return Derived(note="no Input/Output examples in the statement")
    if not reference.strip():
        return Derived(note="no reference python solution")
    parsed = []
    for input_text, output_text in examples:
        try:
            parsed.append(parse_example(input_text, output_text))
        except ValueError:
            continue
    if not parsed:
        return Derived(note=f"0 of {len(examples)} examples parse into a call")
    picked = _pick_function(reference, parsed[0][0])
    if picked is None:
        return Derived(note="no reference function takes the examples' arguments")
    name, params = picked
    setup = f'if "{name}" not in globals() and "Solution" in globals():\n    {name} = Solution().{name}'
    tests = [
        f"assert {name}({', '.join(map(repr, values))}) == {expected!r}"
        for names, values, expected in parsed
        if len(names) == len(params)
    ]
    ok = _passing(reference, setup, tests)
    if isinstance(ok, str):
        return Derived(note=f"{len(tests)} examples parsed; {ok}")
    kept = [t for t, good in zip(tests, ok) if good]
    note = f"{len(examples)} examples, {len(tests)} parsed, {len(kept)} pass the reference solution"
    return Derived(kept, setup, name, f"{name}({', '.join(params)})", note)
