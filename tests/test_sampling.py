"""The sampling stage on real engines and tiny models: four families through vLLM, resume after
kill -9, engine crashes, models that fail to load, the transformers fallback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.recipe import load_recipe
from fusechat.sampling.shards import read_shard, shard_path
from fusechat.sampling.stage import SamplingError, merge, plan, run_sample
from fusechat.testing.sampling_recipe import CHINESE, CODE, INSTRUCTION, MATH, write_sampling_recipe

VLLM = {"enforce_eager": True, "dtype": "float32"}
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 24}


def _llama(models) -> dict:
    # max_model_len 512 makes the long prompt over-long for this source only
    return {"name": "llama", "model": str(models["llama3"]), "family": "llama3",
            "engine_options": {**VLLM, "max_model_len": 512}, "sampling": SAMPLING,
            "responses": {"instruction": 2, "math": 2, "code": 1}, "shard_size": 3}


@pytest.fixture(scope="module")
def sampled(tiny_models, tmp_path_factory):
    sources = [
        _llama(tiny_models),
        {"name": "qwen", "model": str(tiny_models["qwen2"]), "family": "qwen2",
         "engine_options": VLLM, "sampling": {**SAMPLING, "repetition_penalty": 1.05},
         "responses": {"instruction": 1, "chinese": 1}},
        {"name": "gemma", "model": str(tiny_models["gemma2"]), "family": "gemma2",
         "engine_options": VLLM, "sampling": SAMPLING, "responses": {"instruction": 1, "code": 2}},
        {"name": "mistral", "model": str(tiny_models["mistral"]), "family": "mistral",
         "engine_options": VLLM, "sampling": SAMPLING, "responses": {"math": 1}},
    ]
    path = write_sampling_recipe(tmp_path_factory.mktemp("sample"), sources, long_prompt_words=900)
    recipe = load_recipe(path)
    t0 = time.time()
    manifest = run_sample(recipe)
    return recipe, manifest, time.time() - t0


def _responses(recipe):
    return pq.read_table(recipe.run_path() / "responses" / "responses.parquet").to_pylist()


@pytest.mark.slow
def test_every_source_answers_its_domains(sampled):
    recipe, manifest, _ = sampled
    rows = _responses(recipe)
    n_instr = len(INSTRUCTION) + 1  # plus the long prompt
    expected = {  # (source, domain) -> responses; llama cannot take the long prompt (512 tokens)
        "llama": 2 * (n_instr - 1) + 2 * len(MATH) + 1 * len(CODE),
        "qwen": 1 * n_instr + 1 * len(CHINESE),
        "gemma": 1 * n_instr + 2 * len(CODE),
        "mistral": 1 * len(MATH),
    }
    counts = {s: sum(r["source"] == s for r in rows) for s in expected}
    assert counts == expected
    prompts = pq.read_table(recipe.run_path() / "prompts" / "prompts.parquet").to_pylist()
    domain = {p["prompt_id"]: p["domain"] for p in prompts}
    assert {r["source"] for r in rows if domain[r["prompt_id"]] == "chinese"} == {"qwen"}
    assert len({r["response_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["finish_reason"] in ("stop", "length")
        assert r["truncated"] == (r["finish_reason"] == "length")
        assert 1 <= r["completion_tokens"] <= SAMPLING["max_tokens"]
        assert r["prompt_tokens"] > 5 and r["model_revision"].startswith("local-")
    assert any(r["truncated"] for r in rows)  # a random model rarely stops inside 24 tokens
    # books: asked = answered + dropped; the over-long prompt is dropped for llama only (n=2)
    manifest.check_balance()
    assert manifest.dropped == {"prompt_too_long": 2}
    assert manifest.rows_out == len(rows) and manifest.extra["requests"]["dropped"] == {"prompt_too_long": 1}
    assert set(manifest.models) == {"llama", "qwen", "gemma", "mistral"}
    assert json.loads((recipe.run_path() / "responses" / "manifest.json").read_text())["rows_out"] == len(rows)


@pytest.mark.slow
def test_each_engine_received_exactly_one_bos(sampled, tiny_models):
    from transformers import AutoTokenizer

    recipe, _, _ = sampled
    families = {"llama": "llama3", "qwen": "qwen2", "gemma": "gemma2", "mistral": "mistral"}
    for source, family in families.items():
        tok = AutoTokenizer.from_pretrained(tiny_models[family])
        shards = sorted((recipe.run_path() / "responses" / "shards" / source).glob("*/*.parquet"))
        received = [ids for f in shards for ids in read_shard(f)[0].column("received_ids").to_pylist() if ids]
        assert received, source
        for ids in received:
            if tok.bos_token_id is None:  # Qwen2 has no BOS; the template's first token opens the prompt
                assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
            else:
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (source, ids[:5])


@pytest.mark.slow
def test_rerun_computes_nothing(sampled):
    recipe, manifest, first_seconds = sampled
    shard_files = sorted((recipe.run_path() / "responses" / "shards").rglob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in shard_files}
    rows = _responses(recipe)
    t0 = time.time()
    again = run_sample(recipe)
    assert time.time() - t0 < min(first_seconds / 4, 20)
    assert {f: f.stat().st_mtime_ns for f in shard_files} == before
    assert _responses(recipe) == rows and again.rows_out == manifest.rows_out
    # The same model folders spelled relative to the recipe, as a recipe moved elsewhere would name
    # them: a local folder is keyed by its contents, so nothing is sampled again.
    folder = Path(recipe.base_dir)
    data = yaml.safe_load((folder / "recipe.yaml").read_text())
    for source in data["sources"]:
        source["model"] = os.path.relpath(source["model"], folder)
        assert not Path(source["model"]).is_absolute()
    (folder / "relative.yaml").write_text(yaml.safe_dump(data))
    moved = run_sample(load_recipe(folder / "relative.yaml"))
    assert sorted((recipe.run_path() / "responses" / "shards").rglob("*.parquet")) == shard_files
    assert {f: f.stat().st_mtime_ns for f in shard_files} == before
    assert _responses(recipe) == rows and moved.extra["rows_computed"] == 0


def _worker_children(proc: psutil.Process) -> list[psutil.Process]:
    found = []
    for c in proc.children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "fusechat.sampling.worker" in " ".join(c.cmdline()):
                found.append(c)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_engine_crash_and_kill_9_then_resume(sampled, tiny_models, tmp_path):
    """kill -9 the engine's worker mid-run (it is retried), then kill -9 the command itself; a rerun
    computes only the missing shards and ends with exactly the uninterrupted run's rows and texts."""
    full, _, _ = sampled
    path = write_sampling_recipe(tmp_path, [_llama(tiny_models)], long_prompt_words=900)
    shards = tmp_path / "run" / "responses" / "shards" / "llama"
    total = len(read_shard_ids(full, "llama"))
    cmd = [sys.executable, "-m", "fusechat", "sample", str(path)]
    log = open(tmp_path / "cli.log", "wb")
    cli = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    parent = psutil.Process(cli.pid)
    first = _wait_for(lambda: _worker_children(parent), 240, "the first worker")[0]
    _wait_for(lambda: list(shards.glob("*/*.parquet")), 240, "the first shard")
    first.kill()  # an engine crash, as the stage sees it
    done_at_crash = len(list(shards.glob("*/*.parquet")))
    assert done_at_crash < total
    # the stage starts a new worker for the missing shards; kill -9 the command while it runs
    _wait_for(lambda: [w for w in _worker_children(parent) if w.pid != first.pid], 60, "the retry")
    retry = [w for w in _worker_children(parent) if w.pid != first.pid]
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    # the orphaned worker takes itself and its engine down, so no rerun races it
    _wait_for(lambda: not any(_alive(w) for w in retry), 15, "the orphaned worker to exit")
    partial = len(list(shards.glob("*/*.parquet")))
    assert done_at_crash <= partial < total
    assert not list(shards.glob("*/.*.tmp"))  # no half-written shard is ever left under a real name

    scratch = tmp_path / "tmpdir"  # the rerun's TMPDIR: the worker leaves nothing behind in it
    scratch.mkdir()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                           env={**os.environ, "TMPDIR": str(scratch)})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(scratch.iterdir())
    assert len(list(shards.glob("*/*.parquet"))) == total
    resumed = pq.read_table(tmp_path / "run" / "responses" / "responses.parquet").to_pylist()
    uninterrupted = [r for r in _responses(full) if r["source"] == "llama"]
    assert [r["response_id"] for r in resumed] == [r["response_id"] for r in uninterrupted]
    assert [(r["prompt_id"], r["sample_index"]) for r in resumed] == [
        (r["prompt_id"], r["sample_index"]) for r in uninterrupted]
    # Texts too: each shard is reseeded (and the prefix cache reset) before it runs, and on CPU the
    # engine runs inside the worker's process, so a recomputed shard repeats the uninterrupted run.
    assert [r["text"] for r in resumed] == [r["text"] for r in uninterrupted]
    man = json.loads((tmp_path / "run" / "responses" / "manifest.json").read_text())
    assert man["rows_out"] == len(uninterrupted) and man["dropped"] == {"prompt_too_long": 2}


