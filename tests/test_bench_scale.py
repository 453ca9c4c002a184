"""The scale bench at 1% of the recipe's volume: every CPU-side step runs through the stage code,
balances its rows and writes its outputs, and the outputs are exactly those the stages wrote
before they streamed (digests in tests/data/bench_scale_0.01_outputs.json, computed by the
stages as they were when every table was read whole)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_bench_at_one_percent(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--fraction", "0.01",
                           "--workdir", str(tmp_path / "work"), "--keep", "--digests", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["0.01"]
    prompts, responses = results["generate"]["prompts"], results["generate"]["responses"]
    assert prompts == 1587 and responses > 25_000
    assert results["responses_merge"]["rows_in"] == responses == results["responses_merge"]["rows_out"]
    assert results["score_merge"]["rows_out"] == responses
    for step in ("responses_merge", "score_merge", "build", "publish", "train_data"):
        r = results[step]
        assert r["rows_in"] == r["rows_out"] + r["dropped"], step
        assert r["peak_mb"] > 0 and r["wall_s"] > 0
    assert results["build"]["rows_in"] == prompts
    expected = json.loads((ROOT / "tests" / "data" / "bench_scale_0.01_outputs.json").read_text())
    assert results["digests"] == expected
    for rel in expected:
        assert (tmp_path / "work" / "f0.01" / rel).stat().st_size > 0, rel
