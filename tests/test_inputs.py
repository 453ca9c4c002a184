"""Stage contracts: the stage registry, the declared tables, and bad input as a user meets it.

Bad input ends in one line naming the file (and the row and field where there is one), exit code
2 and no traceback; the commands run as a user runs them, in a subprocess, on small hand-made runs.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat import tables
from fusechat.stages import PIPELINE, STAGES, writer_of

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp: Path, datasets: list[dict] | None = None) -> Path:
    model = tmp / "model"  # a local folder: the stages tried here never load it
    model.mkdir(exist_ok=True)
    data = tmp / "data.jsonl"
    if not data.exists():
        data.write_text('{"instruction": "hello"}\n')
    recipe = {
        "name": "inputs", "run_dir": str(tmp / "run"),
        "sources": [{"name": n, "model": str(model), "family": "llama3"} for n in ("a", "b", "c")],
        "datasets": datasets or [{"name": "inst", "path": str(data), "adapter": "ultrafeedback", "domain": "instruction"}],
        "scoring": {"reward_model": {"model": str(model)}},
        "target": {"model": str(model), "family": "llama3"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fusechat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusechat", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _one_line_exit_2(p: subprocess.CompletedProcess) -> str:
    """The error: the last line of stderr; before it at most the stage's progress bars."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert all(" examples" in line for line in lines[:-1]), p.stderr  # `datasets` reading a file
    return lines[-1]


def _scored_run(run: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_build import write_run

    write_run(run)


# -- the stage registry ---------------------------------------------------------------------------
def test_every_stage_has_its_command_function_and_declared_tables():
    from typer.main import get_command

    from fusechat.cli import app

    commands = get_command(app).commands
    for stage in STAGES.values():
        assert stage.name in commands and commands[stage.name].help == stage.doc
        assert callable(stage.load())
        for name in (*stage.inputs, *stage.outputs):
            assert name in tables.TABLES, (stage.name, name)
    assert PIPELINE[0] == "prompts" and set(PIPELINE) == set(STAGES)
    # every table other stages read has exactly one writer, whose folder holds it
    for t in tables.TABLES.values():
        writers = [s for s in STAGES.values() if t.name in s.outputs]
        if not t.internal:
            assert len(writers) == 1 and t.path.startswith(writers[0].folder + "/"), t.name
    for stage in STAGES.values():  # inputs come from stages earlier in the pipeline
        for name in stage.inputs:
            assert PIPELINE.index(writer_of(name).name) < PIPELINE.index(stage.name)


def test_nothing_imports_the_cli():
    importers = []
    for path in [*(ROOT / "fusechat").rglob("*.py"), *(ROOT / "flows").glob("*.py")]:
        if path.name == "__main__.py":
            continue  # `python -m fusechat` is the CLI
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "fusechat.cli" for n in names) or (
                    isinstance(node, ast.ImportFrom) and node.module == "fusechat" and
                    any(a.name == "cli" for a in node.names)):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == []


# -- the declared tables --------------------------------------------------------------------------
def test_architecture_doc_lists_the_declared_tables():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split(tables.BEGIN, 1)[1].split(tables.END, 1)[0]
    assert section.strip() == tables.markdown().strip(), (
        "docs/architecture.md is out of date: run `python -m fusechat.tables docs/architecture.md`")


def test_a_writer_gives_exactly_the_declared_columns(tmp_path):
    from fusechat.run import write_table

    spec = tables.EVAL_RESULTS
    rows = [{"value": 0.5, "metric": "accuracy", "domain": "math", "model": "m"}]
    write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet", spec)  # reordered, float inferred
    assert pq.read_schema(tmp_path / "r.parquet").remove_metadata() == spec.schema()
    with pytest.raises(ValueError, match=r"undeclared \['extra'\]"):
        write_table(pa.Table.from_pylist([{**rows[0], "extra": 1}]), tmp_path / "s.parquet", spec)


# -- bad input, as a user meets it ----------------------------------------------------------------
def test_build_without_scores_names_the_command_to_run_first(tmp_path):
    recipe = _recipe(tmp_path)
    _scored_run(tmp_path / "run")
    (tmp_path / "run" / "scores" / "scores.parquet").unlink()
    line = _one_line_exit_2(_fusechat("build", str(recipe)))
    assert line == f"{tmp_path / 'run' / 'scores' / 'scores.parquet'}: missing; run `fusechat score` first"
    assert not (tmp_path / "run" / "datasets" / "manifest.json").exists()


def test_truncated_scores_table_is_named(tmp_path):
    recipe = _recipe(tmp_path)
    _scored_run(tmp_path / "run")
    scores = tmp_path / "run" / "scores" / "scores.parquet"
    data = scores.read_bytes()
    scores.write_bytes(data[: len(data) // 2])
    line = _one_line_exit_2(_fusechat("build", str(recipe)))
    assert line.startswith(f"{scores}: cannot be read as a scores table") and "run `fusechat score` again" in line
    assert (tmp_path / "run" / "responses" / "responses.parquet").exists()  # nothing else touched


def test_truncated_reward_checkpoint_is_named(tmp_path, tiny_armorm):
    rm = tmp_path / "rm"
    shutil.copytree(tiny_armorm, rm)
    weights = rm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    recipe = _recipe(tmp_path)
    spec = yaml.safe_load(recipe.read_text())
    spec["scoring"]["reward_model"]["model"] = str(rm)
    recipe.write_text(yaml.safe_dump(spec))
    _scored_run(tmp_path / "run")
    (tmp_path / "run" / "scores" / "scores.parquet").unlink()
    line = _one_line_exit_2(_fusechat("score", str(recipe)))
    assert line.startswith(f"{weights}: not a complete safetensors file"), line
    assert not (tmp_path / "run" / "scores" / "scores.parquet").exists()


def test_malformed_json_line_in_a_prompt_file_is_named_with_its_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"instruction": "one"}\n{"instruction": "two"\n{"instruction": "three"}\n')
    recipe = _recipe(tmp_path, [{"name": "inst", "path": str(data), "adapter": "ultrafeedback",
                                 "domain": "instruction"}])
    line = _one_line_exit_2(_fusechat("prompts", str(recipe)))
    assert line.startswith(f"datasets[0] 'inst' ({data}): line 2: not valid JSON"), line
    assert not (tmp_path / "run" / "prompts" / "prompts.parquet").exists()


def test_prompts_command_writes_the_prompt_table(tmp_path):
    p = _fusechat("prompts", str(_recipe(tmp_path)))
    assert p.returncode == 0, p.stderr
    table = tables.read(tables.PROMPTS, tmp_path / "run" / tables.PROMPTS.path)
    assert table.schema.remove_metadata() == tables.PROMPTS.schema() and table.num_rows == 1
    manifest = json.loads((tmp_path / "run" / "prompts" / "manifest.json").read_text())
    assert manifest["stage"] == "prompts" and manifest["rows_out"] == 1
