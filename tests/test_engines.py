"""The vLLM engine sizes its own KV cache on a CPU machine: every command that starts one works
without VLLM_CPU_KVCACHE_SPACE, and the variable or the recipe's options still decide when set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusechat.sampling.engines import GiB, cpu_memory_default

ROOT = Path(__file__).resolve().parents[1]

START = textwrap.dedent(
    """
    if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports the main module
        import json, os, sys
        from fusechat.recipe import Sampling
        from fusechat.sampling.engines import Request, VllmEngine

        assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
        engine = VllmEngine(sys.argv[1], None, {"enforce_eager": True, "dtype": "float32", "max_model_len": 256}, 0)
        [result] = engine.generate([Request("k", [1, 2, 3], 2)], Sampling(max_tokens=4), 0)
        kv = engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
        print("RESULT " + json.dumps({"kv": kv, "samples": len(result.samples)}), flush=True)
    """
)


def test_vllm_engine_starts_on_cpu_without_the_memory_variable(tiny_models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", START, str(tiny_models["llama3"])], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
    # the library's size, not vLLM's 92%-of-the-node default (which would leave this None)
    assert result["kv"] is not None and result["kv"] >= GiB
    assert result["samples"] == 2


@pytest.mark.parametrize(
    "options, env",
    [({"kv_cache_memory_bytes": 2 * GiB}, None), ({"gpu_memory_utilization": 0.5}, None), ({}, "3")],
    ids=["kv-cache-option", "memory-fraction-option", "environment-variable"],
)
def test_the_recipe_or_the_environment_overrides_the_memory_default(monkeypatch, options, env):
    if env is None:
        monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", env)
    assert cpu_memory_default(options) == {}
