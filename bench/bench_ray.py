"""Sampling on Ray: the demo recipe's sampling on a cluster of 2 Ray workers against 1, in one run.

Each side starts its own local Ray head (`ray start --head --block`) with N CPU and N GPU slots
(N = 1, then 2; on a GPU machine the slots are that many of its GPUs) and runs
`fusechat sample RECIPE --ray-address ... --run-dir FRESH`, so a source task asks for one slot and
at most N engines run side by side. Printed: wall seconds of both, responses of both (they must
match) and the ratio 1-worker / 2-worker wall time (the speed-up; ~2 where each worker has its
own accelerator, less where the engines share a machine's cores).

Usage: `python bench/bench_ray.py [--recipe recipes/demo.yaml] [--tasks-per-source 1] [--out DIR]`.
The demo's models must exist (`python -m fusechat.demo.train_sources --out data/demo/models`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusechat.testing.ray_head import local_ray_head  # noqa: E402


def _sample_on(workers: int, recipe: str, out: Path, tasks_per_source: int) -> dict:
    try:
        with local_ray_head(out / f"ray-{workers}", slots=workers) as address:
            run_dir = out / f"run-{workers}"
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "fusechat", "sample", recipe, "--run-dir", str(run_dir),
                                   "--ray-address", address, "--tasks-per-source", str(tasks_per_source)],
                                  capture_output=True, text=True, cwd=ROOT)
            wall = time.time() - t0
    except RuntimeError as e:  # the head did not start
        raise SystemExit(str(e)) from None
    if proc.returncode != 0:
        raise SystemExit(f"sampling on {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((run_dir / "responses" / "manifest.json").read_text())
    return {"workers": workers, "wall_s": round(wall, 1), "responses": manifest["rows_out"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/bench_ray.py")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--tasks-per-source", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM on CPU: its free-memory check needs a fixed KV cache
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-ray-"))
    out.mkdir(parents=True, exist_ok=True)
    one = _sample_on(1, args.recipe, out, args.tasks_per_source)
    two = _sample_on(2, args.recipe, out, args.tasks_per_source)
    result = {"one": one, "two": two, "speedup_2_vs_1": round(one["wall_s"] / two["wall_s"], 2),
              "same_responses": one["responses"] == two["responses"]}
    print(json.dumps(result))
    print(f"{args.recipe} sampling: 1 Ray worker {one['wall_s']} s, 2 Ray workers {two['wall_s']} s, "
          f"speed-up x{result['speedup_2_vs_1']} ({one['responses']} responses each)")


if __name__ == "__main__":
    main()
