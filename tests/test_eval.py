"""The evaluation stage: set layouts, checker verdicts, metrics, export layouts, and the stage end to end
on tiny models (two vLLM sources, base and SFT targets through transformers, a tiny ArmoRM)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from fusechat.eval.sets import EvalDataError, Item, last_boxed, load_set, load_sets, response_code

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "data" / "fixtures"
FILES = {
    "gsm8k": FIX / "decontamination" / "gsm8k_test.jsonl",
    "math500": FIX / "decontamination" / "math500_test.jsonl",
    "math": FIX / "eval" / "math_competition.jsonl",
    "humaneval": FIX / "decontamination" / "humaneval.jsonl",
    "mbpp": FIX / "decontamination" / "mbpp_test.jsonl",
    "alpacaeval2": FIX / "eval" / "alpaca_eval.json",
    "arena_hard": FIX / "eval" / "arena_hard_question.jsonl",
}
BASE_RECIPE = {
    "scoring": {"reward_model": {"model": "RLHFlow/ArmoRM-Llama3-8B-v0.1"}},
    "sft": {"learning_rate": 1e-5},
    "dpo": {"learning_rate": 1e-6, "beta": 0.1},
}


def _recipe(tmp_path: Path, files: dict, **over):
    import yaml

    from fusechat.recipe import load_recipe

    data = {"name": "eval-test", "run_dir": str(tmp_path / "run"),
            "sources": [{"name": "s", "model": "org/model", "family": "llama3"}],
            "datasets": [{"name": "d", "path": "org/data", "adapter": "ultrafeedback", "domain": "instruction"}],
            "target": {"model": "org/target", "family": "llama3"}, **BASE_RECIPE,
            "eval": {"files": {k: str(v) for k, v in files.items()}}, **over}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_recipe(path, check_paths=False)


def _by_set(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(it.set, []).append(it)
    return out


# -- layouts --------------------------------------------------------------------------------------
def test_layouts_give_prompts_golds_and_tests(tmp_path):
    sets = _by_set(load_sets(_recipe(tmp_path, FILES)))
    assert [it.gold for it in sets["gsm8k"]] == ["18", "3"]
    assert all(it.prompt.endswith("put your final answer within \\boxed{}.") for it in sets["gsm8k"] + sets["math"])
    assert [it.gold for it in sets["math500"]] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "4495"]
    assert [it.row_id for it in sets["math500"]] == ["test/precalculus/807.json", "test/counting_and_probability/1.json"]
    # full MATH has no answer column: the last \boxed{} of the solution, nested braces kept
    assert [it.gold for it in sets["math"]] == ["2", "\\frac{1}{2}"]
    he = sets["humaneval"][0]
    assert (he.row_id, he.entry_point, he.tests) == ("HumanEval/0", "has_close_elements", ["check(has_close_elements)"])
    assert "def has_close_elements" in he.prompt and he.setup.startswith("def check(candidate)")
    assert [it.tests[0][:30] for it in sets["mbpp"]] == ["assert set(similar_elements((3", "assert is_not_prime(2) == Fals"]
    assert sets["mbpp"][0].prompt.startswith("Write a function to find the shared elements")
    assert "Your code should pass these tests" in sets["mbpp"][0].prompt
    assert sets["alpacaeval2"][2].prompt == "  Why is the sky blue?\n"  # kept exactly: the judge matches on it
    assert [it.check for it in sets["alpacaeval2"] + sets["arena_hard"]] == ["none"] * 5
    assert sets["arena_hard"][0].row_id == "328c149ed45a41c0b9d6f14659e63599"
    assert {it.column for it in sets["alpacaeval2"] + sets["arena_hard"]} == {None}


def test_sanitized_mbpp_layout_and_boxed_scan():
    item = load_set("mbpp", [json.loads(line) for line in (FIX / "eval" / "mbpp_sanitized.jsonl").read_text().splitlines()])[0]
    assert item.setup == "import math" and len(item.tests) == 2
    amc = load_set("amc23", [{"id": 0, "problem": "p", "question": "p", "answer": 27.0}])[0]
    assert (amc.gold, amc.row_id, amc.column) == ("27", "0", "amc23")  # AMC23 keeps answers as floats
    assert last_boxed("a \\boxed{x^{2}} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None


@pytest.mark.parametrize("name,line,field", [
    ("gsm8k", '{"question": "q", "answer": "no final line"}', "answer"),
    ("humaneval", '{"task_id": "HumanEval/1", "prompt": "def f():\\n", "test": "def check(candidate): pass"}', "entry_point"),
    ("mbpp", '{"task_id": 5, "text": "Write f.", "test_list": "assert f()"}', "test_list"),
    ("math", '{"problem": "p", "solution": "no box here"}', "answer"),
    ("arena_hard", '{"question_id": "x", "turns": []}', "turns"),
    ("demo", '{"id": "d1", "domain": "instruction", "instruction": "Sort: b a"}', "expected"),
])
def test_bad_row_names_file_line_and_field(tmp_path, name, line, field):
    path = tmp_path / f"{name}.jsonl"
    good = FILES.get(name, FILES["gsm8k"]).read_text().splitlines()[0] if name not in ("demo", "math") else ""
    path.write_text("\n".join([good, line]) if good else line)
    with pytest.raises(EvalDataError) as e:
        load_sets(_recipe(tmp_path, {name: path}))
    where = "line 2" if good else "line 1"
    assert str(path) in str(e.value) and where in str(e.value) and f"`{field}`" in str(e.value)


def test_unknown_set_names_the_recipe_field(tmp_path):
    with pytest.raises(EvalDataError, match=r"eval.benchmarks\[1\].*'mmlu'"):
        load_sets(_recipe(tmp_path, {}, eval={"benchmarks": ["gsm8k", "mmlu"]}))


# -- verdicts -------------------------------------------------------------------------------------
def test_checkers_verdicts_on_hand_written_responses(tmp_path):
    from fusechat.demo import world
    from fusechat.eval.checks import check_all

    recipe = _recipe(tmp_path, FILES)
    sets = _by_set(load_sets(recipe))
    he_body = "```python\n    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n" \
              "            if abs(a - b) < threshold:\n                return True\n    return False\n```"
    he_full = "Here it is:\n```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n" \
              "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    cases = [
        (sets["gsm8k"][0], "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is \\boxed{18}.", "correct"),
        (sets["gsm8k"][0], "She makes \\boxed{20} dollars.", "incorrect"),
        (sets["gsm8k"][1], "It takes \\boxed{3} bolts.", "correct"),
        (sets["math500"][0], "So the point is $\\boxed{(3, \\frac{\\pi}{2})}$.", "correct"),
        (sets["math500"][1], "$\\boxed{4495}$", "correct"),
        (sets["math500"][1], "$\\boxed{4496}$", "incorrect"),
        (sets["math"][1], "\\boxed{0.5}", "correct"),
        (sets["humaneval"][0], he_full, "pass"),  # whole function, `List` comes from the prompt's imports
        (sets["humaneval"][0], he_body, "pass"),  # a completion continues the prompt
        (sets["humaneval"][0], "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```", "fail"),
        (sets["mbpp"][0], "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```", "pass"),
        (sets["mbpp"][0], "```python\ndef similar_elements(a, b):\n    return tuple(set(a) | set(b))\n```", "fail"),
        (sets["mbpp"][1], "```python\ndef is_not_prime(n):\n    return undefined_helper(n)\n```", "fail"),
        (sets["alpacaeval2"][0], "anything", "none"),
    ]
    # the demo world's rows: its reference answer is right, its corrupted one wrong, in every domain
    demo_rows = [r for r in world.make_prompts("eval", sizes={"eval": 2, "train": 0})]
    path = tmp_path / "demo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_rows))
    demo_items = load_sets(_recipe(tmp_path, {"demo": path}))
    rng = random.Random(0)
    for row, item in zip(demo_rows, demo_items):
        good, bad = ("correct", "incorrect") if row["domain"] != "code" else ("pass", "fail")
        cases += [(item, world.good_response(row), good), (item, world.bad_response(row, rng), bad)]
    verdicts = check_all(recipe, [(item, text) for item, text, _ in cases])
    got = [(item.set, item.row_id, v.status) for (item, _, _), v in zip(cases, verdicts)]
    assert got == [(item.set, item.row_id, want) for item, _, want in cases]
    assert [v.correct for v in verdicts[-2:]] == [True, False]
    # the stage's verdicts agree with the demo world's own evaluator
    for (item, text, _), v in zip(cases[-len(demo_rows) * 2:], verdicts[-len(demo_rows) * 2:]):
        assert world.evaluate_response(item.domain, item.row, text) == v.correct


def _code_item(tests: list[str], prelude: str = "") -> Item:
    return Item(set="mbpp", column="mbpp", domain="code", row_id="0", prompt="", check="code", tests=tests,
                prelude=prelude)


EUID = "```python\nimport os\n\ndef euid():\n    return os.geteuid()\n```"


def test_eval_checks_run_in_the_recipes_sandbox(tmp_path, capfd):
    """The isolation mode the recipe insists on holds for eval's code checks as for scoring's: in
    "userns" mode the code runs as the namespace's own uid; "none" warns that nothing isolates it."""
    from fusechat.eval.checks import check_all
    from fusechat.scoring.checks import Checkers
    from fusechat.scoring.sandbox import USERNS_UID

    code = {"workers": 1, "timeout_s": 5, "memory_mb": 256}
    recipe = _recipe(tmp_path, {}, scoring={**BASE_RECIPE["scoring"], "code": {**code, "isolation": "userns"}})
    with Checkers(recipe) as checkers:
        (v,) = check_all(recipe, [(_code_item([f"assert euid() == {USERNS_UID}"]), EUID)], checkers=checkers)
        assert v.status == "pass", v.detail
        assert checkers.isolation["mode"] == "userns"
    capfd.readouterr()
    recipe = _recipe(tmp_path, {}, scoring={**BASE_RECIPE["scoring"], "code": {**code, "isolation": "none"}})
    (v,) = check_all(recipe, [(_code_item([f"assert euid() == {os.geteuid()}"]), EUID)])
    assert v.status == "pass", v.detail
    assert "warning: code checks without full isolation" in capfd.readouterr().err


