"""One adapter per public prompt data set: a source row in, one canonical prompt out.

Each adapter names the columns it reads; the stage checks them once against the loaded table, so a
file in the wrong layout fails with the list of columns it does have instead of a KeyError deep in
a loop. A value of the wrong kind in one row raises `BadValue(column, why)`, which the stage turns
into an error naming the data set, the row and the column. Layouts, traps and the decisions
taken: docs/prompts.md.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from fusechat.prompts import leetcode
from fusechat.prompts.base import Adapter, BadValue, Prompt, text_field, user_turn
from fusechat.prompts.demo import DEMO


def _meta(row: dict[str, Any], *columns: str) -> dict[str, Any]:
    return {c: row[c] for c in columns if row.get(c) is not None}


def python_blocks(markdown: str) -> list[str]:
    """Fenced code blocks tagged python (or untagged) in a markdown string, in order."""
    return re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", markdown, flags=re.S | re.I)


# -- instruction following ----------------------------------------------------------------------
def _ultrafeedback(row: dict[str, Any]) -> Prompt:
    return Prompt(user_turn(text_field(row, "instruction")), meta=_meta(row, "source"))


def _magpie(row: dict[str, Any]) -> Prompt:
    if isinstance(row.get("instruction"), str) or "conversations" not in row:
        content = text_field(row, "instruction")
    else:  # the Chinese set's parent layout may carry only the ShareGPT-style conversation
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            raise BadValue("conversations", "expected a list of {from, value} turns")
        if turns[0].get("from") not in ("human", "user") or not isinstance(turns[0].get("value"), str):
            raise BadValue("conversations", "the first turn is not a human turn with a string value")
        content = turns[0]["value"]
    return Prompt(user_turn(content), meta=_meta(row, "uuid", "task_category", "difficulty", "language"))


_HELPSTEER_TURN = re.compile(r"\s*<extra_id_1>(User|Assistant)[ \t]*\n")


def _helpsteer2(row: dict[str, Any]) -> Prompt:
    # Multi-turn prompts are flattened into one string: "user text\n<extra_id_1>Assistant\n...
    # \n<extra_id_1>User\n...". Split them back into turns that must alternate and end with the user.
    parts = _HELPSTEER_TURN.split(text_field(row, "prompt"))
    messages = [{"role": "user", "content": parts[0].strip()}]
    for k in range(1, len(parts), 2):
        role = parts[k].lower()
        if role == messages[-1]["role"]:
            raise BadValue("prompt", f"turn {len(messages) + 1} repeats the {role} role")
        messages.append({"role": role, "content": parts[k + 1].strip()})
    if messages[-1]["role"] != "user":
        raise BadValue("prompt", "the conversation ends with an assistant turn, not a user turn")
    if any("<extra_id_" in m["content"] for m in messages):
        raise BadValue("prompt", "an unrecognised <extra_id_*> separator is left inside a turn")
    return Prompt(messages, meta={"turns": len(messages)})


# -- math ---------------------------------------------------------------------------------------
def _openmathinstruct2(row: dict[str, Any]) -> Prompt:
    answer = row.get("expected_answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise BadValue("expected_answer", f"expected a non-empty answer string, got {answer!r}")
    meta = _meta(row, "problem_source")
    # the recipe reuses the data set's Llama-3.1-405B solutions as math candidates; the stage merges
    # the solutions of duplicate rows of the same problem into this list
    if isinstance(row.get("generated_solution"), str):
        meta["solutions"] = [row["generated_solution"]]
    return Prompt(user_turn(text_field(row, "problem")), gold_answer=answer.strip(), meta=meta)


# -- code ---------------------------------------------------------------------------------------
def _leetcode(row: dict[str, Any]) -> Prompt:
    content = text_field(row, "content")
    blocks = python_blocks(text_field(row, "python", optional=True))
    derived = leetcode.derive_tests(content, blocks[0] if blocks else "")
    meta = _meta(row, "id", "slug", "title", "difficulty")
    meta["tests_note"] = derived.note
    if not derived.tests:
        return Prompt(user_turn(content), meta=meta)
    meta["test_setup"] = derived.setup
    # the code check runs answers after the imports LeetCode's judge provides, as the tests were
    # checked against the reference solution
    meta["test_prelude"] = leetcode.JUDGE_IMPORTS
    meta["entry_point"] = derived.function
    # without a name the tests cannot call the answer: say which function to write
    suffix = f"\n\nWrite the solution in Python as a function `{derived.signature}`."
    return Prompt(user_turn(content.rstrip() + suffix), tests=derived.tests, meta=meta)


_ASSERTION_SUFFIX = re.compile(
    r"Your code should pass the following (?:assertions?|test cases?)[^\n]*\n+(.*)", flags=re.S | re.I
)


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _statements(code: str) -> list[tuple[ast.stmt, str]]:
    """Top-level statements of a code block with their source; [] when it is not Python."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [(node, ast.get_source_segment(code, node)) for node in tree.body]


