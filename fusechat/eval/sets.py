"""Evaluation sets: local files in the published layouts, read into one kind of item.

Every set becomes a list of `Item`s: one user turn, the set's own row id, and what decides
correctness (a gold answer, test code, or one exact answer); the export-only sets
(AlpacaEval 2, Arena-Hard) carry no verdict. Every row is checked before any model runs, and a bad
row is an `EvalDataError` naming the file, the row and the field.

Layouts (docs/evaluation.md): GSM8K `question`, `answer` ending `#### N`; MATH / MATH-500
`problem` and `answer`, else the last \\boxed{} of `solution`; HumanEval `task_id`, `prompt`,
`test` (defines `check(candidate)`), `entry_point`; MBPP `text` (full) or `prompt` (sanitized),
`test_list`, `test_setup_code` / `test_imports`; AlpacaEval 2 `instruction`, `dataset`; Arena-Hard
`question_id`, `turns[0].content`; the demo world's `<domain>.jsonl` rows (`fusechat.demo.world`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fusechat.errors import InputError
from fusechat.recipe import Recipe
from fusechat.tables import DOMAINS

# The published evaluation's math instruction (Qwen2.5-Math harness), after the problem.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# EvalPlus's instruction for chat models.
HUMANEVAL_INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
# The pipeline's DOMAINS in the demo world's order. The demo's eval columns come in this order, and
# `fusechat.demo.world` (which takes it from here) draws its seeded prompts and answer pairs going
# through the domains in it: another order would change every demo file and result. The members
# are the pipeline's, checked here so that a domain added to fusechat.tables fails at import.
DEMO_DOMAINS = ("math", "code", "instruction", "chinese")
assert sorted(DEMO_DOMAINS) == sorted(DOMAINS), f"demo domains {DEMO_DOMAINS} are not fusechat.tables.DOMAINS {DOMAINS}"


EvalDataError = InputError  # an evaluation file that cannot be used (the name earlier versions raised)


@dataclass
class Item:
    set: str  # the recipe's benchmark key
    column: str | None  # results/table column (None: exported for external judging, no verdict)
    domain: str  # the pipeline domain that decides the prompt's sampling shard
    row_id: str  # the set's own id for the row
    prompt: str  # the user turn
    check: str  # math | code | exact | none
    gold: str | None = None
    expected: str | None = None  # check "exact": the one right answer
    tests: list[str] = field(default_factory=list)
    setup: str = ""  # runs after the response's code, before the tests
    prelude: str = ""  # runs before the response's code (the imports a judge provides)
    entry_point: str | None = None  # HumanEval: the function a completion must define
    code_prefix: str = ""  # HumanEval: the prompt (a completion continues it)
    row: dict[str, Any] = field(default_factory=dict)  # the file's row, for the exports


class _Bad(Exception):
    def __init__(self, field_: str, message: str):
        super().__init__(message)
        self.field = field_


def _str(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(key, "missing or not a non-empty string")
    return value


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched.

    math-verify parses boxed answers into sympy objects; a gold answer is needed as its LaTeX text
    (it is boxed again by the checker), which no installed library returns, hence this scan.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


# -- one function per layout: row -> item fields ----------------------------------------------------
def _gsm8k(row: dict, i: int) -> dict:
    answer = _str(row, "answer")
    if "####" not in answer:
        raise _Bad("answer", "has no '#### <number>' final line")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise _Bad("answer", "nothing after '####'")
    return {"row_id": str(row.get("id", i)), "prompt": f"{_str(row, 'question').strip()}\n{MATH_INSTRUCTION}",
            "check": "math", "gold": gold}


def _math(row: dict, i: int) -> dict:
    gold = row.get("answer")
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):  # AMC23 keeps answers as floats
        gold = f"{gold:g}"
    if not (isinstance(gold, str) and gold.strip()):
        gold = last_boxed(row["solution"]) if isinstance(row.get("solution"), str) else None
        if not gold:
            raise _Bad("answer", "no `answer` and no \\boxed{} answer in `solution`")
    return {"row_id": str(row.get("unique_id", row.get("id", i))),
            "prompt": f"{_str(row, 'problem').strip()}\n{MATH_INSTRUCTION}", "check": "math", "gold": gold.strip()}


def _humaneval(row: dict, i: int) -> dict:
    prompt, test, entry = _str(row, "prompt"), _str(row, "test"), _str(row, "entry_point")
    if "def check(" not in test:
        raise _Bad("test", "does not define check(candidate)")
    return {"row_id": str(row.get("task_id", i)), "prompt": f"{HUMANEVAL_INSTRUCTION}\n```\n{prompt.strip()}\n```",
            "check": "code", "tests": [f"check({entry})"], "setup": test, "entry_point": entry, "code_prefix": prompt}


def _mbpp(row: dict, i: int) -> dict:
    text = row.get("text") if isinstance(row.get("text"), str) and row["text"].strip() else None
    text = text or _str(row, "prompt")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise _Bad("test_list", "missing or not a non-empty list of assert strings")
    imports = row.get("test_imports") or []
    if not isinstance(imports, list) or not all(isinstance(t, str) for t in imports):
        raise _Bad("test_imports", "not a list of strings")
    setup = "\n".join([*imports, row.get("test_setup_code") or ""]).strip()
    prompt = f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests)
    return {"row_id": str(row.get("task_id", i)), "prompt": prompt, "check": "code", "tests": tests, "setup": setup}


def _alpacaeval(row: dict, i: int) -> dict:
    # the judge matches outputs to its set by the exact instruction text: keep it unchanged
    return {"row_id": str(i), "prompt": _str(row, "instruction"), "check": "none"}


def _arena_hard(row: dict, i: int) -> dict:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        raise _Bad("turns", "missing or not a list of {content}")
    if row.get("question_id") in (None, ""):
        raise _Bad("question_id", "missing")
    return {"row_id": str(row["question_id"]), "prompt": _str(turns[0], "content"), "check": "none"}


def _demo(row: dict, i: int) -> dict:
    domain = row.get("domain")
    if domain not in DEMO_DOMAINS:
        raise _Bad("domain", f"{domain!r} is not one of {', '.join(DEMO_DOMAINS)}")
    out = {"row_id": str(row.get("id", i)), "prompt": _str(row, "instruction"), "domain": domain,
           "column": f"demo-{domain}"}
    if domain == "math":
        return out | {"check": "math", "gold": _str(row, "gold_answer")}
    if domain == "code":
        tests = row.get("tests")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise _Bad("tests", "missing or not a non-empty list of assert strings")
        return out | {"check": "code", "tests": tests}
    return out | {"check": "exact", "expected": _str(row, "expected")}


@dataclass(frozen=True)
class Layout:
    read: Callable[[dict, int], dict]
    domain: str
    scored: bool  # a column of the table (else exported only)
    hub: tuple[str, str | None, str] | None = None  # (data set id, config, split) when no file is given


SETS: dict[str, Layout] = {
    "demo": Layout(_demo, "", True),
    "gsm8k": Layout(_gsm8k, "math", True, ("openai/gsm8k", "main", "test")),
    "math": Layout(_math, "math", True, ("HuggingFaceH4/MATH-500", None, "test")),
    "math500": Layout(_math, "math", True, ("HuggingFaceH4/MATH-500", None, "test")),
    "amc23": Layout(_math, "math", True),
    "humaneval": Layout(_humaneval, "code", True, ("openai/openai_humaneval", None, "test")),
    "mbpp": Layout(_mbpp, "code", True, ("google-research-datasets/mbpp", "full", "test")),
    "alpacaeval2": Layout(_alpacaeval, "instruction", False),
    "arena_hard": Layout(_arena_hard, "instruction", False),
}


def _read_file(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (array) or .parquet file, or of every .jsonl in a folder.

    Read here rather than through `datasets` so that an error can name the line a row came from.
    """
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise EvalDataError(f"{path}: folder holds no .jsonl files")
        return [r for f in files for r in _read_file(f)]
    where = str(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [dict(r, _where=f"{where} row {i}") for i, r in enumerate(pq.read_table(path).to_pylist())]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise EvalDataError(f"{where}: expected a JSON array of rows, got {type(rows).__name__}")
        return [dict(r, _where=f"{where} row {i}") if isinstance(r, dict) else r for i, r in enumerate(rows)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where} line {n}: not valid JSON: {e}") from None
        rows.append(dict(row, _where=f"{where} line {n}") if isinstance(row, dict) else row)
    return rows


def _read_hub(name: str, hub: tuple[str, str | None, str]) -> list[dict]:
    from datasets import load_dataset

    repo, config, split = hub
    try:
        ds = load_dataset(repo, config, split=split)
    except Exception as e:
        raise EvalDataError(f"eval.benchmarks {name}: no local file in eval.files.{name} and {repo} could not be "
                            f"loaded from the hub ({type(e).__name__}: {e})") from None
    return [dict(r, _where=f"{repo} ({split}) row {i}") for i, r in enumerate(ds)]


def load_set(name: str, rows: list[Any]) -> list[Item]:
    layout = SETS[name]
    items: list[Item] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalDataError(f"eval set {name}: row {i} is a {type(row).__name__}, not an object")
        where = row.pop("_where", f"row {i}")
        try:
            fields = layout.read(row, i)
        except _Bad as e:
            raise EvalDataError(f"{where}: field `{e.field}`: {e} ({name} layout)") from None
        if fields["row_id"] in seen:
            raise EvalDataError(f"{where}: id {fields['row_id']!r} repeats {seen[fields['row_id']]}")
        seen[fields["row_id"]] = where
        fields.setdefault("domain", layout.domain)
        fields.setdefault("column", name if layout.scored else None)
        items.append(Item(set=name, row=row, **fields))
    if not items:
        raise EvalDataError(f"eval set {name}: no rows")
    if name == "demo":  # table columns in the world's domain order, whatever the file order
        items.sort(key=lambda it: DEMO_DOMAINS.index(it.domain))
    return items


def set_names(recipe: Recipe) -> list[str]:
    """The recipe's sets: `eval.benchmarks` plus any `eval.files` key not listed there."""
    names = list(dict.fromkeys([*recipe.eval.benchmarks, *recipe.eval.files]))
    for name in names:
        if name not in SETS:
            field_ = (f"eval.benchmarks[{recipe.eval.benchmarks.index(name)}]" if name in recipe.eval.benchmarks
                      else f"eval.files.{name}")
            raise EvalDataError(f"{field_}: unknown evaluation set {name!r}; known: {', '.join(SETS)}")
    return names


def load_sets(recipe: Recipe) -> list[Item]:
    """Every item of every set of the recipe, each set validated whole before anything runs."""
    items: list[Item] = []
    for name in set_names(recipe):
        layout = SETS[name]
        if name in recipe.eval.files:
            path = Path(recipe.resolve(recipe.eval.files[name]))
            if not path.exists():
                raise EvalDataError(f"eval.files.{name}: {path} does not exist")
            rows = _read_file(path)
        elif layout.hub is not None:
            rows = _read_hub(name, layout.hub)
        else:
            raise EvalDataError(f"eval.benchmarks: {name} needs a local file: set eval.files.{name}")
        items += load_set(name, rows)
    if not items:
        raise EvalDataError("the recipe names no evaluation set: set eval.benchmarks and eval.files")
    return items


def response_code(item: Item, text: str) -> str:
    """The program a code item's response is judged by.

    HumanEval answers may be a whole function or only its body's continuation: a response whose
    code does not define the entry point continues the prompt. The prompt's import lines always go
    first (models often drop `from typing import List`).
    """
    from fusechat.scoring.code_check import extract_code

    code = extract_code(text)
    if item.entry_point is None:
        return code
    if not re.search(rf"^\s*def\s+{re.escape(item.entry_point)}\s*\(", code, re.MULTILINE):
        return item.code_prefix + code
    imports = [line for line in item.code_prefix.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(imports + [code])
