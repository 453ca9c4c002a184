"""Sampling on a real local Ray cluster (`ray_cluster`): the same rows as on this machine, a Ray
worker killed mid-shard retried without losing or repeating a row, and the two ways a cluster can
be wrong (an address nothing answers at, a source no node can hold) failing at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest

from fusechat.recipe import load_recipe
from fusechat.sampling.shards import read_shard
from fusechat.sampling.stage import run_sample
from fusechat.testing.sampling_recipe import write_sampling_recipe
from servers import free_port

PROMPTS = 6


def _source(model, **extra) -> dict:
    # transformers engine: these tests are about placement, and it starts in seconds
    return {"name": "qwen", "model": str(model), "family": "qwen2", "engine": "transformers",
            "sampling": {"temperature": 1.0, "max_tokens": 16}, "responses": {"instruction": 2},
            "shard_size": 1, **extra}


def _recipe(folder, model, **extra):
    return write_sampling_recipe(folder, [_source(model, **extra)], instruction=PROMPTS)


def _sample(recipe, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", "fusechat", "sample", str(recipe), *args],
                          capture_output=True, text=True, timeout=timeout)


def _rows(folder):
    return pq.read_table(folder / "run" / "responses" / "responses.parquet").to_pylist()


def _shard_pids(folder) -> set[int]:
    return {read_shard(p)[1]["pid"] for p in (folder / "run" / "responses" / "shards" / "qwen").glob("*/*.parquet")}


@pytest.fixture(scope="module")
def local_rows(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    run_sample(load_recipe(_recipe(folder, tiny_models["qwen2"])))
    return _rows(folder)


def test_ray_run_gives_the_local_rows(ray_cluster, tiny_models, local_rows, tmp_path):
    proc = _sample(_recipe(tmp_path, tiny_models["qwen2"]), "--ray-address", ray_cluster, "--tasks-per-source", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(tmp_path) == local_rows and len(local_rows) == 2 * PROMPTS
    assert len(_shard_pids(tmp_path)) == 2  # the shards were split over two Ray tasks
    man = json.loads((tmp_path / "run" / "responses" / "manifest.json").read_text())
    assert man["rows_in"] == man["rows_out"] == len(local_rows) and man["dropped"] == {}


def _sampling_worker(folder):
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "fusechat.sampling.worker" in cmd and str(folder) in cmd:
            return p
    return None


@pytest.mark.slow
def test_ray_worker_killed_mid_run_is_retried(ray_cluster, tiny_models, local_rows, tmp_path):
    recipe = _recipe(tmp_path, tiny_models["qwen2"])
    shards = tmp_path / "run" / "responses" / "shards" / "qwen"
    cli = subprocess.Popen([sys.executable, "-m", "fusechat", "sample", str(recipe), "--ray-address", ray_cluster],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(shards.glob("*/*.parquet")):
        assert time.time() < deadline and cli.poll() is None, "no shard was written"
        time.sleep(0.02)
    worker = _sampling_worker(tmp_path)
    ray_worker = worker.parent()  # the Ray worker process running the task
    assert "ray" in " ".join(ray_worker.cmdline()).lower()
    ray_worker.kill()
    done_at_kill = len(list(shards.glob("*/*.parquet")))
    out, err = cli.communicate(timeout=240)
    assert cli.returncode == 0, err[-3000:]
    assert done_at_kill < PROMPTS  # the kill came mid-run: Ray's retry computed the rest
    rows = _rows(tmp_path)
    key = [(r["response_id"], r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(set(key)) == len(key)  # 0 duplicated
    assert sorted(key) == sorted((r["response_id"], r["prompt_id"], r["sample_index"]) for r in local_rows)  # 0 lost
    assert len(_shard_pids(tmp_path)) == 2  # shards from the killed task's worker and from the retry
    man = json.loads((tmp_path / "run" / "responses" / "manifest.json").read_text())
    assert man["rows_in"] == man["rows_out"] == len(rows)


def test_source_no_node_can_hold_fails_before_anything_starts(ray_cluster, tiny_models, tmp_path):
    recipe = write_sampling_recipe(tmp_path, [{
        "name": "big", "model": str(tiny_models["qwen2"]), "family": "qwen2",
        "engine_options": {"tensor_parallel_size": 4}, "responses": {"instruction": 1}}], instruction=2)
    t0 = time.time()
    proc = _sample(recipe, "--ray-address", ray_cluster, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "sources[0] 'big'" in line and "asks for 4 GPUs" in line and "2 GPUs/2 CPUs" in line, line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # not even the prompts were built
    print(f"resource error after {time.time() - t0:.1f} s")


def test_ray_address_that_does_not_answer(tiny_models, tmp_path):
    recipe = _recipe(tmp_path, tiny_models["qwen2"])
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = _sample(recipe, "--ray-address", dead, timeout=60)
    seconds = time.time() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"Ray cluster at '{dead}' does not answer" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 20, seconds
    assert not (tmp_path / "run").exists()


def _tasks_run(tmp_path_factory, task: str) -> int:
    """Ray marks each task's start in its worker's log."""
    # resolved: `raycurrent` is a link to the newest `rayN`
    logs = {p.resolve() for p in tmp_path_factory.getbasetemp().glob("ray*/tmp/session_latest/logs/worker-*.out")}
    return sum(p.read_text(errors="replace").count(f":task_name:{task}") for p in logs)


def _reward_tasks_run(tmp_path_factory) -> int:
    return _tasks_run(tmp_path_factory, "_reward_task")


@pytest.mark.slow
def test_ray_scoring_gives_the_local_scores(ray_cluster, tiny_armorm, tmp_path, tmp_path_factory):
    """Reward shards as Ray tasks of one GPU each (two here: the cluster's two GPU slots)."""
    from test_score_stage import write_recipe, write_run

    from fusechat.scoring.stage import run_score

    local, remote = tmp_path / "local", tmp_path / "ray"
    for folder in (local, remote):
        folder.mkdir()
        write_run(folder / "run")
    run_score(load_recipe(write_recipe(local, tiny_armorm)))
    proc = subprocess.run([sys.executable, "-m", "fusechat", "score", str(write_recipe(remote, tiny_armorm)),
                           "--ray-address", ray_cluster], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _reward_tasks_run(tmp_path_factory) > 0  # the rewards were computed in Ray tasks
    a, b = (pq.read_table(f / "run" / "scores" / "scores.parquet").to_pylist() for f in (local, remote))
    assert len(a) == len(b) > 0 and any(r["reward"] is not None for r in a)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("reward", "objective_rewards")} == \
            {k: v for k, v in y.items() if k not in ("reward", "objective_rewards")}
        assert (x["reward"] is None) == (y["reward"] is None)
        assert x["reward"] is None or abs(x["reward"] - y["reward"]) <= 1e-5
    ma, mb = (json.loads((f / "run" / "scores" / "manifest.json").read_text()) for f in (local, remote))
    assert (ma["rows_in"], ma["rows_out"], ma["dropped"]) == (mb["rows_in"], mb["rows_out"], mb["dropped"])


@pytest.mark.slow
def test_score_flow_on_ray(ray_cluster, tiny_armorm, tmp_path, tmp_path_factory):
    """The flow on a temporary Prefect server of its own: the shared one counts its score runs."""
    import os

    from test_score_stage import write_recipe, write_run

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_MEMO_STORE_PATH=str(home / "memo_store.toml"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               # the temporary server gets 20 s to start by default: too few on 2 busy cores
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")

    write_run(tmp_path / "run")
    before = _reward_tasks_run(tmp_path_factory)
    proc = subprocess.run([sys.executable, "flows/score_responses.py", str(write_recipe(tmp_path, tiny_armorm)),
                           "--ray-address", ray_cluster], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "scores" / "manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["dropped"].values()) > 0
    assert _reward_tasks_run(tmp_path_factory) > before


@pytest.mark.slow
def test_eval_generates_on_ray(ray_cluster, tiny_models, tiny_armorm, tmp_path, tmp_path_factory):
    """Eval's models generate as Ray tasks, side by side: the same generations as on this machine."""
    import yaml

    from fusechat.demo import world
    from fusechat.eval.stage import run_eval

    def eval_recipe(folder):
        world.write_prompts(folder / "demo", sizes={"eval": 1, "train": 1})
        data = {
            "name": "eval-ray", "run_dir": "run", "seed": 3,
            "sources": [{"name": n, "model": str(tiny_models[m]), "family": m, "engine": "transformers"}
                        for n, m in (("src-llama", "llama3"),)],
            "datasets": [{"name": "d", "path": "demo/train", "adapter": "demo", "domain": "math"}],
            "scoring": {"reward_model": {"model": str(tiny_armorm)}, "code": {"timeout_s": 5, "workers": 1},
                        "math": {"workers": 1}},
            "target": {"model": str(tiny_models["mistral"]), "family": "mistral"},
            "eval": {"benchmarks": ["demo"], "max_tokens": 8, "engine": "transformers", "files": {"demo": "demo/eval"}},
        }
        (folder / "recipe.yaml").write_text(yaml.safe_dump(data))
        return folder / "recipe.yaml"

    local, remote = eval_recipe(tmp_path / "local"), eval_recipe(tmp_path / "ray")
    run_eval(load_recipe(local))
    before = _tasks_run(tmp_path_factory, "_worker_task")
    proc = subprocess.run([sys.executable, "-m", "fusechat", "eval", str(remote), "--ray-address", ray_cluster],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tasks_run(tmp_path_factory, "_worker_task") - before == 2  # one Ray task per model
    cols = ["model", "set", "prompt_id", "text", "correct", "check_status"]
    a, b = (pq.read_table(f.parent / "run" / "eval" / "generations.parquet").select(cols).to_pylist()
            for f in (local, remote))
    assert a == b and len(a) == 2 * 4  # two models, one held-out item per demo domain
