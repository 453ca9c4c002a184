"""Sampling throughput, each ratio measured in the same run on the same machine.

1. pipeline: `run_sample` on one vLLM source, end to end (prompt stage, worker process, engine
   start, shards, merge) against a bare script (process start + `LLM(...)` + one `LLM.generate`)
   on the same token-id prompts, model and settings. Printed: completion tokens/s of both and the
   ratio pipeline / bare (target >= 0.9).
2. n samples: n=5 in one request (`SamplingParams(n=5)`, one engine) against five engine launches
   with one sample each (the ancestor scripts' pattern). Printed: wall seconds of both and the ratio.

Usage: `python bench/bench_sampling.py [--prompts 64] [--max-tokens 128] [--n 5] [--out DIR]`.
The model is a tiny Llama (hidden 256, 4 layers) so generation, not the framework, dominates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = r"""
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    model, prompts_file, n, max_tokens, launches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    memory = json.loads(sys.argv[6])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(open(prompts_file))]
    t0 = time.time()
    llm = LLM(model=model, seed=0, enforce_eager=True, dtype="float32", max_model_len=2048, **memory)
    t1 = time.time()
    outs = llm.generate(prompts, SamplingParams(n=n, temperature=1.0, top_p=0.95, max_tokens=max_tokens), use_tqdm=False)
    t2 = time.time()
    print("BENCH " + json.dumps({"tokens": sum(len(o.token_ids) for r in outs for o in r.outputs), "load_s": t1 - t0, "generate_s": t2 - t1}), flush=True)
"""


def _bare(model: Path, prompts_file: Path, n: int, max_tokens: int, memory: dict) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", BARE, str(model), str(prompts_file), str(n), str(max_tokens), "1",
                          json.dumps(memory)],
                         capture_output=True, text=True, check=True)
    res = json.loads(next(line[6:] for line in out.stdout.splitlines() if line.startswith("BENCH ")))
    res["wall_s"] = time.time() - t0
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from fusechat.recipe import load_recipe
    from fusechat.sampling.render import render_ids
    from fusechat.sampling.stage import run_sample
    from fusechat.testing import sampling_recipe
    from fusechat.testing.tiny import build_tiny_lm

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-sampling-"))
    if (root / "pipeline" / "run").exists():  # finished shards would be skipped, not measured
        raise SystemExit(f"{root}/pipeline/run exists; pass a fresh --out")
    model = build_tiny_lm("llama3", root / "llama3-256x4", hidden_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2)
    # enough distinct instruction prompts: the fixed list, numbered
    base = sampling_recipe.INSTRUCTION
    sampling_recipe.INSTRUCTION = [f"{base[i % len(base)]} (variant {i})" for i in range(args.prompts)]
    # one KV-cache size for the pipeline and the bare script (on CPU the library's default, fixed
    # once here so that both measure the same engine; {} on accelerators and when the variable is set)
    from fusechat.sampling.engines import cpu_memory_default

    memory = cpu_memory_default({})
    source = {"name": "llama", "model": str(model), "family": "llama3",
              "engine_options": {"enforce_eager": True, "dtype": "float32", "max_model_len": 2048, **memory},
              "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": args.max_tokens},
              "responses": {"instruction": args.n}, "shard_size": args.prompts}
    recipe = load_recipe(sampling_recipe.write_sampling_recipe(root / "pipeline", [source],
                                                              instruction=args.prompts))
    sampling_recipe.INSTRUCTION = base

    t0 = time.time()
    run_sample(recipe)
    pipe_wall = time.time() - t0
    rows = pq.read_table(recipe.run_path() / "responses" / "responses.parquet")
    pipe_tokens = sum(rows.column("completion_tokens").to_pylist())

    # the bare script gets exactly the token ids the pipeline sent
    tok = AutoTokenizer.from_pretrained(model)
    prompts = pq.read_table(recipe.run_path() / "prompts" / "prompts.parquet").to_pylist()
    ids = [render_ids(tok, p["messages"], "llama3") for p in prompts if p["domain"] == "instruction"]
    prompts_file = root / "prompt_ids.json"
    prompts_file.write_text(json.dumps(ids))
    bare = _bare(model, prompts_file, args.n, args.max_tokens, memory)

    single = [_bare(model, prompts_file, 1, args.max_tokens, memory) for _ in range(args.n)]
    many_wall = sum(s["wall_s"] for s in single)

    result = {
        "prompts": len(ids), "n": args.n, "max_tokens": args.max_tokens,
        "pipeline": {"tokens": pipe_tokens, "wall_s": pipe_wall, "tok_per_s": pipe_tokens / pipe_wall},
        "bare": {**bare, "tok_per_s": bare["tokens"] / bare["wall_s"],
                 "generate_tok_per_s": bare["tokens"] / bare["generate_s"]},
        "pipeline_over_bare": (pipe_tokens / pipe_wall) / (bare["tokens"] / bare["wall_s"]),
        "n_in_one_request": {"wall_s": bare["wall_s"], "generate_s": bare["generate_s"]},
        "n_engine_launches": {"wall_s": many_wall, "generate_s": sum(s["generate_s"] for s in single)},
        "launches_over_one_request_wall": many_wall / bare["wall_s"],
    }
    print(json.dumps(result, indent=2))
    print(f"pipeline {result['pipeline']['tok_per_s']:.0f} tok/s, bare LLM.generate script "
          f"{result['bare']['tok_per_s']:.0f} tok/s (end to end): ratio {result['pipeline_over_bare']:.2f}")
    print(f"n={args.n} in one request: {bare['wall_s']:.1f} s; {args.n} launches with n=1: {many_wall:.1f} s: "
          f"{result['launches_over_one_request_wall']:.1f}x slower")


if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports the main module
    main()
