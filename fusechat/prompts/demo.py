"""Adapter for the demo world's prompt files (`data/demo/prompts/<split>/<domain>.jsonl`).

Rows: `instruction` (the user turn), `id`, `domain`, `task`, `gold_answer` (math), `tests` (code:
assert statements), `expected` (instruction and Chinese: the exact answer), `meta` (JSON string).
The exact answer travels in the prompt table's `meta` as `expected`, where the exact check
(`fusechat.scoring.checks.exact_answer`) finds it. `fusechat.prompts.adapters.ADAPTERS` lists it.
"""

from __future__ import annotations

import json
from typing import Any

from fusechat.prompts.base import Adapter, BadValue, Prompt, text_field, user_turn


def _demo(row: dict[str, Any]) -> Prompt:
    gold = row.get("gold_answer")
    if gold is not None and not isinstance(gold, str):
        raise BadValue("gold_answer", f"expected a string or null, got {type(gold).__name__}")
    tests = row.get("tests")
    if tests is not None and (not isinstance(tests, list) or not all(isinstance(t, str) for t in tests)):
        raise BadValue("tests", "expected a list of assert statements (strings) or null")
    try:
        extra = json.loads(row["meta"]) if isinstance(row.get("meta"), str) else {}
    except json.JSONDecodeError as e:
        raise BadValue("meta", f"not valid JSON: {e}") from None
    meta = {**extra, **{c: row[c] for c in ("id", "task", "expected") if row.get(c) is not None}}
    return Prompt(user_turn(text_field(row, "instruction")), gold_answer=gold, tests=tests or None, meta=meta)


DEMO = Adapter("demo", ("instruction",), ("id", "task", "gold_answer", "tests", "expected", "meta"), _demo)
