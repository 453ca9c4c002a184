"""`fusechat doctor`: the preflight on the demo, on the published recipes (offline: their checks say
why they cannot run and the rest goes on), on a target with the real marker-less Llama-3.1
template (passes: the shipped training template is used) and on an unknown template (fails with
the fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusechat.cli import app
from fusechat.doctor import run_doctor
from fusechat.recipe import load_recipe
from fusechat.templates import KNOWN, read
from fusechat.testing.tiny import build_tiny_lm
from fusechat.testing.train_data import write_recipe

ROOT = Path(__file__).resolve().parents[1]
LLAMA31 = next(k for k in KNOWN if k.name == "llama3_1")


def _verdicts(checks, model=None):
    return {(c.model, c.check): c.verdict for c in checks if model is None or c.model == model}


def test_every_check_passes_on_the_demo(tmp_path):
    checks = run_doctor(load_recipe(ROOT / "recipes" / "demo.yaml", run_dir=str(tmp_path / "run")))
    bad = [c for c in checks if c.verdict != "ok"]
    assert not bad, bad
    got = {c.check for c in checks}
    for check in ("chat template", "one BOS", "stop ids", "lengths", "memory", "revision", "engine options",
                  "trained tokens", "training memory", "gating pattern"):
        assert check in got, check
    # four sources, the target and the reward model each get their rows
    assert {c.model for c in checks} == {"source llama3-math", "source qwen2-chinese", "source gemma2-instruct",
                                         "source mistral-code", "target", "reward model"}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_doctor_prints_its_table_for_every_shipped_recipe(recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub models cannot be had here: those checks must skip, not hang
    result = CliRunner().invoke(app, ["doctor", str(ROOT / "recipes" / recipe)])
    out = result.output
    assert "fusechat doctor" in out and "blocker(s)" in out, out[-2000:]
    if recipe != "demo.yaml":
        assert "could not run" in out and "hub is not reachable" in out
        assert "unpinned" in out  # the published recipes leave most revisions open: a warning each
    assert result.exit_code == 0, out[-3000:]


def _recipe_with_target(tmp_path: Path, template: str):
    model = build_tiny_lm("llama3", tmp_path / "target", chat_template=template)
    return load_recipe(write_recipe(tmp_path / "r.yaml", model, "llama3", tmp_path / "run"))


def test_a_marker_less_llama_3_1_target_passes_with_the_shipped_template(tmp_path):
    checks = run_doctor(_recipe_with_target(tmp_path, read(LLAMA31.original)))
    target = [c for c in checks if c.model == "target"]
    assert all(c.verdict == "ok" for c in target), target
    trained = next(c for c in target if c.check == "trained tokens")
    assert "llama3_1_training.jinja" in trained.detail and "2 + 3 = 5.<|eot_id|>" in trained.detail
    template = next(c for c in target if c.check == "chat template")
    assert "llama3_1" in template.detail


def test_an_unknown_template_fails_with_the_hint(tmp_path):
    text = read(LLAMA31.original).replace("Cutting Knowledge Date", "Knowledge cut-off")
    r = _recipe_with_target(tmp_path, text)
    trained = next(c for c in run_doctor(r) if (c.model, c.check) == ("target", "trained tokens"))
    assert trained.verdict == "fail" and "generation" in trained.fix
    result = CliRunner().invoke(app, ["doctor", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1
    assert "1 blocker(s)" in result.output
    # `fusechat run` checks first and runs nothing
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "nothing was run" in result.output
    assert not (tmp_path / "run" / "prompts").exists()


def test_stop_ids_that_miss_the_turn_end_are_a_blocker(tmp_path):
    r = _recipe_with_target(tmp_path, read(LLAMA31.original))
    gen = tmp_path / "target" / "generation_config.json"
    cfg = json.loads(gen.read_text())
    cfg["eos_token_id"] = 1  # not <|eot_id|>
    gen.write_text(json.dumps(cfg))
    tok_cfg = tmp_path / "target" / "tokenizer_config.json"
    t = json.loads(tok_cfg.read_text())
    t["eos_token"] = "<|end_of_text|>"
    tok_cfg.write_text(json.dumps(t))
    stop = next(c for c in run_doctor(r) if c.check == "stop ids" and c.model == "source tiny")
    assert stop.verdict == "fail" and "<|eot_id|>" in stop.detail and "generation_config.json" in stop.fix
