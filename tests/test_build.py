"""Selection rules on a hand-built score table: which response wins, which pair, which drops."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusechat.build import InputError, run_build, unit_hash
from fusechat.recipe import RecipeError, Recipe

C, I, U, T, P, F, E = "correct", "incorrect", "unparseable", "timeout", "pass", "fail", "error"

# prompt -> (dataset, domain, {source: [(reward, check_status, truncated), ...]}); sample index =
# position in the list. Sources a, b, c in recipe order.
TABLE = {
    # two sources in band: a 0.09, b 0.08 (policies disagree); c has one scorable response only
    "I1": ("inst", "instruction", {"a": [.50, .41], "b": [.60, .52], "c": [.55, None]}),
    # SFT tie at 0.70 between a1, a2, b0: earlier source beats lower sample index; pair a1/a0
    "I2": ("inst", "instruction", {"a": [.65, .70, .70], "b": [.70, .50]}),
    # a: 0.6 and b: 0.0 margins, both out of band
    "I3": ("inst", "instruction", {"a": [.90, .30], "b": [.50, .50]}),
    # a0 is truncated: without it a's pair is a1/a2 (0.05); SFT winner b0 0.41
    "I4": ("inst", "instruction", {"a": [(.80, "none", True), .40, .35], "b": [.41]}),
    "I5": ("inst", "instruction", {"a": [None, None]}),
    "I6": ("inst", "instruction", {}),
    # band edges: a exactly 0.1, b exactly 0.01 (float32 rewards)
    "I7": ("inst", "instruction", {"a": [.61, .51], "b": [.30, .29]}),
    # a pair 0.05 (worst incorrect 0.55, not 0.58); b 0.5 out of band
    "M1": ("math", "math", {"a": [(.6, C), (.55, I), (.58, I)], "b": [(.7, C), (.2, I)]}),
    # rejected scores higher than chosen: no pair -> SFT with the best correct (a1); the
    # timed-out 0.95 is never picked
    "M2": ("math", "math", {"a": [(.5, C), (.6, C), (.9, I)], "b": [(.95, T)]}),
    "M3": ("math", "math", {"a": [(.7, I), (.6, U)]}),
    # unparseable counts as incorrect
    "M4": ("math", "math", {"a": [(.62, C), (.60, U)]}),
    # a 0.05, b 0.02: best chosen is b0
    "C1": ("code", "code", {"a": [(.8, P), (.75, F), (.7, P)], "b": [(.85, P), (.83, F)]}),
    "C2": ("code", "code", {"a": [(.9, F), (.8, E)]}),
    # a checker error is never the rejected response -> SFT a0
    "C3": ("code", "code", {"a": [(.5, P), (.45, E)]}),
    # a timeout is a failure
    "C4": ("code", "code", {"a": [(.5, P), (.46, T)]}),
    "Z1": ("zh", "chinese", {"b": [.4]}),
    "Z2": ("zh", "chinese", {"b": [None]}),
}

# expected with every instruction prompt sent to DPO (sft_fraction 0) and best_chosen:
# prompt -> (assigned, reason, chosen response, rejected response)
SHARED = {
    "M1": ("dpo", "pair_in_band", "M1-a-0", "M1-a-1"),
    "M2": ("sft", "sft_fallback_no_pair", "M2-a-1", None),
    "M3": ("dropped", "no_correct_response", None, None),
    "M4": ("dpo", "pair_in_band", "M4-a-0", "M4-a-1"),
    "C1": ("dpo", "pair_in_band", "C1-b-0", "C1-b-1"),
    "C2": ("dropped", "no_passing_response", None, None),
    "C3": ("sft", "sft_fallback_no_pair", "C3-a-0", None),
    "C4": ("dpo", "pair_in_band", "C4-a-0", "C4-a-1"),
    "Z1": ("sft", "sft_only", "Z1-b-0", None),
    "Z2": ("dropped", "no_eligible_response", None, None),
}
ALL_DPO = {
    "I1": ("dpo", "split_dpo", "I1-b-0", "I1-b-1"),
    "I2": ("dpo", "split_dpo", "I2-a-1", "I2-a-0"),
    "I3": ("dropped", "no_pair_in_band", None, None),
    "I4": ("dpo", "split_dpo", "I4-a-1", "I4-a-2"),
    "I5": ("dropped", "no_eligible_response", None, None),
    "I6": ("dropped", "no_responses", None, None),
    "I7": ("dpo", "split_dpo", "I7-a-0", "I7-a-1"),
    **SHARED,
}
ALL_SFT = {
    "I1": ("sft", "split_sft", "I1-b-0", None),
    "I2": ("sft", "split_sft", "I2-a-1", None),
    "I3": ("sft", "split_sft", "I3-a-0", None),
    "I4": ("sft", "split_sft", "I4-b-0", None),
    "I5": ("dropped", "no_eligible_response", None, None),
    "I6": ("dropped", "no_responses", None, None),
    "I7": ("sft", "split_sft", "I7-a-0", None),
    **SHARED,
}


def _prompt_text(pid: str) -> str:
    return f"question {pid}"


def write_run(run: Path, table: dict = TABLE) -> None:
    prompts, responses, scores = [], [], []
    for pid, (dataset, domain, by_source) in table.items():
        prompts.append({"prompt_id": pid, "dataset": dataset, "domain": domain,
                        "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": _prompt_text(pid)}],
                        "gold_answer": None, "tests": None, "meta": "{}"})
        for source, items in by_source.items():
            for k, item in enumerate(items):
                reward, status, trunc = item if isinstance(item, tuple) and len(item) == 3 else (
                    (*item, False) if isinstance(item, tuple) else (item, "none", False))
                rid = f"{pid}-{source}-{k}"
                responses.append({"response_id": rid, "prompt_id": pid, "source": source,
                                  "model_revision": f"rev-{source}", "sample_index": k,
                                  "text": f"answer {rid}", "finish_reason": "length" if trunc else "stop",
                                  "prompt_tokens": 5, "completion_tokens": 7, "truncated": trunc})
                scores.append({"response_id": rid, "prompt_id": pid, "source": source, "domain": domain,
                               "reward": reward, "objective_rewards": None,
                               "check": {"math": "math", "code": "code"}.get(domain, "none"),
                               "check_status": status, "check_detail": "", "truncated": trunc})
    schema_reward = pa.schema([("reward", pa.float32())])
    for name, rows in (("prompts", prompts), ("responses", responses), ("scores", scores)):
        (run / name).mkdir(parents=True, exist_ok=True)
        t = pa.Table.from_pylist(rows)
        if name == "scores":
            t = t.set_column(t.schema.get_field_index("reward"), "reward",
                             t.column("reward").cast(schema_reward.field("reward").type))
        pq.write_table(t, run / name / f"{name}.parquet")


def make_recipe(run: Path, **build) -> Recipe:
    build = {"test_fraction": 0.0, "sft_fraction": {"instruction": 0.0}, **build}
    return Recipe.model_validate({
        "name": "rules", "run_dir": str(run), "base_dir": str(run),
        "sources": [{"name": n, "model": f"org/{n}", "family": "llama3"} for n in "abc"],
        "datasets": [{"name": "inst", "path": "org/inst", "adapter": "x", "domain": "instruction"}],
        "scoring": {"reward_model": {"model": "org/rm"}},
        "build": build,
        "target": {"model": "org/t", "family": "llama3"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    })


def decisions(run: Path) -> dict[str, tuple]:
    rows = pq.read_table(run / "datasets" / "decisions.parquet").to_pylist()
    return {r["prompt_id"]: (r["assigned"], r["reason"], r["chosen_response_id"], r["rejected_response_id"])
            for r in rows}


def read(run: Path, name: str) -> list[dict]:
    return pq.read_table(run / "datasets" / f"{name}.parquet").to_pylist()


@pytest.mark.parametrize("fraction, expected", [(0.0, ALL_DPO), (1.0, ALL_SFT)], ids=["dpo", "sft"])
def test_rules_pick_exactly(tmp_path, fraction, expected):
    write_run(tmp_path)
    m = run_build(make_recipe(tmp_path, sft_fraction={"instruction": fraction}))
    assert decisions(tmp_path) == expected

    sft, dpo = read(tmp_path, "sft/train"), read(tmp_path, "dpo/train")
    assert read(tmp_path, "sft/test") == [] and read(tmp_path, "dpo/test") == []
    want_sft = {p: c for p, (a, _, c, _) in expected.items() if a == "sft"}
    want_dpo = {p: (c, r) for p, (a, _, c, r) in expected.items() if a == "dpo"}
    assert {r["prompt_id"]: r["messages"][-1]["content"].removeprefix("answer ") for r in sft} == want_sft
    assert {r["prompt_id"]: (r["chosen"][0]["content"].removeprefix("answer "),
                             r["rejected"][0]["content"].removeprefix("answer ")) for r in dpo} == want_dpo
    for r in sft:
        assert r["messages"][:2] == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": _prompt_text(r["prompt_id"])}]
        assert r["messages"][2]["role"] == "assistant" and len(r["messages"]) == 3
        assert r["source_model"] == want_sft[r["prompt_id"]].split("-")[1]
        assert r["dataset"] == TABLE[r["prompt_id"]][0] and r["domain"] == TABLE[r["prompt_id"]][1]
    for r in dpo:
        assert r["prompt"][-1] == {"role": "user", "content": _prompt_text(r["prompt_id"])}
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["margin"] == pytest.approx(r["chosen_score"] - r["rejected_score"])
        assert 0.01 - 1e-6 <= r["margin"] <= 0.1 + 1e-6
    i2 = next(r for r in sft + dpo if r["prompt_id"] == "I2")
    assert i2.get("score", i2.get("chosen_score")) == pytest.approx(0.70)

    drops = {}
    for a, reason, _, _ in expected.values():
        if a == "dropped":
            drops[reason] = drops.get(reason, 0) + 1
    assert (m.rows_in, m.rows_out, m.dropped) == (len(TABLE), len(sft) + len(dpo), drops)
    m.check_balance()
    # null rewards (I1-c-1, I5 x2, Z2) and the truncated I4-a-0 are counted, not selected
    assert m.extra["responses_excluded"] == {"null_reward": 4, "truncated": 1}
    assert m.models == {"a": "rev-a", "b": "rev-b", "c": "rev-c"}
    saved = json.loads((tmp_path / "datasets" / "manifest.json").read_text())
    assert saved["rows_in"] == len(TABLE) and saved["dropped"] == drops


@pytest.mark.parametrize("policy, i1, i7", [
    ("best_chosen", "b", "a"), ("largest_margin", "a", "a"),
    ("smallest_margin", "b", "b"), ("source_order", "a", "a"),
])
def test_pair_policy_picks_one_source(tmp_path, policy, i1, i7):
    write_run(tmp_path)
    run_build(make_recipe(tmp_path, pair_policy=policy))
    d = decisions(tmp_path)
    assert d["I1"][2:] == (f"I1-{i1}-0", f"I1-{i1}-1")
    assert d["I7"][2:] == (f"I7-{i7}-0", f"I7-{i7}-1")


def test_truncated_responses_compete_when_kept(tmp_path):
    write_run(tmp_path)
    m = run_build(make_recipe(tmp_path, drop_truncated=False))
    d = decisions(tmp_path)
    # a0 (0.80, truncated) is now a's best: 0.80 - 0.35 is out of band, b has one response
    assert d["I4"] == ("dropped", "no_pair_in_band", None, None)
    assert m.extra["responses_excluded"] == {"null_reward": 4, "truncated": 0}
    run_build(make_recipe(tmp_path, drop_truncated=False, sft_fraction={"instruction": 1.0}))
    assert decisions(tmp_path)["I4"] == ("sft", "split_sft", "I4-a-0", None)


def test_code_split_by_fraction_drops_dpo_prompts_without_pair(tmp_path):
    write_run(tmp_path)
    run_build(make_recipe(tmp_path, sft_fraction={"instruction": 0.0, "code": 0.0}))
    d = decisions(tmp_path)
    assert d["C1"] == ("dpo", "split_dpo", "C1-b-0", "C1-b-1")
    assert d["C3"] == ("dropped", "no_pair_in_band", None, None)
    assert d["C2"] == ("dropped", "no_passing_response", None, None)


def _instruction_table(n: int, pairable: set[int]) -> dict:
    return {f"P{i:02d}": ("inst", "instruction", {"a": [.5, .45] if i in pairable else [.5, .1]})
            for i in range(n)}


@pytest.mark.parametrize("fraction, n_dpo", [(0.4, 5), (0.8, 2)])
def test_band_before_split_gives_pairs_to_dpo_first(tmp_path, fraction, n_dpo):
    pairable = {1, 3, 4, 7, 9}
    write_run(tmp_path, _instruction_table(10, pairable))
    m = run_build(make_recipe(tmp_path, band_before_split=True, sft_fraction={"instruction": fraction}))
    d = decisions(tmp_path)
    to_dpo = {p for p, v in d.items() if v[0] == "dpo"}
    # DPO share of 10 prompts: round(10 * (1 - fraction)) = 6 or 2; only 5 prompts have a pair
    assert len(to_dpo) == n_dpo and to_dpo <= {f"P{i:02d}" for i in pairable}
    assert all(v[0] == "sft" for p, v in d.items() if p not in to_dpo)
    assert m.dropped == {}


def test_split_is_seeded_stable_and_near_the_fraction():
    ids = [f"prompt-{i}" for i in range(20000)]
    u = unit_hash(ids, 42, "split")
    assert 0.39 < (u < 0.4).mean() < 0.41
    assert (unit_hash(ids[5000:7000], 42, "split") == u[5000:7000]).all()
    assert (unit_hash(ids, 43, "split") != u).mean() > 0.99
    assert (unit_hash(ids, 42, "test") != u).mean() > 0.99


def test_test_split_is_by_prompt_and_disjoint(tmp_path):
    table = {f"P{i:03d}": ("inst", "instruction", {"a": [.5, .45], "b": [.4, .38]}) for i in range(200)}
    write_run(tmp_path, table)
    m = run_build(make_recipe(tmp_path, test_fraction=0.25, sft_fraction={"instruction": 0.4}))
    parts = {name: {r["prompt_id"] for r in read(tmp_path, name)}
             for name in ("sft/train", "sft/test", "dpo/train", "dpo/test")}
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 200 and len(set().union(*parts.values())) == 200
    assert 20 < sizes["sft/test"] + sizes["dpo/test"] < 80
    assert 60 < sizes["sft/train"] + sizes["sft/test"] < 100
    assert m.outputs["sft/test.parquet"] == sizes["sft/test"]


def test_report_and_plots(tmp_path):
    write_run(tmp_path)
    run_build(make_recipe(tmp_path))
    out = tmp_path / "datasets"
    text = (out / "report.md").read_text()
    for section in ("Prompts per data set", "Dropped prompts by reason", "Scores per source",
                    "DPO margins", "Source of the SFT winners", "no_pair_in_band"):
        assert section in text
    assert "| inst | instruction | 7 | 0 | 0 | 4 | 0 | 3 |" in text
    for name in ("scores_by_source", "margins", "sft_winners", "reward_audit"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name}.png)" in text
    # the reward-model audit where the math checker knows: M1 6 of 6 right-vs-wrong pairs, M2 0 of 2
    # (the timeout left out), M4 1 of 1; top picks right in M1 and M4, not M2
    assert "## Reward-model audit" in text
    audit = json.loads((out / "audit.json").read_text())
    math_all = next(r for r in audit["judged"] if (r["domain"], r["source"]) == ("math", "all"))
    assert (math_all["pairs"], math_all["competing"]) == (9, 3)
    assert math_all["pairwise_accuracy"] == pytest.approx(7 / 9)
    assert math_all["top1_right"] == pytest.approx(2 / 3)
    assert (math_all["sft_right"], math_all["sft_rows"], math_all["dpo_chosen_right"], math_all["dpo_pairs"]) == (1, 1, 2, 2)
    assert {r["domain"] for r in audit["judged"]} == {"math", "code"}  # no truth for instruction here
    assert audit["warnings"] == []


def _rewrite(run: Path, name: str, column: str, row: int, value) -> None:
    t = pq.read_table(run / name / f"{name}.parquet")
    values = t.column(column).to_pylist()
    values[row] = value
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type))
    pq.write_table(t, run / name / f"{name}.parquet")


@pytest.mark.parametrize("name, column, row, value, message", [
    ("scores", "prompt_id", 3, "I9", r"scores\.parquet: row 3: field prompt_id: 'I9' but .*responses\.parquet row 3"),
    ("scores", "response_id", 2, "nope", r"scores\.parquet: row 2: field response_id: 'nope' is not in"),
    ("scores", "response_id", 3, "I1-a-0", r"scores\.parquet: row 3: field response_id: 'I1-a-0' appears twice"),
    ("scores", "check_status", 5, "maybe", r"scores\.parquet: row 5: field check_status: 'maybe'"),
    ("scores", "reward", 4, float("inf"), r"scores\.parquet: row 4: field reward: is infinite"),
    ("prompts", "domain", 1, "poetry", r"prompts\.parquet: row 1: field domain: 'poetry'"),
    ("responses", "text", 2, None, r"responses\.parquet: row 2: field text: is null"),
])
def test_bad_input_names_file_row_and_field(tmp_path, name, column, row, value, message):
    write_run(tmp_path)
    _rewrite(tmp_path, name, column, row, value)
    with pytest.raises(InputError, match=message):
        run_build(make_recipe(tmp_path))
    assert not (tmp_path / "datasets" / "manifest.json").exists()


def test_chinese_cannot_be_split(tmp_path):
    write_run(tmp_path)
    with pytest.raises(RecipeError, match="sft_fraction.chinese"):
        run_build(make_recipe(tmp_path, sft_fraction={"chinese": 0.5}))


def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_build.py"
    spec = importlib.util.spec_from_file_location("bench_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("build", [
    {"pair_policy": "best_chosen"},
    {"pair_policy": "largest_margin", "drop_truncated": False},
    {"pair_policy": "smallest_margin", "sft_fraction": {"instruction": 0.4, "code": 0.5}},
    {"pair_policy": "source_order", "band": {"low": 0.0, "high": 0.05}},
], ids=["best_chosen", "largest_margin", "smallest_margin", "source_order"])
def test_vectorised_selection_matches_a_row_by_row_loop(tmp_path, build):
    bench = _bench()
    bench.make_run(tmp_path, n_prompts=1500, n_sources=3, n_samples=4, seed=7, decimals=2)  # many ties
    # two responses per sample index (as from two sampling settings): ties down to the response id
    responses = pq.read_table(tmp_path / "responses" / "responses.parquet")
    halved = pa.array([k // 2 for k in responses["sample_index"].to_pylist()], pa.int64())
    pq.write_table(responses.set_column(responses.schema.get_field_index("sample_index"), "sample_index", halved),
                   tmp_path / "responses" / "responses.parquet")
    recipe = bench.bench_recipe(tmp_path, 3, **build)
    order = [s.name for s in recipe.sources]
    vec, _ = bench.vector_decisions(tmp_path, recipe.build, order)
    loop, _ = bench.loop_select(tmp_path, recipe.build, order, None)
    assert vec == loop
    assigned = {a for a, *_ in vec.values()}
    assert assigned == {"sft", "dpo", "dropped"}


# -- each selection step on its own ----------------------------------------------------------------
def _step_inputs(rows: list[tuple], domains: list[str]):
    """prompts (one per domain given) and responses (prompt row, source, sample, reward, status,
    truncated), in the frames `load_inputs` returns."""
    import pandas as pd

    from fusechat.build import Responses

    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(domains))], "dataset": domains,
                            "domain": domains})
    resp = pd.DataFrame([{"p": p, "response_id": f"r{k:02d}", "source": s, "sample_index": i, "reward": w,
                          "check_status": st, "truncated": t} for k, (p, s, i, w, st, t) in enumerate(rows)])
    return prompts, Responses.of(prompts, resp, ["a", "b"])


def test_step_eligibility_roles_and_exclusions():
    from fusechat.build import eligibility
    from fusechat.recipe import Build

    nan = float("nan")
    _, r = _step_inputs([
        (0, "a", 0, 0.5, "correct", False), (0, "a", 1, 0.4, "unparseable", False), (0, "b", 0, 0.3, "timeout", False),
        (0, "b", 1, nan, "correct", False), (1, "a", 0, 0.2, "error", False), (1, "b", 0, 0.9, "fail", True),
        (2, "a", 0, 0.1, "none", False),
    ], ["math", "code", "instruction"])
    el = eligibility(r, Build())
    assert el.eligible.tolist() == [True, True, True, False, True, False, True]
    assert el.good.tolist() == [True, False, False, False, False, False, True]
    assert el.bad.tolist() == [False, True, False, False, False, False, False]  # a timeout says nothing of math
    assert el.excluded.to_dict("index") == {"a": {"responses": 4, "null_reward": 0, "truncated": 0},
                                             "b": {"responses": 3, "null_reward": 1, "truncated": 1}}
    assert eligibility(r, Build(drop_truncated=False)).bad[5]  # a failing truncated answer may be rejected


def test_step_sft_winner_breaks_ties_by_source_then_sample():
    from fusechat.build import eligibility, sft_winners
    from fusechat.recipe import Build

    _, r = _step_inputs([
        (0, "b", 0, 0.7, "none", False), (0, "a", 1, 0.7, "none", False), (0, "a", 0, 0.7, "none", False),
        (1, "a", 0, 0.9, "incorrect", False), (1, "b", 0, 0.2, "correct", False),
    ], ["instruction", "math", "code"])
    assert sft_winners(r, eligibility(r, Build()).good, 3).tolist() == [2, 4, -1]


def test_step_candidate_pairs_band_and_policy():
    from fusechat.build import candidate_pairs, eligibility, in_band, pick_pairs
    from fusechat.recipe import Band, Build

    _, r = _step_inputs([
        # prompt 0: source a pairs 0.60 with 0.55, source b pairs 0.90 with 0.70
        (0, "a", 0, 0.60, "none", False), (0, "a", 1, 0.55, "none", False),
        (0, "b", 0, 0.90, "none", False), (0, "b", 1, 0.70, "none", False),
        (1, "a", 0, 0.50, "none", False),  # one response: no pair
        (2, "a", 0, 0.50, "none", False), (2, "a", 1, 0.40, "none", False),  # Chinese: SFT only
    ], ["instruction", "instruction", "chinese"])
    chosen, rejected = candidate_pairs(r, eligibility(r, Build()))
    assert (chosen.tolist(), rejected.tolist()) == ([0, 2], [1, 3])
    c, j, margin = in_band(r, chosen, rejected, Band(low=0.01, high=0.1))
    assert (c.tolist(), j.tolist()) == ([0], [1]) and margin.tolist() == pytest.approx([0.05])
    c, j, margin = in_band(r, chosen, rejected, Band(low=0.0, high=0.5))
    for policy, want in (("best_chosen", 2), ("largest_margin", 2), ("smallest_margin", 0), ("source_order", 0)):
        pair_c, pair_r = pick_pairs(r, c, j, margin, policy, 3)
        assert (pair_c.tolist(), pair_r.tolist()) == ([want, -1, -1], [want + 1, -1, -1]), policy


def test_step_assignment_reasons():
    import numpy as np

    from fusechat.build import assign, eligibility
    from fusechat.recipe import Build

    prompts, r = _step_inputs([
        (0, "a", 0, 0.5, "pass", False), (1, "a", 0, 0.5, "fail", False), (2, "a", 0, float("nan"), "none", False),
        (4, "a", 0, 0.5, "none", False),
    ], ["code", "code", "math", "math", "chinese"])
    el = eligibility(r, Build())
    has_sft, has_pair = np.array([True, False, False, False, True]), np.zeros(5, dtype=bool)
    a = assign(prompts, r, el.eligible, has_sft, has_pair, Build(test_fraction=0.0))
    assert a.assigned.tolist() == ["sft", "dropped", "dropped", "dropped", "sft"]
    assert a.reason.tolist() == ["sft_fallback_no_pair", "no_passing_response", "no_eligible_response",
                                 "no_responses", "sft_only"]
    assert a.split.tolist() == ["train", None, None, None, "train"]
    a = assign(prompts, r, el.eligible, has_sft, np.array([True, False, False, False, False]), Build())
    assert (a.assigned[0], a.reason[0]) == ("dpo", "pair_in_band")