def test_a_refused_isolation_mode_stops_eval(tmp_path):
    """Root inside a user namespace cannot run checks under their own uid: a recipe insisting on
    "uid" stops eval's checks with the reason, as it stops the score stage."""
    import subprocess
    import sys
    import textwrap

    recipe = _recipe(tmp_path, {}, scoring={**BASE_RECIPE["scoring"], "code": {"workers": 1, "isolation": "uid"}})
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    script = tmp_path / "inside.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        uid, gid = os.geteuid(), os.getegid()
        assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0, "no user namespace here"
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")):
            with open(f"/proc/self/{{name}}", "w") as f:
                f.write(text)
        from fusechat.eval.checks import check_all
        from fusechat.eval.sets import Item
        from fusechat.recipe import Recipe
        from fusechat.scoring.sandbox import IsolationUnavailable

        recipe = Recipe.model_validate_json(open({str(tmp_path / "recipe.json")!r}).read())
        item = Item(set="mbpp", column="mbpp", domain="code", row_id="0", prompt="", check="code",
                    tests=["assert f() == 1"])
        try:
            print("checked:", check_all(recipe, [(item, "def f():\\n    return 1\\n")])[0].status)
        except IsolationUnavailable as e:
            print("refused:", e)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: sandbox isolation 'uid' is refused here" in out.stdout, out.stdout


