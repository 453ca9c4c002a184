"""The `sample-sources` flow: served deployment triggered by the real `prefect deployment run`
command, and shards spread over the workers of a local Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from fusechat.testing.sampling_recipe import CHINESE, write_sampling_recipe
from servers import running

PREFECT = [sys.executable, "-m", "prefect"]


def _source(name: str, model, family: str, **responses) -> dict:
    # transformers engine: these tests are about orchestration, and it starts in seconds
    return {"name": name, "model": str(model), "family": family, "engine": "transformers",
            "sampling": {"temperature": 1.0, "max_tokens": 8}, "responses": responses, "shard_size": 2}


def _rows(folder):
    return pq.read_table(folder / "run" / "responses" / "responses.parquet").to_pylist()


@pytest.mark.slow
def test_served_deployment_samples_the_recipe(prefect_server, tiny_models, tmp_path):
    recipe = write_sampling_recipe(
        tmp_path, [_source("qwen", tiny_models["qwen2"], "qwen2", instruction=2, chinese=1)], instruction=3)
    def registered() -> bool:
        return subprocess.run(PREFECT + ["deployment", "inspect", "sample-sources/local"], env=prefect_server,
                              capture_output=True).returncode == 0

    with running([sys.executable, "-m", "flows.serve", "sample-sources"], registered, tmp_path / "serve.log",
                 env=prefect_server, timeout_s=90):
        run = subprocess.run(
            PREFECT + ["deployment", "run", "sample-sources/local", "--param", f"recipe={recipe}", "--watch",
                       "--watch-timeout", "300"],
            env=prefect_server, capture_output=True, text=True, timeout=330,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    rows = _rows(tmp_path)
    assert len(rows) == 2 * 3 + len(CHINESE) and {r["source"] for r in rows} == {"qwen"}
    man = json.loads((tmp_path / "run" / "responses" / "manifest.json").read_text())
    assert man["rows_in"] == man["rows_out"] + sum(man["dropped"].values())


@pytest.mark.slow
def test_ray_cluster_spreads_shards_over_workers(prefect_server, ray_cluster, tiny_models, tmp_path):
    sources = [_source("llama", tiny_models["llama3"], "llama3", instruction=1, math=1),
               _source("mistral", tiny_models["mistral"], "mistral", instruction=1, code=1)]
    recipe = write_sampling_recipe(tmp_path, sources, instruction=4)
    cmd = [sys.executable, "-m", "flows.sample_sources", "run", str(recipe), "--ray-address", ray_cluster,
           "--tasks-per-source", "2"]
    proc = subprocess.run(cmd, env=prefect_server, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["tasks"]) == 4
    assert len({t["ray_worker"] for t in summary["tasks"]}) >= 2  # tasks ran side by side on Ray workers
    rows = _rows(tmp_path)
    assert sum(r["source"] == "llama" for r in rows) == 4 + 4  # 4 instruction + 4 math prompts
    assert sum(r["source"] == "mistral" for r in rows) == 4 + 3
    assert summary["rows_out"] == len(rows) and summary["dropped"] == {}
    # the same recipe from the command line finds every shard done: CLI and flow share the work
    again = subprocess.run([sys.executable, "-m", "fusechat", "sample", str(recipe)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _rows(tmp_path) == rows
