"""Prompt stage on the shipped fixtures: every adapter, every filter, the books, the errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusechat.prompts import PromptDataError, build_prompts
from fusechat.prompts.classify import classify
from fusechat.prompts.leetcode import parse_example
from fusechat.recipe import Recipe
from fusechat.run import stable_hash

ROOT = Path(__file__).resolve().parents[1]
FX = ROOT / "data" / "fixtures"
EVALS = [f"data/fixtures/decontamination/{f}" for f in
         ("gsm8k_test.jsonl", "math500_test.jsonl", "humaneval.jsonl", "mbpp_test.jsonl")]
DATASETS = [
    ("ultrafeedback", "data/fixtures/ultrafeedback", "ultrafeedback", "instruction"),
    ("magpie-pro-dpo", "data/fixtures/magpie_pro_dpo", "magpie_pro_dpo", "instruction"),
    ("helpsteer2", "data/fixtures/helpsteer2/train.jsonl.gz", "helpsteer2", "instruction"),
    ("openmathinstruct2", "data/fixtures/openmathinstruct2/train_1M.parquet", "openmathinstruct2", "math"),
    ("leetcode", "data/fixtures/leetcode/leetcode-train.jsonl", "leetcode", "code"),
    ("self-oss-instruct", "data/fixtures/self_oss_instruct", "self_oss_instruct", "code"),
    ("alpaca-gpt4-zh", "data/fixtures/alpaca_gpt4_zh/alpaca_gpt4_data_zh.json", "alpaca_gpt4_zh", "chinese"),
    ("magpie-qwen2-zh", "data/fixtures/magpie_qwen2_zh/train.parquet", "magpie_qwen2_zh", "chinese"),
]


def make_recipe(run_dir: Path, datasets=DATASETS, seed: int = 0, **filters) -> Recipe:
    filters = {"max_prompt_chars": 2000, "decontaminate": EVALS, **filters}
    return Recipe.model_validate({
        "name": "prompts-test", "run_dir": str(run_dir), "seed": seed, "base_dir": str(ROOT),
        "sources": [{"name": "s", "model": "unused", "family": "llama3"}],
        "datasets": [
            d if isinstance(d, dict) else {"name": d[0], "path": d[1], "adapter": d[2], "domain": d[3]}
            for d in datasets
        ],
        "filters": filters,
        "scoring": {"reward_model": {"model": "unused"}},
        "target": {"model": "unused", "family": "llama3"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    })


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = tmp_path_factory.mktemp("prompts-run")
    manifest = build_prompts(make_recipe(run))
    prompts = pq.read_table(run / "prompts" / "prompts.parquet").to_pylist()
    dropped = pq.read_table(run / "prompts" / "dropped.parquet").to_pylist()
    return manifest, prompts, dropped, run


def kept(prompts, dataset):
    return {json.loads(p["meta"])["row"]: p for p in prompts if p["dataset"] == dataset}


def reasons(dropped, dataset):
    return {d["row"]: d["reason"] for d in dropped if d["dataset"] == dataset}


def user(content):
    return [{"role": "user", "content": content}]


# -- each adapter on its fixture -------------------------------------------------------------
def test_ultrafeedback(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "ultrafeedback")
    # files of the folder are read in name order: evol_instruct (0-4), sharegpt (5-10), truthful_qa (11-12)
    assert k[1]["messages"] == user(
        "Rewrite the following sentence in passive voice: The committee approved the new budget on Friday."
    )
    assert k[11]["messages"] == user("What happens if you crack your knuckles a lot?")
    assert sorted(k) == [1, 3, 6, 7, 9, 11]
    assert json.loads(k[9]["meta"])["source"] == "sharegpt"
    assert all(p["domain"] == "instruction" and p["gold_answer"] is None and p["tests"] is None for p in k.values())
    assert reasons(dropped, "ultrafeedback") == {
        0: "off_domain_code", 2: "off_domain_math", 4: "empty", 5: "too_long", 8: "near_duplicate",
        10: "off_domain_code", 12: "duplicate",
    }


def test_magpie_pro_dpo_reads_the_train_split_and_its_task_category(built, tmp_path):
    _, prompts, dropped, _ = built
    k = kept(prompts, "magpie-pro-dpo")
    assert [k[r]["messages"][0]["content"] for r in sorted(k)] == [
        "What are the main causes of the decline in bee populations worldwide?",
        "Help me plan a 5-day workout routine for a beginner who wants to build strength.",
        "Write a short poem about autumn leaves falling in a quiet park.",
    ]
    assert json.loads(k[0]["meta"])["task_category"] == "Information seeking"
    # 1: category Coding & Debugging (text alone looks harmless), 2: category Math,
    # 5: exact copy of an UltraFeedback prompt, 6: a word problem filed under "Reasoning"
    assert reasons(dropped, "magpie-pro-dpo") == {
        1: "off_domain_code", 2: "off_domain_math", 5: "duplicate", 6: "off_domain_math"
    }
    detail = {d["row"]: d["detail"] for d in dropped if d["dataset"] == "magpie-pro-dpo"}
    assert "Coding & Debugging" in detail[1] and "earlier data set" in detail[5]

    test = [("magpie-pro-dpo", "data/fixtures/magpie_pro_dpo", "magpie_pro_dpo", "instruction")]
    recipe = make_recipe(tmp_path, datasets=[{**dict(zip(("name", "path", "adapter", "domain"), test[0])),
                                              "split": "test"}])
    assert build_prompts(recipe).rows_in == 2


def test_helpsteer2_splits_turns_and_drops_repeated_prompts(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "helpsteer2")
    assert sorted(k) == [0, 2, 5, 6]
    assert k[2]["messages"] == [
        {"role": "user", "content": "I want to start a vegetable garden in my backyard. Where should I begin?"},
        {"role": "assistant", "content": "Start small: pick a sunny spot with at least six hours of light, "
                                         "test the soil, and plan a 4x8 ft raised bed."},
        {"role": "user", "content": "What vegetables are easiest for beginners?"},
    ]
    assert [m["role"] for m in k[6]["messages"]] == ["user", "assistant", "user"]
    assert k[6]["messages"][1]["content"].startswith("Dear Mr. Alvarez,\n\nI am writing")
    assert reasons(dropped, "helpsteer2") == {1: "duplicate", 3: "duplicate", 4: "off_domain_code"}


def test_openmathinstruct2_gold_answers_and_merged_solutions(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "openmathinstruct2")
    assert {r: p["gold_answer"] for r, p in k.items()} == {0: "72", 2: "12", 3: "91", 5: "\\frac{19}{12}"}
    assert k[3]["messages"] == user("Find the sum of all positive divisors of 36.")
    assert all(p["domain"] == "math" and p["tests"] is None for p in k.values())
    natalia = json.loads(k[0]["meta"])
    assert natalia["problem_source"] == "gsm8k"
    assert len(natalia["solutions"]) == 2 and natalia["solutions"][1].endswith("\\boxed{72}.")
    # 4: a GSM8K test question, 7: a MATH-500 problem, 6: row 0 with one extra space
    assert reasons(dropped, "openmathinstruct2") == {
        1: "duplicate", 4: "contaminated", 6: "near_duplicate", 7: "contaminated"
    }


def test_leetcode_tests_from_examples_checked_against_the_reference(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "leetcode")
    assert {r: p["tests"] for r, p in k.items()} == {
        0: ["assert twoSum([2, 7, 11, 15], 9) == [0, 1]", "assert twoSum([3, 2, 4], 6) == [1, 2]",
            "assert twoSum([3, 3], 6) == [0, 1]"],
        1: ["assert is_palindrome(121) == True", "assert is_palindrome(-121) == False",
            "assert is_palindrome(10) == False"],
        2: ["assert is_valid('() ') == True", "assert is_valid('()[]{} ') == True",
            "assert is_valid('(] ') == False"],
        # example 1's "any order" answer differs from the reference's order: that assert is dropped
        5: ["assert group_anagrams(['']) == [['']]", "assert group_anagrams(['a']) == [['a']]"],
        6: ["assert climbStairs(2) == 2", "assert climbStairs(3) == 3"],
    }
    two_sum = k[0]
    assert two_sum["messages"][0]["content"].endswith(
        "**Only one valid answer exists.**\n\nWrite the solution in Python as a function `twoSum(nums, target)`."
    )
    meta = json.loads(two_sum["meta"])
    assert meta["entry_point"] == "twoSum" and meta["slug"] == "two-sum"
    # the setup lets a `class Solution` answer satisfy the same asserts
    scope: dict = {}
    exec("class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n" + meta["test_setup"], scope)
    exec(two_sum["tests"][0], scope)
    detail = {d["row"]: d["detail"] for d in dropped if d["dataset"] == "leetcode"}
    assert reasons(dropped, "leetcode") == {3: "code_without_tests", 4: "code_without_tests"}
    assert detail[3] == "2 examples, 2 parsed, 0 pass the reference solution"  # linked lists written as arrays
    assert "no Input/Output examples" in detail[4]  # a design problem


def test_self_oss_instruct_uses_instruction_and_response_asserts(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "self-oss-instruct")
    assert k[0]["messages"] == user(
        "Write a Python function `is_even(n)` that returns `True` if the integer `n` is even and `False` otherwise."
    )
    assert {r: p["tests"] for r, p in k.items()} == {
        0: ["assert is_even(4)", "assert not is_even(7)", "assert is_even(0)"],
        1: ["assert reverse_words('hello world') == 'world hello'", "assert reverse_words('a b c') == 'c b a'"],
        3: ["assert distance(p, q) == 5.0", "assert distance(q, q) == 0.0"],
        4: ["assert add(1, 2) == 3"],
    }
    assert json.loads(k[3]["meta"])["test_setup"] == "p = (0, 0)\nq = (3, 4)"
    # one block mixing implementation and assert: the implementation must not become test setup
    assert "test_setup" not in json.loads(k[4]["meta"])
    # 2: no asserts anywhere; 5: an MBPP test question (shorter than the n-gram, matched whole)
    assert reasons(dropped, "self-oss-instruct") == {2: "code_without_tests", 5: "contaminated"}
    source = pq.read_table(FX / "self_oss_instruct/data/train-00000-of-00001.parquet").to_pylist()
    assert all(p["messages"][0]["content"] != source[r]["prompt"] for r, p in k.items())


def test_alpaca_gpt4_zh_joins_instruction_and_input(built):
    _, prompts, dropped, _ = built
    k = kept(prompts, "alpaca-gpt4-zh")
    assert {r: p["messages"] for r, p in k.items()} == {
        0: user("保持健康的三个提示。"),
        1: user("将以下句子翻译成英文。\n\n我今天很开心，因为天气很好。"),
        4: user("解释为什么天空是蓝色的。"),
    }
    assert {p["domain"] for p in k.values()} == {"chinese"}
    assert reasons(dropped, "alpaca-gpt4-zh") == {2: "off_domain_code", 3: "off_domain_math", 5: "duplicate",
                                                  6: "empty"}


def test_magpie_qwen2_zh(built, tmp_path):
    _, prompts, dropped, _ = built
    k = kept(prompts, "magpie-qwen2-zh")
    assert sorted(k) == [0, 3, 4]  # 4 differs from 0 by two characters: similarity 0.83 < 0.9, kept
    assert k[3]["messages"] == user("我最近工作压力很大，晚上总是睡不着，有什么建议吗？")
    assert reasons(dropped, "magpie-qwen2-zh") == {
        1: "off_domain_code", 2: "off_domain_math", 5: "off_domain_math", 6: "near_duplicate"
    }
    # the parent layout may have only the ShareGPT-style conversation
    rows = pq.read_table(FX / "magpie_qwen2_zh/train.parquet").drop_columns(["instruction"])
    pq.write_table(rows, tmp_path / "conv.parquet")
    recipe = make_recipe(tmp_path / "run", datasets=[
        ("zh", str(tmp_path / "conv.parquet"), "magpie_qwen2_zh", "chinese")])
    build_prompts(recipe)
    again = pq.read_table(tmp_path / "run/prompts/prompts.parquet").to_pylist()
    assert [p["messages"] for p in again] == [k[r]["messages"] for r in sorted(k)]


# -- the books --------------------------------------------------------------------------------
def test_every_row_is_kept_or_dropped_once_and_the_manifest_balances(built):
    manifest, prompts, dropped, run = built
    manifest.check_balance()
    assert manifest.rows_in == 62 and manifest.rows_out == len(prompts) == 32
    assert manifest.dropped == dict(Counter(d["reason"] for d in dropped))
    assert manifest.dropped == {
        "empty": 2, "too_long": 1, "off_domain_code": 6, "off_domain_math": 6, "code_without_tests": 3,
        "duplicate": 6, "contaminated": 3, "near_duplicate": 3,
    }
    rows = [(p["dataset"], json.loads(p["meta"])["row"]) for p in prompts] + [(d["dataset"], d["row"]) for d in dropped]
    assert len(rows) == len(set(rows)) == manifest.rows_in
    per = manifest.extra["per_dataset"]
    assert all(c["read"] == c["kept"] + sum(c["dropped"].values()) for c in per.values())
    assert len({p["prompt_id"] for p in prompts}) == len(prompts)
    assert manifest.extra["decontamination"]["math500_test.jsonl"] == {"column": "problem", "texts": 1, "too_short": 1}
    assert json.loads((run / "prompts/manifest.json").read_text())["rows_out"] == 32


def test_ids_are_content_hashes_stable_across_runs(built, tmp_path):
    _, prompts, _, _ = built
    p = prompts[0]
    normalized = [{"role": m["role"], "content": " ".join(m["content"].split())} for m in p["messages"]]
    assert p["prompt_id"] == stable_hash(p["dataset"], normalized)
    build_prompts(make_recipe(tmp_path))
    again = pq.read_table(tmp_path / "prompts/prompts.parquet").to_pylist()
    assert [q["prompt_id"] for q in again] == [q["prompt_id"] for q in prompts]


def test_unchanged_recipe_reuses_the_table_and_a_change_rebuilds(tmp_path):
    data = DATASETS[6:7]  # alpaca: small and quick
    first = build_prompts(make_recipe(tmp_path, datasets=data))
    table = tmp_path / "prompts/prompts.parquet"
    stamp = table.stat().st_mtime_ns
    again = build_prompts(make_recipe(tmp_path, datasets=data))
    assert again.started_at == first.started_at and table.stat().st_mtime_ns == stamp
    changed = build_prompts(make_recipe(tmp_path, datasets=data, drop_code_math_from_instruction=False))
    assert changed.started_at != first.started_at and changed.rows_out == first.rows_out + 2


def test_filters_switched_off_keep_what_they_dropped(tmp_path):
    m = build_prompts(make_recipe(
        tmp_path, drop_code_math_from_instruction=False, require_code_tests=False, exact_dedup=False,
        near_dedup_threshold=None, decontaminate=[],
    ))
    m.check_balance()
    assert m.dropped == {"empty": 2, "too_long": 1}
    code = [p for p in pq.read_table(tmp_path / "prompts/prompts.parquet").to_pylist() if p["domain"] == "code"]
    assert sum(p["tests"] is None for p in code) == 3


def test_limit_keeps_a_seeded_sample_and_leaves_room_for_later_sets(tmp_path):
    data = [dict(zip(("name", "path", "adapter", "domain"), DATASETS[0]), limit=3), DATASETS[1]]
    chosen = []
    for seed in (0, 0, 1, 2):
        run = tmp_path / f"run{len(chosen)}"
        m = build_prompts(make_recipe(run, datasets=data, seed=seed))
        m.check_balance()
        assert m.dropped["over_limit"] == 3
        rows = pq.read_table(run / "prompts/prompts.parquet").to_pylist()
        uf = [json.loads(p["meta"])["row"] for p in rows if p["dataset"] == "ultrafeedback"]
        assert len(uf) == 3 and uf == sorted(uf)
        chosen.append(uf)
        # Magpie's copy of the meditation prompt (UltraFeedback row 3) survives when the limit left it out
        magpie_kept = any(json.loads(p["meta"])["row"] == 5 for p in rows if p["dataset"] == "magpie-pro-dpo")
        assert magpie_kept == (3 not in uf)
    assert chosen[0] == chosen[1]
    assert len({tuple(c) for c in chosen}) > 1


# -- classifier and example parsing -----------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Write a Python script to rename every file in a folder.", "code"),
    ("Write a function that reverses a linked list.", "code"),
    ("Why does this fail?\n```js\nconsole.log(x)\n```", "code"),
    ("import numpy as np\nwhat does this line do?", "code"),
    ("请编写一个函数，计算列表的平均值", "code"),
    ("用Python写一个快速排序", "code"),
    ("Solve for x: 3x - 7 = 11", "math"),
    ("What is the value of $x^2 + 1$ when $x = 3$?", "math"),
    ("Find the probability of rolling two sixes with two dice.", "math"),
    ("Tom has 12 apples and gives 5 away. How many are left?", "math"),
    ("计算 25 乘以 4 等于多少？", "math"),
    ("Write a program for my sister's wedding ceremony.", None),
    ("Draft a code of conduct for our volunteers.", None),
    ("What is the capital of Australia?", None),
    ("Describe the water cycle in 3 sentences.", None),
    ("请介绍一下计算机的发展历史。", None),
    ("我想学习Java，有什么建议？", None),
])
def test_classifier(text, expected):
    found = classify(text)
    assert (found[0] if found else None) == expected


def test_classifier_trusts_magpie_task_category():
    assert classify("How do I fix this KeyError?", "Coding & Debugging")[0] == "code"
    assert classify("Help me plan a trip.", "Planning") is None


def test_leetcode_example_literals():
    assert parse_example("nums = \\[2,7,11,15\\], target = 9", "\\[0,1\\]") == (["nums", "target"], [[2, 7, 11, 15], 9], [0, 1])
    assert parse_example('s = "a,b = c", k = 2', "true") == (["s", "k"], ["a,b = c", 2], True)
    assert parse_example("root = \\[1,null,2\\]", "null") == (["root"], [[1, None, 2]], None)
    with pytest.raises(ValueError):
        parse_example('\\["MinStack","push"\\]', "\\[null\\]")


# -- errors name the data set, the row and the column -----------------------------------------
def test_unknown_adapter(tmp_path):
    recipe = make_recipe(tmp_path, datasets=[("uf", "data/fixtures/ultrafeedback", "ultra_feedback", "instruction")])
    with pytest.raises(PromptDataError) as e:
        build_prompts(recipe)
    msg = str(e.value)
    assert "datasets[0] 'uf' (data/fixtures/ultrafeedback)" in msg and "'ultra_feedback'" in msg
    assert "ultrafeedback" in msg.split("known adapters:")[1]


def test_missing_column(tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps({"source": "sharegpt", "prompt": "Hello there"}) + "\n")
    with pytest.raises(PromptDataError) as e:
        build_prompts(make_recipe(tmp_path / "run", datasets=[("uf", str(path), "ultrafeedback", "instruction")]))
    msg = str(e.value)
    assert f"'uf' ({path})" in msg and "needs column 'instruction'" in msg and "the table has source, prompt" in msg


@pytest.mark.parametrize("adapter, rows, where", [
    ("ultrafeedback", [{"instruction": "Hi"}, {"instruction": 42}], "row 1: column 'instruction': expected a string, got int"),
    ("helpsteer2", [{"prompt": "Hi"}, {"prompt": "Hi\n<extra_id_1>Assistant\nHello"}],
     "row 1: column 'prompt': the conversation ends with an assistant turn"),
    ("openmathinstruct2", [{"problem": "1+1?", "expected_answer": None}], "row 0: column 'expected_answer'"),
])
def test_bad_row(tmp_path, adapter, rows, where):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PromptDataError, match=f"'bad' \\({path}\\): {where}"):
        build_prompts(make_recipe(tmp_path / "run", datasets=[("bad", str(path), adapter, "instruction")]))


def test_evaluation_file_without_a_question_column(tmp_path):
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"task_id": [1], "answer": ["4"]}), path)
    with pytest.raises(PromptDataError, match="filters.decontaminate: eval.parquet .*found task_id, answer"):
        build_prompts(make_recipe(tmp_path / "run", datasets=DATASETS[6:7], decontaminate=[str(path)]))


def test_unknown_split_names_the_data_set(tmp_path):
    d = dict(zip(("name", "path", "adapter", "domain"), DATASETS[1]), split="validation")
    with pytest.raises(PromptDataError, match=r"'magpie-pro-dpo' \(data/fixtures/magpie_pro_dpo\): cannot load split 'validation'"):
        build_prompts(make_recipe(tmp_path, datasets=[d]))


# -- each filter on its own ---------------------------------------------------------------------------
def _rec(i: int, text: str, dataset: str = "d", **meta) -> dict:
    from fusechat.prompts.stage import _normalized
    from fusechat.run import stable_hash

    messages = [{"role": "user", "content": text}]
    return {"prompt_id": f"p{i}", "dataset": dataset, "domain": "instruction", "messages": messages,
            "gold_answer": None, "tests": None, "meta": dict(meta), "row": i, "text": text,
            "hash": stable_hash(_normalized(messages))}


def _books(*datasets: str):
    from fusechat.prompts.stage import _Books

    books = _Books()
    for d in datasets or ("d",):
        books.per_dataset[d] = {"read": 0, "kept": 0, "dropped": {}}
    return books


def test_row_filters_each_say_why():
    from fusechat.prompts.base import Prompt
    from fusechat.prompts.stage import ROW_FILTERS, _code_without_tests, _empty, _off_domain, _too_long
    from fusechat.recipe import Filters, PromptDataset

    f = Filters(max_prompt_chars=20)
    inst = PromptDataset(name="i", path="x", adapter="ultrafeedback", domain="instruction")
    code = PromptDataset(name="c", path="x", adapter="self_oss_instruct", domain="code")

    def prompt(text, **kw):
        return Prompt([{"role": "user", "content": text}], **kw)

    assert _empty(prompt("  \n"), {}, inst, f) == ("empty", "")
    assert _empty(prompt("hi"), {}, inst, f) is None
    assert _too_long(prompt("x" * 21), {}, inst, f) == ("too_long", "21 chars > 20")
    assert _too_long(prompt("x" * 20), {}, inst, f) is None
    sql = "Write a Python function that sorts a list."
    reason, _ = _off_domain(prompt(sql), {"text": sql}, inst, f)
    assert reason == "off_domain_code"
    assert _off_domain(prompt(sql), {"text": sql}, code, f) is None  # a code set keeps its code
    assert _off_domain(prompt(sql), {"text": sql}, inst, Filters(drop_code_math_from_instruction=False)) is None
    no_tests = prompt("Write f.", meta={"tests_note": "no asserts"})
    assert _code_without_tests(no_tests, {}, code, f) == ("code_without_tests", "no asserts")
    assert _code_without_tests(prompt("Write f.", tests=["assert f()"]), {}, code, f) is None
    assert ROW_FILTERS == (_empty, _too_long, _off_domain, _code_without_tests)


def test_exact_duplicates_against_earlier_sets_and_own_rows():
    from fusechat.prompts.stage import _drop_exact_duplicates

    books = _books()
    first = _rec(0, "Solve x.", solutions=["a"])
    records = [first, _rec(1, "Solve   x.", solutions=["b"]), _rec(2, "Other."), _rec(3, "Seen before.")]
    kept = _drop_exact_duplicates(records, {records[3]["hash"]: "q9"}, books)
    assert [r["prompt_id"] for r in kept] == ["p0", "p2"]
    assert first["meta"]["solutions"] == ["a", "b"]  # a repeated problem keeps every solution
    assert [(d["prompt_id"], d["detail"]) for d in books.dropped] == [
        ("p1", "same as p0"), ("p3", "same as q9 (earlier data set)")]


def test_contaminated_near_duplicate_and_limit_filters(tmp_path):
    from fusechat.prompts.filters import Decontaminator, NearDedup
    from fusechat.prompts.stage import _drop_contaminated, _drop_near_duplicates, _limit, load_table

    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"question": "what is the capital city of the small country of Andorra today"}) + "\n")
    decon = Decontaminator([("eval.jsonl", str(evals))], 5, lambda p: load_table(p, "train"))
    books = _books()
    records = [_rec(0, "Tell me: what is the capital city of the small country please"), _rec(1, "Name a red fruit.")]
    assert [r["prompt_id"] for r in _drop_contaminated(records, decon, books)] == ["p1"]
    assert books.dropped[0]["reason"] == "contaminated" and "eval.jsonl" in books.dropped[0]["detail"]

    long = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat all day long"
    earlier = NearDedup(0.8)
    (sig,) = NearDedup.signatures_of([long + " today"])
    earlier.add("q0", sig)
    records = [_rec(0, long), _rec(1, long + " ok"), _rec(2, "A completely different request about gardening.")]
    books = _books()
    kept, signatures = _drop_near_duplicates(records, earlier, 0.8, "d", books)
    assert [r["prompt_id"] for r in kept] == ["p2"] and set(signatures) == {"p2"}
    assert [d["detail"].split(" with ")[1] for d in books.dropped] == ["q0", "q0"]

    records = [_rec(i, f"prompt {i}") for i in range(10)]
    books = _books()
    kept = _limit(records, 4, "seed", books)
    assert len(kept) == 4 and kept == sorted(kept, key=lambda r: r["row"])  # source order
    assert kept == _limit(records, 4, "seed", _books())  # seeded
    assert len(books.dropped) == 6 and {d["detail"] for d in books.dropped} == {"limit 4"}
    assert _limit(records, 10, "seed", books) == records


def test_leetcode_prompts_carry_the_judges_imports(built):
    """The code check runs LeetCode answers after the imports LeetCode's judge provides: the
    prompt says so in its own data, so no later stage needs to know which adapter wrote it."""
    from fusechat.prompts.leetcode import JUDGE_IMPORTS

    _, prompts, _, _ = built
    preludes = {(p["dataset"], json.loads(p["meta"]).get("test_prelude")) for p in prompts if p["domain"] == "code"}
    assert preludes == {("leetcode", JUDGE_IMPORTS), ("self-oss-instruct", None)}