def test_eval_code_checks_run_after_the_items_prelude(tmp_path):
    """A judge's imports (LeetCode's) come before the answer, in static analysis and in the run."""
    from fusechat.eval.checks import check_all
    from fusechat.prompts.leetcode import JUDGE_IMPORTS

    recipe = _recipe(tmp_path, {}, scoring={**BASE_RECIPE["scoring"], "code": {"workers": 1, "timeout_s": 5}})
    answer = "```python\ndef f(d: Dict[str, int]) -> int:\n    return len(deque(d)) + math.gcd(4, 6)\n```"
    tests = ["assert f({'a': 1}) == 3"]
    with_prelude, without = check_all(recipe, [(_code_item(tests, JUDGE_IMPORTS), answer), (_code_item(tests), answer)])
    assert with_prelude.status == "pass", with_prelude.detail
    assert without.status == "fail" and "undefined name 'Dict'" in without.detail


def test_humaneval_program_assembly():
    item = load_set("humaneval", [json.loads(FILES["humaneval"].read_text())])[0]
    body = response_code(item, "```python\n    return False\n```")
    assert body.startswith(item.code_prefix) and body.endswith("    return False\n")
    full = response_code(item, "```python\ndef has_close_elements(n, t):\n    return False\n```")
    assert full.splitlines()[0] == "from typing import List" and "def has_close_elements(n, t)" in full