def read_shard_ids(recipe, source: str) -> list[str]:
    return [f.stem for f in (recipe.run_path() / "responses" / "shards" / source).glob("*/*.parquet")]


def test_model_that_fails_to_load_keeps_other_sources(tiny_models, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["mistral"], broken)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    sources = [
        {"name": "good", "model": str(tiny_models["llama3"]), "family": "llama3", "engine": "transformers",
         "sampling": {**SAMPLING, "max_tokens": 8}, "responses": {"instruction": 2, "chinese": 1}},
        {"name": "bad", "model": str(broken), "family": "mistral", "engine": "transformers",
         "sampling": SAMPLING, "responses": {"instruction": 1}},
    ]
    recipe = load_recipe(write_sampling_recipe(tmp_path, sources, instruction=3))
    t0 = time.time()
    with pytest.raises(SamplingError) as err:
        run_sample(recipe)
    elapsed = time.time() - t0
    msg = str(err.value)
    assert "sources[1] 'bad'" in msg and str(broken) in msg and "failed to load" in msg
    # the log line is followed by the log's tail, or by a word that the log is empty
    log = recipe.run_path() / "responses" / "logs" / "bad.log"
    assert "worker exit code 3" in msg and msg.split(f"log {log}:\n", 1)[1].splitlines()[0].strip(), msg
    man = json.loads((recipe.run_path() / "responses" / "manifest.json").read_text())
    assert man["dropped"] == {"source_load_failed": 3}
    # the wall time is the whole stage's (two worker processes), not the final merge's
    assert 0.5 * elapsed <= man["wall_s"] <= elapsed, (man["wall_s"], elapsed)
    rows = _responses(recipe)
    assert {r["source"] for r in rows} == {"good"} and len(rows) == 2 * 3 + len(CHINESE)
    # the transformers fallback also hands the model exactly one BOS and flags truncation
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(tiny_models["llama3"]).bos_token_id
    for f in (recipe.run_path() / "responses" / "shards" / "good").glob("*/*.parquet"):
        for r in read_shard(f)[0].to_pylist():
            assert r["truncated"] == (r["finish_reason"] == "length") and r["completion_tokens"] <= 8
            if r["received_ids"]:
                assert r["received_ids"][0] == bos and r["received_ids"].count(bos) == 1
    # fixing the model and rerunning computes only the failed source
    good_files = {f: f.stat().st_mtime_ns for f in (recipe.run_path() / "responses" / "shards" / "good").rglob("*")}
    shutil.copy(Path(tiny_models["mistral"]) / "model.safetensors", broken / "model.safetensors")
    run_sample(recipe)
    assert {f: f.stat().st_mtime_ns for f in good_files} == good_files
    assert {r["source"] for r in _responses(recipe)} == {"good", "bad"}
    # a shard file cut short (a full disk) is set aside and counts as missing, so the sampling a
    # rerun does (tested above) computes it again; the manifest lists it
    cut = sorted((recipe.run_path() / "responses" / "shards" / "good").glob("*/*.parquet"))[0]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    revisions, shards = plan(recipe)
    assert not cut.exists() and (cut.parent / "damaged" / cut.name).stat().st_size == len(data) // 2
    assert [s.shard_id for s in shards["good"] if not shard_path(recipe, s).exists()] == [cut.stem]
    man = merge(recipe, revisions, shards)
    assert man.extra["damaged_shards"] == [f"shards/good/{cut.parent.name}/damaged/{cut.name}"]
    assert man.dropped["not_run"] > 0
