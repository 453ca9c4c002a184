"""bench/gpu_train_check.py, the prepared GPU script, in its tiny mode on CPU: every variant runs
through the real trainers, and its FLOP and MFU arithmetic agrees with the published formulas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["sft packed", "sft padded", "sft packed lora", "dpo", "dpo precomputed ref"]


@pytest.mark.slow
def test_tiny_mode_runs_every_variant_and_counts_flops(tmp_path):
    from fusechat.testing.tiny import VOCAB_SIZE

    env = {**os.environ, "OUT": str(tmp_path)}
    p = subprocess.run(
        [sys.executable, "bench/gpu_train_check.py", "--size", "tiny", "--steps", "3", "--warmup", "1",
         "--variants", ",".join(VARIANTS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_train_check.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == VARIANTS and not any("error" in r for r in rows.values())
    # the table comes last, one line per variant, then the goals
    tail = p.stdout.strip().splitlines()
    table = [line for line in tail if line.startswith("| tiny |")]
    assert [line.split(" | ")[1] for line in table] == VARIANTS
    assert tail[-1].startswith("goal tiny: DPO precomputed ref MFU")

    # linear weights of the Qwen2 shape (q, k, v, o, gate/up/down per layer; the LM head)
    m = report["env"]["models"][0]
    h, layers, kv = m["hidden_size"], m["num_layers"], m["hidden_size"] // m["num_heads"] * m["num_kv_heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * 2 * h) + VOCAB_SIZE * h
    # LoRA r=16 on every linear layer of the blocks (peft's all-linear leaves the LM head out): r x (in + out)
    lora = layers * 16 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + 2 * h))
    peak = report["env"]["flops"]
    for name, r in rows.items():
        assert r["attn_implementation"] == report["env"]["attention_choice"] == "sdpa"  # CPU
        assert r["timed_steps"] == 2 and 0 < r["tokens"] < r["all_tokens"]
        if name == "sft packed lora":
            assert r["trainable_linear_params"] == lora and r["linear_params"] == n + lora
            assert r["flops_per_token"] == 4 * (n + lora) + 2 * lora
        else:
            assert r["linear_params"] == r["trainable_linear_params"] == n
            assert r["flops_per_token"] == (8 if name == "dpo" else 6) * n
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens"] / r["timed_s"] / peak, rel=2e-2)
    # packed rows hold several conversations each: the same steps see more real tokens than padded ones
    assert rows["sft packed"]["tokens"] > rows["sft padded"]["tokens"]