def _asserts(statements: list[tuple[ast.stmt, str]]) -> list[str]:
    return [src for node, src in statements if isinstance(node, ast.Assert)]


def _defined(statements: list[tuple[ast.stmt, str]]) -> set[str]:
    return {node.name for node, _ in statements if isinstance(node, _DEFS)}


def _self_oss_instruct(row: dict[str, Any]) -> Prompt:
    # The user prompt is `instruction`; the `prompt` column is the prompt that generated it.
    instruction = text_field(row, "instruction")
    tests: list[str] = []
    setup: list[str] = []
    notes = []
    suffix = _ASSERTION_SUFFIX.search(instruction)
    if suffix:
        for block in python_blocks(suffix.group(1)) or [suffix.group(1)]:
            tests += _asserts(_statements(block))
        if tests:
            notes.append(f"{len(tests)} from the instruction")
    parsed = [_statements(b) for b in python_blocks(text_field(row, "response"))]
    with_asserts = [i for i, st in enumerate(parsed) if _asserts(st)]
    if with_asserts:
        block = parsed[with_asserts[-1]]
        others = [st for i, st in enumerate(parsed) if i != with_asserts[-1]]
        # A definition of the solution itself must not reach the test setup, or every answer would
        # pass: leave out the test block's definitions that the implementation blocks define too
        # (all of them when the response mixes implementation and asserts in one block).
        solution = set().union(*map(_defined, others)) or _defined(block)
        new = [t for t in _asserts(block) if t not in tests]
        tests += new
        setup = [
            src for node, src in block
            if not isinstance(node, ast.Assert) and not (isinstance(node, _DEFS) and node.name in solution)
        ]
        notes.append(f"{len(new)} from the response's test block")
    meta = _meta(row, "id", "sha1")
    meta["tests_note"] = "; ".join(notes) or "no assert statements in the instruction or response"
    if setup:
        meta["test_setup"] = "\n".join(setup)
    return Prompt(user_turn(instruction), tests=tests or None, meta=meta)


# -- Chinese ------------------------------------------------------------------------------------
def _alpaca_gpt4_zh(row: dict[str, Any]) -> Prompt:
    instruction = text_field(row, "instruction").strip()
    extra = text_field(row, "input", optional=True).strip()
    return Prompt(user_turn(f"{instruction}\n\n{extra}" if extra else instruction))


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter("ultrafeedback", ("instruction",), ("source",), _ultrafeedback),
        Adapter("magpie_pro_dpo", ("instruction",), ("uuid", "task_category", "difficulty"), _magpie),
        Adapter("helpsteer2", ("prompt",), (), _helpsteer2),
        Adapter(
            "openmathinstruct2",
            ("problem", "expected_answer"),
            ("generated_solution", "problem_source"),
            _openmathinstruct2,
        ),
        Adapter("leetcode", ("content", "python"), ("id", "slug", "title", "difficulty"), _leetcode),
        Adapter("self_oss_instruct", ("instruction", "response"), ("id", "sha1"), _self_oss_instruct),
        Adapter("alpaca_gpt4_zh", ("instruction",), ("input",), _alpaca_gpt4_zh),
        Adapter(
            "magpie_qwen2_zh",
            ("instruction|conversations",),
            ("uuid", "task_category", "difficulty", "language"),
            _magpie,
        ),
        DEMO,
    )
}
