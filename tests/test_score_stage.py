"""The score stage on a hand-built run directory: every row accounted for, checks per domain,
rewards as the scorer gives them, resumable shards, clear errors for bad tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusechat.prompts.leetcode import JUDGE_IMPORTS
from fusechat.recipe import load_recipe
from fusechat.scoring.stage import COLUMNS, ScoreInputError, run_score

MSG = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS = [
    # prompt_id, dataset, domain, user text, gold, tests, meta
    ("p-inst", "inst", "instruction", "Say hello politely.", None, None, {}),
    ("p-math", "math", "math", "What is 2 + 2? Put the answer in \\boxed{}.", "4", None, {}),
    ("p-nogold", "math", "math", "Prove that there are infinitely many primes.", None, None, {}),
    ("p-code", "oss", "code", "Write add(a, b).", None, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], {}),
    ("p-lc", "lc", "code", "Two sum, as `twoSum(nums, target)`.", None, ["assert twoSum([2, 7, 11], 9) == [0, 1]"],
     {"test_setup": 'if "twoSum" not in globals() and "Solution" in globals():\n    twoSum = Solution().twoSum',
      "test_prelude": JUDGE_IMPORTS}),  # as the leetcode adapter writes them
    ("p-notests", "oss", "code", "Explain recursion with code.", None, None, {}),
    ("p-zh", "zh", "chinese", "你好，请介绍一下你自己。", None, None, {}),
]
LC_GOOD = """```python
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, n in enumerate(nums):
            if target - n in seen:
                return [seen[target - n], i]
            seen[n] = i
```"""
RESPONSES = [
    # response_id, prompt_id, source, text (str or bytes), truncated
    ("r01", "p-inst", "alpha", "Hello! It is a pleasure to meet you.", False),
    ("r02", "p-inst", "beta", "hi", False),
    ("r03", "p-math", "alpha", "2 + 2 = 4, so the answer is \\boxed{4}.", False),
    ("r04", "p-math", "beta", "I think it is \\boxed{5}.", False),
    ("r05", "p-math", "beta", "No idea.", False),
    ("r06", "p-nogold", "alpha", "Suppose finitely many primes...", False),
    ("r07", "p-code", "alpha", "```python\ndef add(a, b):\n    return a + b\n```", False),
    ("r08", "p-code", "beta", "```python\ndef add(a, b):\n    return a - b\n```", False),
    ("r09", "p-code", "beta", "```python\ndef add(a, b):\n    return plus(a, b)\n```", False),
    ("r10", "p-lc", "alpha", LC_GOOD, False),
    ("r11", "p-notests", "alpha", "def f(n): return f(n - 1)", False),
    ("r12", "p-zh", "alpha", "你好！我是一个语言模型。", False),
    ("r13", "p-inst", "alpha", "", True),  # empty (e.g. an engine error)
    ("r14", "p-inst", "beta", b"caf\xe9 au lait \xff", False),  # not UTF-8
    ("r15", "p-unknown", "alpha", "orphan", False),  # its prompt is not in the table
    ("r03", "p-math", "alpha", "a repeated response id", False),
]


def write_run(run: Path) -> None:
    (run / "prompts").mkdir(parents=True)
    (run / "responses").mkdir()
    pq.write_table(pa.table({
        "prompt_id": [p[0] for p in PROMPTS], "dataset": [p[1] for p in PROMPTS], "domain": [p[2] for p in PROMPTS],
        "messages": pa.array([[{"role": "user", "content": p[3]}] for p in PROMPTS], pa.list_(MSG)),
        "gold_answer": [p[4] for p in PROMPTS], "tests": pa.array([p[5] for p in PROMPTS], pa.list_(pa.string())),
        "meta": [json.dumps(p[6]) for p in PROMPTS],
    }), run / "prompts" / "prompts.parquet")
    n = len(RESPONSES)
    pq.write_table(pa.table({
        "response_id": [r[0] for r in RESPONSES], "prompt_id": [r[1] for r in RESPONSES],
        "source": [r[2] for r in RESPONSES], "model_revision": ["x"] * n, "sample_index": [0] * n,
        # binary: the only way to carry bytes that are not UTF-8, as a broken writer might
        "text": pa.array([r[3].encode() if isinstance(r[3], str) else r[3] for r in RESPONSES], pa.binary()),
        "finish_reason": ["stop"] * n, "prompt_tokens": [1] * n, "completion_tokens": [1] * n,
        "truncated": [r[4] for r in RESPONSES],
    }), run / "responses" / "responses.parquet")


def write_recipe(tmp: Path, armorm: Path) -> Path:
    data = tmp / "data.jsonl"
    data.write_text("{}\n")
    datasets = [("inst", "ultrafeedback", "instruction"), ("math", "openmathinstruct2", "math"),
                ("oss", "self_oss_instruct", "code"), ("lc", "leetcode", "code"), ("zh", "alpaca_gpt4_zh", "chinese")]
    recipe = {
        "name": "score-test", "run_dir": str(tmp / "run"),
        "sources": [{"name": s, "model": str(armorm), "family": "llama3"} for s in ("alpha", "beta")],
        "datasets": [{"name": n, "path": str(data), "adapter": a, "domain": d} for n, a, d in datasets],
        "scoring": {"reward_model": {"model": str(armorm), "dtype": "float32", "batch_tokens": 1024},
                    "shard_size": 4, "math": {"workers": 1, "timeout_s": 5},
                    "code": {"workers": 2, "timeout_s": 5, "memory_mb": 256}},
        "target": {"model": str(armorm), "family": "llama3"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    }
    path = tmp / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_armorm):
    tmp = tmp_path_factory.mktemp("score-stage")
    write_run(tmp / "run")
    recipe = load_recipe(write_recipe(tmp, tiny_armorm))
    manifest = run_score(recipe)
    return recipe, manifest, pq.read_table(tmp / "run" / "scores" / "scores.parquet")


def test_every_row_accounted_for(scored):
    recipe, manifest, table = scored
    assert tuple(table.column_names) == COLUMNS
    assert manifest.rows_in == len(RESPONSES) == 16
    assert manifest.rows_out == table.num_rows == 14
    assert manifest.dropped == {"unknown_prompt_id": 1, "duplicate_response_id": 1}
    manifest.check_balance()
    saved = json.loads((recipe.run_path() / "scores" / "manifest.json").read_text())
    assert saved["rows_out"] == 14 and saved["models"][recipe.scoring.reward_model.model].startswith("local-")
    assert manifest.extra["non_utf8_text"] == 1 and manifest.extra["empty_responses"] == 1
    assert manifest.extra["reward_null"] == 1 and manifest.extra["reward_null_reasons"] == {"empty response": 1}


def test_checks_per_domain(scored):
    _, manifest, table = scored
    rows = {r["response_id"]: r for r in table.to_pylist()}
    expect = {
        "r01": ("none", "none"), "r03": ("math", "correct"), "r04": ("math", "incorrect"),
        "r05": ("math", "unparseable"), "r06": ("none", "none"), "r07": ("code", "pass"),
        "r08": ("code", "fail"), "r09": ("code", "fail"), "r10": ("code", "pass"), "r11": ("none", "none"),
        "r12": ("none", "none"),
    }
    for rid, (check, status) in expect.items():
        assert (rows[rid]["check"], rows[rid]["check_status"]) == (check, status), rows[rid]
    assert rows["r04"]["check_detail"] == "5"
    assert "without gold answer" in rows["r06"]["check_detail"]
    assert "without tests" in rows["r11"]["check_detail"]
    assert rows["r09"]["check_detail"].startswith("static analysis:")
    assert rows["r13"]["reward"] is None and "empty response" in rows["r13"]["check_detail"]
    assert rows["r13"]["truncated"] and not rows["r01"]["truncated"]
    assert rows["r14"]["reward"] is not None  # decoded with replacement characters, then scored
    sandbox = manifest.extra["sandbox"]
    if __import__("os").geteuid() == 0:
        assert sandbox["isolated"] and sandbox["mode"] == "uid", sandbox
    else:
        assert sandbox["isolated"] == (sandbox["mode"] == "userns"), sandbox
    summary = {(s["source"], s["domain"]): s for s in manifest.extra["summary"]}
    assert summary[("beta", "math")]["math_correct_rate"] == 0.0
    assert summary[("alpha", "code")]["code_pass_rate"] == 1.0


def test_rewards_are_the_scorers(scored, tiny_armorm):
    from fusechat.scoring.reward import RewardScorer

    _, _, table = scored
    rows = {r["response_id"]: r for r in table.to_pylist()}
    prompts = {p[0]: p[3] for p in PROMPTS}
    ids = ["r01", "r03", "r07", "r12"]
    texts = {r[0]: r[3] for r in reversed(RESPONSES)}  # the first of a repeated id is kept
    convs = [[{"role": "user", "content": prompts[rows[i]["prompt_id"]]}, {"role": "assistant", "content": texts[i]}]
             for i in ids]
    direct = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=1).score(convs)
    for i, d in zip(ids, direct):
        assert abs(rows[i]["reward"] - d.score) <= 1e-5
        assert len(rows[i]["objective_rewards"]) == 19


def test_the_recipe_picks_the_sandbox_mode(scored):
    from fusechat.scoring.checks import Checkers

    recipe = scored[0].model_copy(deep=True)
    recipe.scoring.code.isolation = "userns"  # what a user without root gets, insisted on
    checkers = Checkers(recipe)
    try:
        (result,) = checkers.code_many([("```python\ndef f():\n    return 2\n```", ["assert f() == 2"], "", "")], None)
        assert result.status == "pass" and checkers.code.sandbox.isolation["mode"] == "userns"
    finally:
        checkers.close()


def test_the_prelude_comes_with_the_prompt(scored):
    """A code check runs after the prelude its prompt carries in `meta.test_prelude`, whichever
    adapter wrote it; a prompt without one gets none."""
    from fusechat.run import Manifest
    from fusechat.scoring.stage import _load_rows

    recipe = scored[0].model_copy(deep=True)
    for d in recipe.datasets:
        d.adapter = "self_oss_instruct"  # the data set's adapter name says nothing about the prelude
    rows = {r["prompt_id"]: r for r in _load_rows(recipe, Manifest.start(recipe, "scores"))}
    assert rows["p-lc"]["prelude"] == JUDGE_IMPORTS
    assert {r["prelude"] for pid, r in rows.items() if pid != "p-lc"} == {""}


def test_rerun_computes_only_missing_shards(scored):
    recipe, first, table = scored
    shards = recipe.run_path() / "scores" / "shards"
    files = sorted(shards.glob("*/*.parquet"))
    assert len(files) == 2 * 4  # 14 rows in shards of 4, reward + checks
    assert sorted(p.name.split("-")[0] for p in shards.iterdir()) == ["checks", "reward"]  # one folder each
    lost = [files[1], files[5]]  # as if killed before these two were written
    lost_rows = sum(pq.read_metadata(f).num_rows for f in lost)
    for f in lost:
        f.unlink()
    before = {f: f.stat().st_mtime_ns for f in files if f not in lost}
    (recipe.run_path() / "scores" / "scores.parquet").unlink()
    again = run_score(recipe)
    assert again.extra["shards"] == {"reward_computed": 1, "checks_computed": 1}
    computed = again.extra["reward"]["rows_computed"] + again.extra["checks"]["rows_computed"]
    assert computed == lost_rows
    assert again.extra["reward"]["rows_computed"] + again.extra["reward"]["rows_reused"] == 14
    after = {f: f.stat().st_mtime_ns for f in shards.glob("*/*.parquet")}
    assert all(after[f] == t for f, t in before.items())  # untouched
    assert len(after) == len(files)
    rerun = pq.read_table(recipe.run_path() / "scores" / "scores.parquet")
    assert rerun.to_pylist() == table.to_pylist()


def test_a_truncated_shard_is_set_aside_and_computed_again(scored):
    recipe, _, table = scored
    shards = recipe.run_path() / "scores" / "shards"
    reward, checks = sorted(shards.glob("reward-*/*.parquet"))[2], sorted(shards.glob("checks-*/*.parquet"))[0]
    for f in (reward, checks):  # cut short, as by a full disk: no Parquet footer
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    again = run_score(recipe)
    assert again.extra["shards"] == {"reward_computed": 1, "checks_computed": 1}
    assert sorted(again.extra["damaged_shards"]) == sorted(
        f"shards/{f.parent.name}/damaged/{f.name}" for f in (reward, checks))
    for f in (reward, checks):
        assert (f.parent / "damaged" / f.name).stat().st_size < f.stat().st_size  # kept, and a new one written
    assert pq.read_table(recipe.run_path() / "scores" / "scores.parquet").to_pylist() == table.to_pylist()
    saved = json.loads((recipe.run_path() / "scores" / "manifest.json").read_text())
    assert saved["extra"]["damaged_shards"] == again.extra["damaged_shards"]


def test_bad_tables_are_named(tmp_path, tiny_armorm):
    write_run(tmp_path / "run")
    recipe = load_recipe(write_recipe(tmp_path, tiny_armorm))
    prompts = tmp_path / "run" / "prompts" / "prompts.parquet"
    t = pq.read_table(prompts)
    meta = t.column("meta").to_pylist()
    meta[2] = "{not json"
    pq.write_table(t.set_column(t.column_names.index("meta"), "meta", pa.array(meta)), prompts)
    with pytest.raises(ValueError, match=r"prompts.parquet: row 2: field meta is not valid JSON"):
        run_score(recipe)
    pq.write_table(t.drop(["gold_answer"]), prompts)
    with pytest.raises(ValueError, match=r"prompts.parquet: missing column\(s\) gold_answer"):
        run_score(recipe)
    pq.write_table(t, prompts)
    shutil.rmtree(tmp_path / "run" / "responses")
    with pytest.raises(ScoreInputError, match="responses.parquet: missing"):
        run_score(recipe)


def test_prefect_flow_scores(tmp_path, tiny_armorm, prefect_server):
    import subprocess
    import sys
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    write_run(tmp_path / "run")
    recipe_file = write_recipe(tmp_path, tiny_armorm)
    proc = subprocess.run([sys.executable, "flows/score_responses.py", str(recipe_file)], cwd=root,
                          env={**prefect_server, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "scores" / "manifest.json").read_text())
    assert manifest["rows_in"] == 16 and manifest["rows_out"] == 14
    body = json.dumps({"flows": {"name": {"any_": ["score-responses"]}}}).encode()
    req = urllib.request.Request(prefect_server["PREFECT_API_URL"] + "/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        runs = json.loads(r.read())
    assert [run["state_type"] for run in runs] == ["COMPLETED"]


def test_one_process_per_device(tmp_path, tiny_armorm):
    """The several-GPU path (one spawned process per device), run here on two CPU "devices"."""
    from fusechat.scoring.reward import resolve_model
    from fusechat.scoring.stage import _score_rewards, load_inputs, plan, todo_rows
    from fusechat.run import Manifest

    write_run(tmp_path / "run")
    recipe = load_recipe(write_recipe(tmp_path, tiny_armorm))
    inputs = load_inputs(recipe, Manifest.start(recipe, "scores"))
    model_path, revision = resolve_model(recipe)
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, devices in ((one, ["cpu"]), (two, ["cpu", "cpu"])):
        work = plan(recipe, inputs, revision, folder)
        todo = [(todo_rows(inputs, rows, keys), path) for rows, keys, path in work.reward_todo]
        _score_rewards(recipe, model_path, todo, lambda n=1: None, devices=devices)
    one, two = (next(f.glob("reward-*")) for f in (one, two))
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 4
    for name in names:
        a, b = pq.read_table(one / name).to_pylist(), pq.read_table(two / name).to_pylist()
        assert [r["response_id"] for r in a] == [r["response_id"] for r in b]
        for x, y in zip(a, b):
            assert (x["reward"] is None and y["reward"] is None) or abs(x["reward"] - y["reward"]) <= 1e-5


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_inputs_are_counted(tmp_path, tiny_armorm, overlong):
    import yaml

    write_run(tmp_path / "run")
    recipe_file = write_recipe(tmp_path, tiny_armorm)
    data = yaml.safe_load(recipe_file.read_text())
    data["scoring"]["reward_model"].update(max_length=95, overlong=overlong)  # prompts fit, most replies not
    recipe_file.write_text(yaml.safe_dump(data))
    manifest = run_score(load_recipe(recipe_file))
    rows = pq.read_table(tmp_path / "run" / "scores" / "scores.parquet").to_pylist()
    reasons = manifest.extra["reward_null_reasons"]
    if overlong == "truncate":
        cut = [r for r in rows if r["truncated"] and r["reward"] is not None]
        assert len(cut) == manifest.extra["reward_input_truncated"] > 0
        assert reasons == {"empty response": 1}
    else:
        assert manifest.extra["reward_input_truncated"] == 0 and reasons["overlong"] > 0
        assert reasons["overlong"] == sum("> max_length 95" in r["check_detail"] for r in rows)
    assert manifest.extra["reward_null"] == sum(reasons.values()) == sum(r["reward"] is None for r in rows)
