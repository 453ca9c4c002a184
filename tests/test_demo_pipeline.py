"""The whole recipe on the demo world, reduced in prompts and held-out items, through the README's
main command (`fusechat run`): every stage writes its outputs and accounts for its rows, and the
trained target beats its base on held-out prompts by the real checkers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusechat.demo import world

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "demo" / "prompts" / "train"
EVAL = ROOT / "data" / "demo" / "prompts" / "eval"
PROMPTS_PER_DOMAIN = 100
EVAL_PER_DOMAIN = 40
NAME = "demo-ci"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-run")
    held_out = folder / "eval"
    held_out.mkdir()
    for domain in world.DOMAINS:
        lines = (EVAL / f"{domain}.jsonl").read_text().splitlines()[:EVAL_PER_DOMAIN]
        (held_out / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")
    recipe = folder / "recipe.yaml"
    # the demo recipe itself, not `extends`: its eval block is replaced, not merged (vLLM's engine
    # options are no transformers options); its model paths made absolute
    demo = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    for block in (*demo["sources"], demo["scoring"]["reward_model"], demo["target"]):
        block["model"] = str((ROOT / "recipes" / block["model"]).resolve())
    recipe.write_text(yaml.safe_dump({
        **demo,
        "name": NAME,
        "run_dir": "run",
        "datasets": [
            {"name": f"demo-{d}", "path": str(TRAIN / f"{d}.jsonl"), "adapter": "demo", "domain": d,
             "limit": PROMPTS_PER_DOMAIN}
            for d in world.DOMAINS
        ],
        # the target models only, through transformers: the sources' rows and vLLM evaluation are
        # covered by the eval stage's own tests, and this keeps three engine starts out of CI
        "eval": {**demo["eval"], "files": {"demo": "eval"}, "sources": False, "engine": "transformers",
                 "engine_options": {"batch_size": 40}},
    }, allow_unicode=True))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    p = subprocess.run([sys.executable, "-m", "fusechat", "run", str(recipe)], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-4000:]
    return folder / "run", p


@pytest.mark.slow
def test_every_stage_writes_its_outputs_and_accounts_for_its_rows(demo_run):
    run, p = demo_run
    expected = {
        "prompts": ["prompts.parquet", "dropped.parquet"],
        "responses": ["responses.parquet"],
        "scores": ["scores.parquet"],
        "datasets": ["decisions.parquet", "report.md", "sft/train.parquet", "dpo/train.parquet"],
        "datasets/hub": ["sft/README.md", "dpo/README.md"],
        f"models/{NAME}/sft": ["config.json", "model.safetensors", "metrics.json", "README.md"],
        f"models/{NAME}/dpo": ["config.json", "model.safetensors", "metrics.json", "README.md"],
        "eval": ["generations.parquet", "results.parquet", "table.md", "gains.png"],
    }
    for stage, files in expected.items():
        for f in files:
            assert (run / stage / f).exists(), f"{stage}/{f} missing"
        man = json.loads((run / stage / "manifest.json").read_text())
        assert man["rows_in"] == man["rows_out"] + sum(man["dropped"].values()), stage
        assert man["rows_out"] > 0, stage
    prompts = json.loads((run / "prompts" / "manifest.json").read_text())
    assert prompts["rows_out"] == PROMPTS_PER_DOMAIN * len(world.DOMAINS)
    # the run's summary table names every stage as done
    for stage in ("sample", "score", "build", "publish", "sft", "dpo", "eval"):
        assert any(line.split("│")[1:2] and line.split("│")[1].strip() == stage and "done" in line
                   for line in p.stderr.splitlines()), stage


@pytest.mark.slow
def test_trained_target_beats_its_base_on_held_out_prompts(demo_run):
    import pyarrow.parquet as pq

    run, _ = demo_run
    gen = pq.read_table(run / "eval" / "generations.parquet").to_pylist()
    models = {g["model"] for g in gen}
    assert models == {"target-base", "target-sft", "target-dpo"}
    for m in models:
        assert sum(g["model"] == m for g in gen) == EVAL_PER_DOMAIN * len(world.DOMAINS)

    def accuracy(model: str) -> float:  # recomputed from the verdicts, not read from the table
        rows = [g for g in gen if g["model"] == model]
        return sum(bool(g["correct"]) for g in rows) / len(rows)

    base, sft, dpo = accuracy("target-base"), accuracy("target-sft"), accuracy("target-dpo")
    assert dpo > base + 0.05, (base, sft, dpo)
    assert sft > base, (base, sft, dpo)
    results = pq.read_table(run / "eval" / "results.parquet").to_pylist()
    win = {r["model"]: r["value"] for r in results if r["metric"] == "win_rate" and r["domain"] == "all"}
    assert win["target-dpo"] > 50


@pytest.mark.slow
def test_the_reward_model_audit_matches_a_count_on_the_runs_own_tables(demo_run):
    """The build's audit, recounted here pair by pair from the run's tables and the world's rules."""
    import itertools

    import pyarrow.parquet as pq

    run, _ = demo_run
    prompts = {p["prompt_id"]: p for p in pq.read_table(run / "prompts" / "prompts.parquet").to_pylist()}
    texts = dict(zip(*pq.read_table(run / "responses" / "responses.parquet", columns=["response_id", "text"])
                     .to_pydict().values()))
    right = {"math": {"correct": True, "incorrect": False, "unparseable": False},
             "code": {"pass": True, "fail": False, "timeout": False}}
    truth, by_prompt = {}, {}
    for s in pq.read_table(run / "scores" / "scores.parquet").to_pylist():
        dom = s["domain"]
        if dom in right:
            t = right[dom].get(s["check_status"])
        else:
            t = world.evaluate_response(dom, prompts[s["prompt_id"]], texts[s["response_id"]])
        truth[s["response_id"]] = t
        if t is not None and s["reward"] is not None:
            by_prompt.setdefault((dom, s["prompt_id"]), []).append((s["reward"], t))
    audit = json.loads((run / "datasets" / "audit.json").read_text())
    rows = {r["domain"]: r for r in audit["judged"] if r["source"] == "all"}
    assert set(rows) == set(world.DOMAINS)
    decisions = pq.read_table(run / "datasets" / "decisions.parquet").to_pylist()
    for dom in world.DOMAINS:
        wins = pairs = top = chance = competing = 0
        for (d, _), rs in by_prompt.items():
            if d != dom:
                continue
            good, bad = [r for r, t in rs if t], [r for r, t in rs if not t]
            for g, b in itertools.product(good, bad):
                wins += 1.0 if g > b else 0.5 if g == b else 0.0
            pairs += len(good) * len(bad)
            if good and bad:
                competing += 1
                best = max(r for r, _ in rs)
                tied = [t for r, t in rs if r == best]
                top += sum(tied) / len(tied)
                chance += len(good) / len(rs)
        got = rows[dom]
        assert (got["pairs"], got["competing"]) == (pairs, competing), dom
        if pairs:
            assert got["pairwise_accuracy"] == pytest.approx(wins / pairs), dom
            assert got["top1_right"] == pytest.approx(top / competing), dom
            assert got["chance"] == pytest.approx(chance / competing), dom
        sft = [d for d in decisions if d["domain"] == dom and d["assigned"] == "sft"]
        dpo = [d for d in decisions if d["domain"] == dom and d["assigned"] == "dpo"]
        assert got["sft_rows"] == len(sft) and got["dpo_pairs"] == len(dpo), dom
        assert got["sft_right"] == sum(bool(truth[d["chosen_response_id"]]) for d in sft), dom
        assert got["dpo_chosen_right"] == sum(bool(truth[d["chosen_response_id"]]) for d in dpo), dom
        assert got["dpo_rejected_right"] == sum(bool(truth[d["rejected_response_id"]]) for d in dpo), dom
    # the audit's section in the build report, the cards and the eval table; its plot beside them
    assert "## Reward-model audit" in (run / "datasets" / "report.md").read_text()
    assert "## Reward-model audit" in (run / "datasets" / "hub" / "sft" / "README.md").read_text()
    assert (run / "datasets" / "plots" / "reward_audit.png").is_file()
    table = (run / "eval" / "table.md").read_text()
    assert "Reward-model audit of the training data" in table and "held-out replies" in table
