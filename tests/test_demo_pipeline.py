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
    recipe.write_text(yaml.safe_dump({
        "extends": str(ROOT / "recipes" / "demo.yaml"),
        "name": NAME,
        "run_dir": "run",
        "datasets": [
            {"name": f"demo-{d}", "path": str(TRAIN / f"{d}.jsonl"), "adapter": "demo", "domain": d,
             "limit": PROMPTS_PER_DOMAIN}
            for d in world.DOMAINS
        ],
        # the target models only, through transformers: the sources' rows and vLLM evaluation are
        # covered by the eval stage's own tests, and this keeps three engine starts out of CI
        "eval": {"files": {"demo": "eval"}, "sources": False, "engine": "transformers",
                 "engine_options": {"batch_size": 40}},
    }))
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
