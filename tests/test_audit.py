"""The reward-model audit on hand-built score tables: every figure checked against a count by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fusechat import audit
from fusechat.scoring.checks import exact_answer

# (response id, prompt, source, text, check status, completion tokens)
RESPONSES = [
    # instruction P1, exact answer "a b"
    ("r1", "P1", "A", "a b", "none", 2),
    ("r2", "P1", "A", "b a", "none", 3),
    ("r3", "P1", "A", " a  b\n", "none", 5),
    ("r4", "P1", "B", "x", "none", 1),
    # instruction P2, exact answer "c"
    ("r5", "P2", "A", "c", "none", 1),
    ("r6", "P2", "A", "d", "none", 4),
    ("r7", "P2", "B", "c", "none", 2),
    # math P3: the checker knows; a timeout says nothing
    ("r8", "P3", "A", "\\boxed{1}", "correct", 6),
    ("r9", "P3", "A", "\\boxed{2}", "incorrect", 7),
    ("r10", "P3", "A", "no answer", "unparseable", 8),
    ("r11", "P3", "A", "...", "timeout", 9),
]
DOMAIN = {"P1": "instruction", "P2": "instruction", "P3": "math"}
META = {"P1": json.dumps({"expected": "a b"}), "P2": json.dumps({"expected": "c", "task": "x"}), "P3": "{}"}
REWARD = {"r1": 0.9, "r2": 0.1, "r3": 0.5, "r4": 0.7, "r5": 0.2, "r6": 0.2, "r7": 0.3,
          "r8": 0.4, "r9": 0.6, "r10": 0.5, "r11": 0.9}
TRUE = {"r1", "r3", "r5", "r7", "r8"}
DECISIONS = pd.DataFrame([
    {"prompt_id": "P1", "domain": "instruction", "assigned": "sft", "source_model": "A",
     "chosen_response_id": "r1", "rejected_response_id": None},
    {"prompt_id": "P2", "domain": "instruction", "assigned": "dpo", "source_model": "A",
     "chosen_response_id": "r6", "rejected_response_id": "r5"},
    {"prompt_id": "P3", "domain": "math", "assigned": "dpo", "source_model": "A",
     "chosen_response_id": "r8", "rejected_response_id": "r9"},
])


def tables(reward: dict[str, float]):
    prompts = pa.table({"prompt_id": list(META), "meta": list(META.values())})
    responses = pa.table({
        "response_id": [r[0] for r in RESPONSES], "text": [r[3] for r in RESPONSES],
        "completion_tokens": pa.array([r[5] for r in RESPONSES], pa.int32()),
    })
    # the scores table in another order than the responses: the audit joins by id
    rows = RESPONSES[::-1]
    scores = pa.table({
        "response_id": [r[0] for r in rows], "prompt_id": [r[1] for r in rows], "source": [r[2] for r in rows],
        "domain": [DOMAIN[r[1]] for r in rows], "reward": [reward[r[0]] for r in rows],
        "check_status": [r[4] for r in rows],
    })
    return prompts, scores, responses


def row(judged: pd.DataFrame, domain: str, source: str) -> dict:
    hit = judged[(judged["domain"] == domain) & (judged["source"] == source)]
    assert len(hit) == 1, (domain, source, judged)
    return hit.iloc[0].to_dict()


def test_truth_per_response_follows_the_checkers_and_the_exact_answer():
    frame = audit.response_frame(*tables(REWARD))
    truth = dict(zip(frame["response_id"], frame["truth"]))
    for rid, *_ in RESPONSES:
        if rid == "r11":
            assert math.isnan(truth[rid])  # a timeout is no verdict
        else:
            assert truth[rid] == (1.0 if rid in TRUE else 0.0), rid
    assert dict(zip(frame["response_id"], frame["length"]))["r9"] == 7


def test_judged_figures_by_hand():
    result, _ = audit.compute(*tables(REWARD), DECISIONS)
    judged = result["judged"]
    # instruction, all sources: P1 rights {.9, .5} wrongs {.1, .7}: 3 of 4 pairs; P2 rights {.2, .3}
    # wrong {.2}: a tie (half) and a win; top picks both right; chance 2/4 and 2/3
    r = row(judged, "instruction", "all")
    assert (r["prompts"], r["prompts_right"], r["competing"], r["pairs"]) == (2, 2, 2, 6)
    assert r["pairwise_accuracy"] == pytest.approx(4.5 / 6)
    assert r["top1_right"] == pytest.approx(1.0)
    assert r["chance"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert r["decided_by"] == "reward model"
    # SFT: r1 is right; DPO: chosen r6 wrong, rejected r5 right
    assert (r["sft_rows"], r["sft_right"], r["dpo_pairs"], r["dpo_chosen_right"], r["dpo_rejected_right"]) == (1, 1, 1, 0, 1)
    # source A alone: P1 rights {.9, .5} wrong {.1}: 2 of 2; P2 right .2 wrong .2: a tie
    a = row(judged, "instruction", "A")
    assert a["pairs"] == 3 and a["pairwise_accuracy"] == pytest.approx(2.5 / 3)
    assert a["top1_right"] == pytest.approx((1 + 0.5) / 2)  # a tie at the top counts half
    assert a["chance"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # source B: one response per prompt, nothing competes
    b = row(judged, "instruction", "B")
    assert (b["prompts"], b["prompts_right"], b["competing"], b["pairs"]) == (2, 1, 0, 0)
    assert math.isnan(b["pairwise_accuracy"]) and math.isnan(b["top1_right"])
    # math: right .4 against wrongs .6 and .5 (the timeout left out): every pair lost, top pick wrong
    m = row(judged, "math", "all")
    assert (m["pairs"], m["pairwise_accuracy"], m["top1_right"]) == (2, 0.0, 0.0)
    assert m["chance"] == pytest.approx(1 / 3) and m["decided_by"] == "checker"
    assert (m["dpo_chosen_right"], m["dpo_rejected_right"], m["dpo_known"]) == (1, 0, 1)
    # a checker decides math: its bad ranking there is no warning; instruction is fine (0.75, top 100%)
    assert result["warnings"] == []


def test_a_reward_model_at_chance_is_warned_about_and_a_perfect_one_is_not():
    constant = {k: 0.05 for k in REWARD}
    at_chance, _ = audit.compute(*tables(constant), DECISIONS)
    r = row(at_chance["judged"], "instruction", "all")
    assert r["pairwise_accuracy"] == pytest.approx(0.5)  # every pair a tie
    assert r["top1_right"] == pytest.approx(r["chance"])  # the top is everyone: a random pick
    assert len(at_chance["warnings"]) == 1 and "instruction" in at_chance["warnings"][0]
    assert "math" not in at_chance["warnings"][0]

    perfect = {k: (1.0 if k in TRUE else 0.0) for k in REWARD}
    best, _ = audit.compute(*tables(perfect), DECISIONS)
    for dom in ("instruction", "math"):
        r = row(best["judged"], dom, "all")
        assert r["pairwise_accuracy"] == 1.0 and r["top1_right"] == 1.0
    assert best["warnings"] == []

    # one that prefers wrong answers is below chance: warned
    reversed_ = {k: (0.0 if k in TRUE else 1.0) for k in REWARD}
    worst, _ = audit.compute(*tables(reversed_), DECISIONS)
    assert row(worst["judged"], "instruction", "all")["pairwise_accuracy"] == 0.0
    assert len(worst["warnings"]) == 1


def test_reward_distribution_length_correlation_and_dpo_lengths():
    result, _ = audit.compute(*tables(REWARD), DECISIONS)
    rw = result["rewards"]
    inst = rw[(rw["domain"] == "instruction") & (rw["source"] == "all")].iloc[0]
    ids = [r[0] for r in RESPONSES if DOMAIN[r[1]] == "instruction"]
    rewards = np.array([REWARD[i] for i in ids])
    lengths = np.array([r[5] for r in RESPONSES if DOMAIN[r[1]] == "instruction"], dtype=float)
    assert inst["n"] == len(ids)
    assert inst["mean"] == pytest.approx(rewards.mean())
    assert inst["median"] == pytest.approx(np.median(rewards))
    assert inst["length_pearson"] == pytest.approx(np.corrcoef(rewards, lengths)[0, 1])
    ranks = lambda v: pd.Series(v).rank().to_numpy()  # noqa: E731
    assert inst["length_spearman"] == pytest.approx(np.corrcoef(ranks(rewards), ranks(lengths))[0, 1])
    # source B's instruction rewards (.7, .3) and lengths (1, 2): a perfect negative correlation
    b = rw[(rw["domain"] == "instruction") & (rw["source"] == "B")].iloc[0]
    assert b["length_pearson"] == pytest.approx(-1.0)

    dl = result["dpo_length"].set_index("domain")
    assert dl.loc["instruction", "chosen_length"] == 4 and dl.loc["instruction", "rejected_length"] == 1
    assert dl.loc["math", "chosen_longer"] == 0.0 and dl.loc["math", "chosen_shorter"] == 1.0
    assert dl.loc["all", "pairs"] == 2 and dl.loc["all", "chosen_longer"] == 0.5


def test_a_run_without_known_truth_has_no_judged_rows_but_its_rewards():
    prompts, scores, responses = tables(REWARD)
    prompts = pa.table({"prompt_id": prompts["prompt_id"], "meta": ["{}"] * 3})
    scores = scores.set_column(5, "check_status", pa.array(["none"] * scores.num_rows))
    result, _ = audit.compute(prompts, scores, responses, DECISIONS)
    assert len(result["judged"]) == 0 and result["warnings"] == []
    assert set(result["rewards"]["domain"]) == {"instruction", "math"}
    text = audit.markdown(json.loads(audit.to_json(result)))
    assert "No domain with a checker's truth" in text


def test_json_and_markdown_carry_the_figures_and_the_warning(tmp_path):
    constant = {k: 0.05 for k in REWARD}
    result, frame = audit.compute(*tables(constant), DECISIONS)
    (tmp_path / audit.AUDIT_FILE).write_text(audit.to_json(result))
    loaded = audit.load(tmp_path)
    assert loaded["warnings"] == result["warnings"]
    text = audit.markdown(loaded)
    assert "WARNING: reward model at chance on instruction" in text
    assert "| instruction | all | reward model | 100% of 2 | 2 | 0.50 |" in text
    assert "| instruction | A |" in text and "| instruction | A |" not in audit.markdown(loaded, sources=False)
    png = audit.plot(loaded, frame, tmp_path / "plots" / audit.PLOT_FILE)
    assert png.stat().st_size > 1000
    assert audit.load(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text", ["a b", " a\tb \n", "a\u00a0b", "a\u3000\u3000b", "a\x1cb", "ab", "", "a\u200bb"])
def test_the_column_normalisation_is_the_exact_checks(text):
    got = audit.normalized(pa.array([text])).to_pylist()[0]
    assert (got == "a b") == exact_answer("a b", text)
