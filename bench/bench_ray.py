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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_on(workers: int, recipe: str, out: Path, tasks_per_source: int) -> dict:
    port = _free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", str(workers), "--num-gpus", str(workers), "--include-dashboard=false",
         "--disable-usage-stats", "--temp-dir", str(out / f"ray-{workers}")],
        stdout=open(out / f"head-{workers}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"ray head did not start; see {out}/head-{workers}.log")
                time.sleep(0.3)
        run_dir = out / f"run-{workers}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "fusechat", "sample", recipe, "--run-dir", str(run_dir),
                               "--ray-address", f"127.0.0.1:{port}", "--tasks-per-source", str(tasks_per_source)],
                              capture_output=True, text=True, cwd=ROOT)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sampling on {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((run_dir / "responses" / "manifest.json").read_text())
        return {"workers": workers, "wall_s": round(wall, 1), "responses": manifest["rows_out"]}
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head, its raylet and Ray workers: one process group
        head.wait()


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
