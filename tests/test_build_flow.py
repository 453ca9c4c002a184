"""The `build-datasets` Prefect flow runs the build and publish stages against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from test_build import make_recipe, write_run

ROOT = Path(__file__).resolve().parents[1]


def test_flow_builds_and_publishes(tmp_path, prefect_server):
    write_run(tmp_path)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(make_recipe(tmp_path, test_fraction=0.3).model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "flows/build_datasets.py", str(recipe_file)], cwd=ROOT,
                          env={**prefect_server, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "datasets"
    build = json.loads((out / "manifest.json").read_text())
    publish = json.loads((out / "hub" / "manifest.json").read_text())
    assert build["rows_in"] == 17 and publish["rows_in"] == publish["rows_out"] == build["rows_out"]
    assert (out / "hub" / "sft" / "data" / "train-00000-of-00001.parquet").is_file()
    req = urllib.request.Request(prefect_server["PREFECT_API_URL"] + "/flow_runs/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        runs = json.loads(r.read())
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
