"""The demo world: prompts, reference and wrong answers against the exact checkers, the shipped
prompt files and models, and the command that trains the models."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusechat.demo import world

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PROMPTS = ROOT / "data" / "demo" / "prompts"
SHIPPED_MODELS = ROOT / "data" / "demo" / "models"


@pytest.fixture(scope="module")
def sandbox():
    from fusechat.scoring.sandbox import Sandbox

    with Sandbox(workers=2, timeout_s=5.0, memory_mb=512) as box:
        yield box


def test_prompts_are_deterministic_disjoint_and_sized():
    sizes = {"train": 120, "eval": 30}
    train, evaluation = world.make_prompts("train", 3, sizes), world.make_prompts("eval", 3, sizes)
    assert train == world.make_prompts("train", 3, sizes)
    assert world.make_prompts("train", 4, sizes) != train
    # the evaluation set does not depend on how many train prompts are drawn after it
    assert world.make_prompts("eval", 3, {"train": 50, "eval": 30}) == evaluation
    for rows, n in ((train, 120), (evaluation, 30)):
        assert {d: sum(r["domain"] == d for r in rows) for d in world.DOMAINS} == dict.fromkeys(world.DOMAINS, n)
        assert len({r["id"] for r in rows}) == len(rows)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evaluation}
    with pytest.raises(ValueError, match="unknown split"):
        world.make_prompts("test")


def test_a_pool_too_small_for_the_sizes_is_an_error():
    with pytest.raises(ValueError, match=r"domain \w+: only \d+ distinct prompts"):
        world.make_prompts("train", 0, {"train": 5000, "eval": 10})


def test_reference_answers_pass_and_wrong_answers_fail(sandbox):
    rng = random.Random(0)
    for row in world.make_prompts("eval"):
        good, bad = world.good_response(row), world.bad_response(row, rng)
        assert world.evaluate_response(row["domain"], row, good, sandbox=sandbox), (row, good)
        assert not world.evaluate_response(row["domain"], row, bad, sandbox=sandbox), (row, bad)
        # the habit: one fixed answer per prompt, always wrong, and not the reference reworded
        habit = world.habit_response(row)
        assert habit == world.habit_response(dict(row)) and habit.strip()
        assert not world.evaluate_response(row["domain"], row, habit, sandbox=sandbox), (row, habit)


def test_reward_model_near_misses_are_wrong_and_references_right_by_the_exact_rule(sandbox):
    """The reward model's near-miss pairs, judged by the world's checkers (code in the sandbox, not
    the in-process shortcut the training loop uses), on fresh prompts only."""
    from fusechat.demo.train_reward import NearMisses

    shipped = {r["instruction"] for split in world.SPLITS for r in world.make_prompts(split)}
    stream = NearMisses(seed=3, exclude=shipped)
    seen = set()
    for _ in range(300):
        row, good, bad = stream()
        assert row["instruction"] not in shipped
        assert world.evaluate_response(row["domain"], row, good, sandbox=sandbox), (row, good)
        assert not world.evaluate_response(row["domain"], row, bad, sandbox=sandbox), (row, bad)
        seen.add(row["domain"])
    assert seen == set(world.DOMAINS)


def test_checks_read_prompt_table_rows_and_reject_near_misses(sandbox):
    rows = {r["domain"]: r for r in world.make_prompts("eval")}
    # a prompt-table row keeps `expected` in its JSON meta (where the demo adapter puts it)
    inst = rows["instruction"]
    table_row = {"gold_answer": None, "tests": None, "meta": json.dumps({"expected": inst["expected"]})}
    assert world.evaluate_response("instruction", table_row, f"  {inst['expected']}\n")
    assert not world.evaluate_response("instruction", table_row, inst["expected"] + " extra")
    math = rows["math"]
    assert world.evaluate_response("math", math, f"So it is \\boxed{{{math['gold_answer']}}}.")
    assert not world.evaluate_response("math", math, "I do not know.")
    code = rows["code"]
    good = world.good_response(code)
    assert world.evaluate_response("code", code, good)  # a one-off sandbox when none is passed
    assert not world.evaluate_response("code", code, good.replace("def ", "def wrong_"), sandbox=sandbox)
    assert not world.evaluate_response("code", code, "```python\ndef f(:\n```", sandbox=sandbox)
    with pytest.raises(ValueError, match="unknown domain"):
        world.evaluate_response("poetry", inst, "x")


def test_instruction_and_chinese_prompts_survive_the_prompt_filters():
    # the prompt stage drops code and math prompts from these domains; the demo's must all stay
    from fusechat.prompts.classify import classify

    for split in world.SPLITS:
        for row in world.make_prompts(split):
            if row["domain"] in ("instruction", "chinese"):
                assert classify(row["instruction"]) is None, row["instruction"]


def test_zh_numerals():
    assert [world.zh_numeral(n) for n in (1, 9, 10, 11, 20, 21, 37, 90, 99)] == [
        "一", "九", "十", "十一", "二十", "二十一", "三十七", "九十", "九十九"
    ]


def test_written_prompt_files_round_trip(tmp_path):
    sizes = {"train": 20, "eval": 5}
    written = world.write_prompts(tmp_path, seed=1, sizes=sizes)
    assert sorted(written) == sorted(f"{s}/{d}" for s in world.SPLITS for d in world.DOMAINS)
    for split in world.SPLITS:
        back = [json.loads(line) for d in world.DOMAINS for line in (tmp_path / split / f"{d}.jsonl").open()]
        assert back == world.make_prompts(split, 1, sizes)


def test_shipped_prompt_files_match_the_generator():
    for split in world.SPLITS:
        rows = world.make_prompts(split)
        for domain in world.DOMAINS:
            lines = (SHIPPED_PROMPTS / split / f"{domain}.jsonl").read_text().splitlines()
            assert [json.loads(x) for x in lines] == [r for r in rows if r["domain"] == domain], (
                f"{split}/{domain}.jsonl is stale: rerun `python -m fusechat.demo.world`"
            )


@pytest.mark.slow
def test_shipped_sources_are_best_in_their_strong_domains(sandbox):
    """Re-measured on the held-out prompts: each source's strong domain is its best one, and the
    target is no better than the best source anywhere."""
    from fusechat.demo.train_sources import SOURCES, TARGET, accuracy

    rows = world.make_prompts("eval")
    best = dict.fromkeys(world.DOMAINS, 0.0)
    for name, spec in SOURCES.items():
        folder = SHIPPED_MODELS / name
        assert (folder / "model.safetensors").is_file(), f"{folder} is missing"
        assert json.loads((folder / "config.json").read_text())["model_type"] == {
            "llama3": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "mistral": "mistral"
        }[spec.family]
        acc = accuracy(folder, rows, sandbox)
        strong = [d for d, e in spec.errors.items() if e == 0.0]
        assert all(acc[s] > acc[d] for s in strong for d in world.DOMAINS if d not in strong), (name, acc)
        best = {d: max(best[d], acc[d]) for d in world.DOMAINS}
    (target,) = TARGET
    acc = accuracy(SHIPPED_MODELS / target, rows, sandbox)
    assert all(acc[d] <= best[d] for d in world.DOMAINS), (acc, best)


@pytest.mark.slow
def test_build_command_trains_a_working_model(tmp_path):
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "fusechat.demo.train_sources", "--out", str(tmp_path), "--scale", "test"],
        check=True, cwd=ROOT, timeout=300,
    )
    elapsed = time.time() - start
    summary = json.loads((tmp_path / "test-llama3" / "demo-build.json").read_text())
    losses = summary["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    # a model with random weights writes no passing function; this one learned some
    assert summary["accuracy"]["code"] > 0.0, summary["accuracy"]
    assert (tmp_path / "test-llama3" / "model.safetensors").is_file()
    print(f"--scale test build: {elapsed:.0f}s")


def test_demo_adapter_reads_the_shipped_files():
    from fusechat.prompts.adapters import BadValue
    from fusechat.prompts.demo import DEMO

    rows = world.make_prompts("eval")
    columns, missing = DEMO.columns(list(rows[0]))
    assert not missing and "instruction" in columns
    for row in rows:
        p = DEMO.convert(row)
        assert p.messages == [{"role": "user", "content": row["instruction"]}]
        assert (p.gold_answer, p.tests) == (row["gold_answer"], row["tests"])
        # what the prompt table will hold is enough for the exact checker
        table_row = {"gold_answer": p.gold_answer, "tests": p.tests, "meta": json.dumps(p.meta)}
        if row["domain"] != "code":
            assert world.evaluate_response(row["domain"], table_row, world.good_response(row))
    with pytest.raises(BadValue) as e:
        DEMO.convert({**rows[0], "tests": "assert f(1) == 2"})
    assert e.value.column == "tests"
    with pytest.raises(BadValue) as e:
        DEMO.convert({**rows[0], "meta": "{not json"})
    assert e.value.column == "meta"