# -- metrics and outputs ------------------------------------------------------------------------
def _g(model, pid, reward, correct=None, column="c", set_="s", text=None):
    return {"model": model, "set": set_, "prompt_id": pid, "column": column, "correct": correct, "reward": reward,
            "text": f"the answer of {model} to {pid}" if text is None else text}


def test_win_rate_and_accuracy_on_a_hand_made_table():
    from fusechat.eval.report import metrics

    base = [_g("base", p, r, c) for p, r, c in [("1", 0.5, True), ("2", 2.0, False), ("3", 5.0, False), ("4", 1.0, False)]]
    # model: wins on 1 and 4, ties on 2, loses on 3 -> (2 + 0.5) / 4
    model = [_g("m", p, r, c) for p, r, c in [("1", 1.0, True), ("2", 2.0, True), ("3", 3.0, False), ("4", 4.0, True)]]
    # prompt 5 has no base response and prompt 4's reward is missing: both left out of the win rate
    other = [_g("o", "1", 0.0, True), _g("o", "4", None, True), _g("o", "5", 9.0, True)]
    # an empty response has no reward but loses to any scored one; two empty ones tie
    base.append(_g("base", "6", None, column="d", text=" "))
    empty = [_g("e", "1", None, text=""), _g("e", "2", 0.1), _g("e", "6", None, column="d", text="")]
    # the base's own text is a tie even where its batch rounded the reward differently
    same = [_g("t", "1", 0.5 + 1e-7, text=base[0]["text"]), _g("t", "2", 2.0 - 1e-7, text=base[1]["text"])]
    res = {(r["model"], r["domain"], r["metric"]): r["value"]
           for r in metrics(base + model + other + empty + same, ["c"], {"c": 5}, "base")}
    assert res[("t", "all", "win_rate")] == 50.0
    assert res[("m", "all", "win_rate")] == pytest.approx(62.5)
    assert res[("m", "c", "win_rate")] == pytest.approx(62.5)
    assert res[("o", "all", "win_rate")] == 0.0 and res[("o", "all", "win_rate_prompts")] == 1.0
    # accuracy over the whole set of 5 items: unanswered items count as wrong
    assert res[("m", "c", "accuracy")] == pytest.approx(60.0)
    assert res[("base", "c", "accuracy")] == pytest.approx(20.0)
    assert res[("o", "average", "accuracy")] == pytest.approx(60.0)
    assert ("base", "all", "win_rate") not in res
    assert res[("e", "all", "win_rate")] == pytest.approx(100 * 0.5 / 3) and res[("e", "d", "win_rate")] == 50.0


