"""Benchmark code checks: the sandbox's warm fork servers against one fresh interpreter per check.

    .venv/bin/python bench/bench_code.py [--checks 300] [--workers 2] [--isolation auto|uid|userns|none]

The baseline is the human-eval pattern: `python -c program` in a subprocess with a timeout, the
same number of checks running in parallel. Both run the same programs (a function plus three
asserts; a third of them wrong) and must reach the same verdicts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusechat.scoring.sandbox import Check, Sandbox  # noqa: E402


def programs(n: int) -> list[Check]:
    checks = []
    for i in range(n):
        op = "+" if i % 3 else "-"  # every third one is wrong
        code = f"import math\n\ndef f(a, b):\n    return a {op} b + math.floor(0.5)\n"
        checks.append(Check(code, [f"assert f({i}, 1) == {i + 1}", f"assert f(0, {i}) == {i}", "assert f(2, 2) == 4"]))
    return checks


def fresh_interpreter(check: Check, timeout_s: float) -> str:
    program = check.code + "\n" + "\n".join(check.tests) + "\n"
    try:
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "pass" if proc.returncode == 0 else "fail"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--isolation", default="auto", choices=["auto", "uid", "userns", "none"])
    args = ap.parse_args()
    checks = programs(args.checks)

    t0 = time.perf_counter()
    with Sandbox(workers=args.workers, timeout_s=args.timeout, memory_mb=512, isolation=args.isolation) as sb:
        t_start = time.perf_counter() - t0
        t1 = time.perf_counter()
        ours = [r.status for r in sb.run_many(checks)]
        t_ours = time.perf_counter() - t1
        isolation = sb.isolation
    t1 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as ex:
        base = list(ex.map(lambda c: fresh_interpreter(c, args.timeout), checks))
    t_base = time.perf_counter() - t1

    if ours != base:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(ours, base)) if a != b][:5]
        raise SystemExit(f"verdicts differ (index, sandbox, fresh): {diff}")
    print(f"{len(checks)} checks, {args.workers} in parallel, {ours.count('pass')} pass; sandbox: {isolation['reason']}")
    print(f"fresh interpreter per check: {len(checks) / t_base:8.1f} checks/s ({t_base:.2f} s)")
    print(f"sandbox (fork servers):      {len(checks) / t_ours:8.1f} checks/s ({t_ours:.2f} s, "
          f"+{t_start:.2f} s start-up once)")
    print(f"speed-up: {t_base / t_ours:.1f}x")


if __name__ == "__main__":
    main()