def test_held_out_judgement_and_the_builds_audit_in_the_notes(tmp_path):
    from fusechat import audit
    from fusechat.eval.report import audit_notes, held_out_judgement

    # item 1: right .9 and .2 against wrong .5 -> 1 of 2 pairs, top pick right; item 2: only right
    # replies; item 3: a tie between right and wrong -> half a pair, top pick half right; unchecked
    # and unscored replies take no part
    gen = [_g("a", "1", 0.9, True), _g("b", "1", 0.2, True), _g("c", "1", 0.5, False),
           _g("a", "2", 0.3, True), _g("b", "2", 0.1, True),
           _g("a", "3", 0.4, True), _g("b", "3", 0.4, False), _g("c", "3", None, False), _g("d", "3", 0.9, None)]
    held = held_out_judgement(gen).iloc[0]
    assert (held["domain"], held["prompts"], held["prompts_right"], held["competing"], held["pairs"]) == ("c", 3, 3, 2, 3)
    assert held["pairwise_accuracy"] == pytest.approx(1.5 / 3)
    assert held["top1_right"] == pytest.approx((1 + 0.5) / 2)
    assert held["chance"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    notes, warnings = audit_notes(tmp_path, gen)
    assert "| c | 3 of 3 | 2 | 0.50 | 75% | 58% |" in notes and warnings == []
    assert "training data" not in notes  # no build here
    (tmp_path / audit.AUDIT_FILE).write_text(json.dumps({"judged": [], "warnings": ["w"]}))
    notes, warnings = audit_notes(tmp_path, gen)
    assert warnings == ["w"] and "WARNING: w." in notes and "training data (build)" in notes


def test_export_layouts(tmp_path):
    from fusechat.eval.export import alpacaeval_rows, arena_hard_rows, write_alpacaeval, write_arena_hard

    rows = json.loads(FILES["alpacaeval2"].read_text())
    path = write_alpacaeval(tmp_path, "m1", alpacaeval_rows("m1", [(r, f"out {i}") for i, r in enumerate(rows)]))
    assert path == tmp_path / "alpacaeval2" / "m1.json"
    got = json.loads(path.read_text())
    assert [set(r) for r in got] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert [r["instruction"] for r in got] == [r["instruction"] for r in rows]
    assert got[1] == {"instruction": rows[1]["instruction"], "output": "out 1", "generator": "m1", "dataset": "koala"}

    qs = [json.loads(line) for line in FILES["arena_hard"].read_text().splitlines()]
    path = write_arena_hard(tmp_path, "m1", arena_hard_rows("m1", "rev", [(q, "answer", 7) for q in qs]))
    assert path == tmp_path / "arena_hard" / "model_answer" / "m1.jsonl"
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in got] == [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 2
    assert got[0]["choices"] == [{"index": 0, "turns": [{"content": "answer", "token_len": 7}]}]
    assert [r["question_id"] for r in got] == [q["question_id"] for q in qs] and got[0]["model_id"] == "m1"
    assert got[0]["answer_id"] != got[1]["answer_id"] and isinstance(got[0]["tstamp"], float)


# -- the stage end to end -------------------------------------------------------------------------
VLLM = {"enforce_eager": True, "dtype": "float32", "max_model_len": 1024}


@pytest.fixture(scope="module")
def evaluated(tiny_models, tiny_armorm, tmp_path_factory):
    import yaml

    from fusechat.demo import world
    from fusechat.eval.stage import run_eval
    from fusechat.recipe import load_recipe

    folder = tmp_path_factory.mktemp("eval-stage")
    world.write_prompts(folder / "demo", sizes={"eval": 2, "train": 1})
    recipe_data = {
        "name": "eval-e2e", "run_dir": "run", "seed": 3,
        "sources": [
            {"name": "src-llama", "model": str(tiny_models["llama3"]), "family": "llama3", "engine_options": VLLM},
            {"name": "src-qwen", "model": str(tiny_models["qwen2"]), "family": "qwen2", "engine_options": VLLM},
        ],
        "datasets": [{"name": "d", "path": "demo/train", "adapter": "demo", "domain": "math"}],
        "scoring": {"reward_model": {"model": str(tiny_armorm)}, "code": {"timeout_s": 5, "workers": 1},
                    "math": {"workers": 1}},
        "target": {"model": str(tiny_models["mistral"]), "family": "mistral"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
        "eval": {"benchmarks": ["demo", "gsm8k"], "max_tokens": 12, "engine": "transformers",
                 "engine_options": {"batch_size": 16},
                 "files": {"demo": "demo/eval", "gsm8k": str(FILES["gsm8k"]), "humaneval": str(FILES["humaneval"]),
                           "alpacaeval2": str(FILES["alpacaeval2"]), "arena_hard": str(FILES["arena_hard"])}},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe_data, allow_unicode=True))
    recipe = load_recipe(folder / "recipe.yaml")
    # a trained SFT target is any model folder under models/<recipe name>/sft
    shutil.copytree(tiny_models["gemma2"], recipe.run_path() / "models" / "eval-e2e" / "sft")
    manifest = run_eval(recipe)
    return recipe, manifest


MODELS = ["src-llama", "src-qwen", "target-base", "target-sft"]


@pytest.mark.slow
def test_stage_end_to_end(evaluated):
    import pyarrow.parquet as pq

    recipe, man = evaluated
    out = recipe.run_path() / "eval"
    items = 8 + 2 + 1 + 3 + 2  # demo 4 domains x 2, gsm8k, humaneval, alpacaeval, arena-hard
    assert man.rows_in == items * len(MODELS) == man.rows_out + sum(man.dropped.values())
    gen = pq.read_table(out / "generations.parquet").to_pylist()
    assert len(gen) == man.rows_out == man.outputs["generations.parquet"]
    assert {g["model"] for g in gen} == set(MODELS)
    assert {g["set"] for g in gen} == {"demo", "gsm8k", "humaneval", "alpacaeval2", "arena_hard"}
    assert all((g["correct"] is None) == (g["set"] in ("alpacaeval2", "arena_hard")) for g in gen)
    assert all(isinstance(g["reward"], float) for g in gen if g["text"].strip())
    assert {g["check_status"] for g in gen if g["set"] == "humaneval"} <= {"pass", "fail", "timeout", "error"}
    # the verdicts are the real checkers' on the real texts (recomputed here from the world's rule)
    from fusechat.demo import world

    rows = {r["id"]: r for d in world.DOMAINS for r in map(json.loads, (recipe.run_path().parent / "demo" / "eval" / f"{d}.jsonl").read_text().splitlines())}
    for g in gen:
        if g["set"] == "demo" and g["domain"] in ("instruction", "chinese"):
            assert world.evaluate_response(g["domain"], rows[g["prompt_id"]], g["text"]) == g["correct"]

    res = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["model"] for r in res} == set(MODELS)
    cols = ["demo-math", "demo-code", "demo-instruction", "demo-chinese", "gsm8k", "humaneval"]
    acc = {(r["model"], r["domain"]): r["value"] for r in res if r["metric"] == "accuracy"}
    for m in MODELS:
        assert acc[(m, "average")] == pytest.approx(sum(acc[(m, c)] for c in cols) / len(cols))
    wr = {r["model"]: r["value"] for r in res if r["metric"] == "win_rate" and r["domain"] == "all"}
    assert set(wr) == set(MODELS) - {"target-base"} and all(0 <= v <= 100 for v in wr.values())
    # the win rate recomputed from the generations table
    def score(g):
        return float("-inf") if not g["text"].strip() else g["reward"]

    base = {(g["set"], g["prompt_id"]): score(g) for g in gen if g["model"] == "target-base"}
    for m in set(MODELS) - {"target-base"}:
        mine = [(score(g), base[(g["set"], g["prompt_id"])]) for g in gen if g["model"] == m]
        assert len(mine) == items
        assert wr[m] == pytest.approx(100 * sum(1.0 if a > b else 0.5 if a == b else 0 for a, b in mine) / len(mine))

    table = (out / "table.md").read_text()
    assert "| model | " + " | ".join(cols) + " | average | win rate vs base |" in table
    results_table = table.split("\n\n")[1]  # the title, the results table, then the notes
    assert [line.split("|")[1].strip() for line in results_table.splitlines() if line.startswith("| ")][1:] == MODELS
    # the reward model judged on the held-out replies, recomputed here from the generations
    assert "## Reward model on the held-out replies" in table
    png = (out / "gains.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for m in MODELS:
        assert len(json.loads((out / "alpacaeval2" / f"{m}.json").read_text())) == 3
        assert len((out / "arena_hard" / "model_answer" / f"{m}.jsonl").read_text().splitlines()) == 2
    assert (out / "manifest.json").exists() and man.extra["failures"] == {}
    assert all(math.isfinite(v) for v in acc.values())


@pytest.mark.slow
def test_rerun_regenerates_nothing(evaluated):
    import pyarrow.parquet as pq

    from fusechat.eval.stage import run_eval

    recipe, first = evaluated
    before = pq.read_table(recipe.run_path() / "eval" / "generations.parquet")
    again = run_eval(recipe)
    assert again.extra["computed_shards"] == {m: 0 for m in MODELS}
    assert first.extra["computed_shards"]["src-llama"] > 0
    after = pq.read_table(recipe.run_path() / "eval" / "generations.parquet")
    assert after.select(["model", "prompt_id", "text", "reward"]).equals(before.select(["model", "prompt_id", "text", "reward"]))
    # a retrained SFT target (same file sizes, other weights) is generated again; nothing else is
    sft = recipe.run_path() / "models" / "eval-e2e" / "sft"
    weights = next(sft.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last weight's last bit
    weights.write_bytes(bytes(data))
    third = run_eval(recipe)
    assert {m: n > 0 for m, n in third.extra["computed_shards"].items()} == {m: m == "target-sft" for m in MODELS}
    assert third.models["target-sft"] != again.models["target-sft"]


@pytest.mark.slow
def test_model_that_fails_to_load_keeps_the_others(evaluated, tmp_path):
    import pyarrow.parquet as pq

    from fusechat.eval.stage import EvalError, run_eval
    from fusechat.sampling.stage import LOAD_FAILED_REASON

    recipe, _ = evaluated
    broken = tmp_path / "broken-target"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    bad = recipe.model_copy(update={"target": recipe.target.model_copy(update={"model": str(broken)})})
    with pytest.raises(EvalError, match=r"target-base.*broken-target"):
        run_eval(bad)
    out = recipe.run_path() / "eval"
    man = json.loads((out / "manifest.json").read_text())
    items = man["extra"]["sets"]
    assert man["dropped"] == {LOAD_FAILED_REASON: sum(items.values())}
    assert man["rows_in"] == man["rows_out"] + man["dropped"][LOAD_FAILED_REASON]
    gen = pq.read_table(out / "generations.parquet").to_pylist()
    assert {g["model"] for g in gen} == {"src-llama", "src-qwen", "target-sft"}  # kept, not regenerated
    assert all(n == 0 for n in man["extra"]["computed_shards"].values())
    # no base responses: no win rates, accuracies still there
    res = pq.read_table(out / "results.parquet").to_pylist()
    assert not [r for r in res if r["metric"] == "win_rate"] and len([r for r in res if r["domain"] == "average"]) == 3
