"""Recipe schema: the published numbers, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fusechat.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# RECIPE_FACTS "Training": target -> (sft lr, dpo lr, beta, loss)
PUBLISHED = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", 5e-6, 8e-7, 10, "sigmoid_norm"),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", 5e-6, 1e-6, 10, "sigmoid_norm"),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", 5e-6, 1e-6, 10, "sigmoid_norm"),
    "qwen-2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", 2e-6, 3e-7, 0.01, "sigmoid"),
    "gemma-2-9b": ("google/gemma-2-9b-it", 2e-6, 5e-7, 0.01, "sigmoid"),
}


@pytest.mark.parametrize("target", sorted(PUBLISHED))
def test_published_recipes_carry_the_published_numbers(target):
    model, sft_lr, dpo_lr, beta, loss = PUBLISHED[target]
    r = load_recipe(RECIPES / f"{target}.yaml")
    assert r.target.model == model
    assert (r.sft.learning_rate, r.sft.epochs, r.sft.global_batch_size, r.sft.max_length) == (sft_lr, 3, 128, 2048)
    assert (r.sft.lr_scheduler, r.sft.warmup_ratio) == ("cosine", 0.1)
    assert (r.dpo.learning_rate, r.dpo.beta, r.dpo.loss_type) == (dpo_lr, beta, loss)
    assert (r.dpo.epochs, r.dpo.global_batch_size, r.dpo.max_length, r.dpo.save_steps) == (1, 128, 2048, 100)
    assert (r.dpo.lr_scheduler, r.dpo.warmup_ratio, r.dpo.keep_best_of_last) == ("cosine", 0.1, 2)
    # shared data part
    assert (r.build.band.low, r.build.band.high) == (0.01, 0.1)
    assert r.build.sft_fraction["instruction"] == 0.4
    assert r.scoring.reward_model.model == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    src = {s.name: s for s in r.sources}
    assert {"gemma-2-27b-it", "mistral-large-2407", "qwen-2.5-72b", "llama-3.1-70b"} <= set(src)
    for name in ("gemma-2-27b-it", "mistral-large-2407", "llama-3.1-70b"):
        assert (src[name].sampling.temperature, src[name].sampling.top_p) == (0.8, 0.95)
        assert src[name].responses == {"instruction": 5, "code": 8}
    q = src["qwen-2.5-72b"].sampling
    assert (q.temperature, q.top_p, q.repetition_penalty) == (0.7, 0.8, 1.05)
    assert [s.name for s in r.sources if s.responses.get("chinese")] == ["qwen-2.5-72b"]
    assert src["qwen-2.5-72b"].responses["chinese"] == 1
    limits = {d.name: d.limit for d in r.datasets}
    assert sum(limits.values()) == 158_667
    assert limits["ultrafeedback"] == 51_098 and limits["openmathinstruct2"] == 51_803


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_recipe(RECIPES / "llama-3.1-8b.yaml")
    b = load_recipe(RECIPES / "llama-3.1-8b.yaml")
    c = load_recipe(RECIPES / "llama-3.2-1b.yaml")
    assert a.content_hash() == b.content_hash() != c.content_hash()
    # --run-dir overrides the recipe's run directory and therefore its hash
    d = load_recipe(RECIPES / "llama-3.1-8b.yaml", run_dir=str(tmp_path / "elsewhere"))
    assert d.run_path() == tmp_path / "elsewhere" and d.content_hash() != a.content_hash()


def _minimal(tmp_path: Path) -> dict:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "hi"}\n')
    return {
        "name": "t",
        "run_dir": "runs/t",
        "sources": [{"name": "a", "model": "./model", "family": "llama3", "responses": {"instruction": 2}}],
        "datasets": [{"name": "d", "path": "./prompts.jsonl", "adapter": "ultrafeedback", "domain": "instruction"}],
        "scoring": {"reward_model": {"model": "./model"}},
        "target": {"model": "./model", "family": "llama3"},
        "sft": {"learning_rate": 1e-5},
        "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    }


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_recipe_resolves_paths_against_its_folder(tmp_path):
    r = load_recipe(_write(tmp_path, _minimal(tmp_path)))
    assert r.resolve(r.sources[0].model) == str(tmp_path / "model")
    assert r.run_path() == tmp_path / "runs" / "t"
    assert r.sources[0].sampling.max_tokens == 4096  # documented default


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d["sources"][0]["sampling"].update(temprature=0.7), "sources[0].sampling.temprature: Extra inputs are not permitted"),
        (lambda d: d["sources"][0]["sampling"].update(top_p="high"), "sources[0].sampling.top_p: Input should be a valid number"),
        (lambda d: d.update(build={"band": {"low": 0.2, "high": 0.1}}), "build.band: band low (0.2) must not exceed band high (0.1)"),
        (lambda d: d["sources"][0].update(family="gpt"), "sources[0].family: Input should be 'llama3', 'qwen2', 'gemma2' or 'mistral'"),
        (lambda d: d["sources"][0].update(responses={"instruction": -1}), "sources[0].responses: responses for instruction must be >= 0"),
        (lambda d: d.pop("scoring"), "scoring: Field required"),
        (lambda d: d["sft"].update(global_batch_size=10, per_device_batch_size=3), "sft: global_batch_size (10) must be a multiple of per_device_batch_size (3)"),
        (lambda d: d["sources"].append(dict(d["sources"][0])), "sources[1].name 'a' is used twice"),
    ],
    ids=["unknown-key", "wrong-type", "band-inverted", "bad-enum", "negative-count", "missing-field", "batch-multiple", "duplicate-name"],
)
def test_bad_values_name_file_and_field(tmp_path, mutate, expect):
    data = _minimal(tmp_path)
    data["sources"][0]["sampling"] = {}
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    assert expect in str(e.value)


def test_missing_local_model_path_is_named(tmp_path):
    data = _minimal(tmp_path)
    data["sources"][0]["model"] = "./models/does-not-exist"
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "sources[0].model: ./models/does-not-exist" in msg
    assert str(tmp_path / "models" / "does-not-exist") in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: t\nsources:\n  - name: a\n    model: [unclosed\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "YAML syntax error" in str(e.value) and "line" in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_extends_merges_mappings_and_detects_cycles(tmp_path):
    base = _minimal(tmp_path)
    _write(tmp_path, base, "base.yaml")
    child = {"extends": "base.yaml", "name": "child", "dpo": {"beta": 10}}
    r = load_recipe(_write(tmp_path, child, "child.yaml"))
    assert r.name == "child" and r.dpo.beta == 10 and r.dpo.learning_rate == 1e-6
    _write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    _write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_extended_recipe_paths_resolve_against_its_own_folder(tmp_path):
    # the demo recipe names its models and data relative to recipes/; a recipe elsewhere that
    # extends it must still find them, and its own relative paths resolve against its own folder
    (tmp_path / "mine").mkdir()
    child = {"extends": str(RECIPES / "demo.yaml"), "name": "mine", "run_dir": "out",
             "target": {"model": "../mine-target"}}
    (tmp_path / "mine-target").mkdir()
    r = load_recipe(_write(tmp_path / "mine", child, "child.yaml"))
    demo = load_recipe(RECIPES / "demo.yaml")
    assert [r.resolve(s.model) for s in r.sources] == [demo.resolve(s.model) for s in demo.sources]
    assert r.resolve(r.datasets[0].path) == str(ROOT / "data" / "demo" / "prompts" / "train" / "math.jsonl")
    assert r.resolve(r.scoring.reward_model.model) == str(ROOT / "data" / "demo" / "models" / "reward")
    assert r.resolve(r.eval.files["demo"]) == str(ROOT / "data" / "demo" / "prompts" / "eval")
    assert r.resolve(r.target.model) == str(tmp_path / "mine-target")
    assert r.run_path() == tmp_path / "mine" / "out"
    # not set by the child: the parent's run_dir, against the parent's folder
    del child["run_dir"]
    assert load_recipe(_write(tmp_path / "mine", child, "child.yaml")).run_path() == demo.run_path()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusechat", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_recipe_show_json_and_validate_errors(tmp_path):
    out = _cli("recipe", "show", str(RECIPES / "qwen-2.5-7b.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["recipe_hash"] == load_recipe(RECIPES / "qwen-2.5-7b.yaml").content_hash()
    assert data["recipe"]["dpo"]["beta"] == 0.01
    assert data["recipe"]["sources"][0]["sampling"]["max_tokens"] == 4096  # defaults resolved

    data = _minimal(tmp_path)
    data["build"] = {"band": {"low": 0.5, "high": 0.1}}
    bad = _write(tmp_path, data)
    out = _cli("recipe", "validate", str(bad))
    assert out.returncode != 0 and "build.band" in out.stderr and str(bad) in out.stderr
    assert "Traceback" not in out.stderr


def test_help_is_instant_and_imports_nothing_heavy():
    code = textwrap.dedent(
        """
        import sys
        from fusechat.cli import app
        from fusechat.recipe import load_recipe
        load_recipe("recipes/llama-3.1-8b.yaml")
        heavy = [m for m in ("torch", "vllm", "transformers", "trl", "datasets", "prefect", "pyarrow") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("recipe", "sample", "score", "build", "publish", "sft", "dpo", "eval", "run"):
        assert command in out.stdout


# -- options passed through to vLLM, the other engines and TRL ------------------------------------
@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d["sources"][0].update(engine_options={"tensor_paralel_size": 2}),
         "sources[0].engine_options.tensor_paralel_size: unknown vllm engine option; did you mean 'tensor_parallel_size'?"),
        (lambda d: d["sources"][0].update(engine_options={"max_model_len": "4k"}),
         "sources[0].engine_options.max_model_len: Input should be a valid integer, got '4k'"),
        (lambda d: d["sources"][0].update(engine_options={"seed": 3}),
         "sources[0].engine_options.seed: set by fusechat from the recipe's `seed`"),
        (lambda d: d["sources"][0].update(engine="openai", engine_options={"concurency": 4}),
         "sources[0].engine_options.concurency: unknown openai engine option; did you mean 'concurrency'?"),
        (lambda d: d["sources"][0].update(engine="openai", engine_options={"concurrency": 4}),
         "sources[0].engine_options.base_url: Field required"),
        (lambda d: d["sources"][0].update(engine="transformers", engine_options={"batch_size": "8"}),
         "sources[0].engine_options.batch_size: Input should be a valid integer, got '8'"),
        (lambda d: d.update(eval={"engine_options": {"enforce_eagr": True}}),
         "eval.engine_options.enforce_eagr: unknown vllm engine option; did you mean 'enforce_eager'?"),
        (lambda d: d["sft"].update(trl_args={"weight_decy": 0.1}),
         "sft.trl_args.weight_decy: unknown SFTConfig argument; did you mean 'weight_decay'?"),
        (lambda d: d["sft"].update(trl_args={"learning_rate": 1e-4}),
         "sft.trl_args.learning_rate: set from sft.learning_rate; set it there"),
        (lambda d: d["dpo"].update(trl_args={"beta": 0.5}), "dpo.trl_args.beta: set from dpo.beta; set it there"),
        (lambda d: d["dpo"].update(trl_args={"output_dir": "x"}), "dpo.trl_args.output_dir: set by fusechat itself"),
        (lambda d: d["dpo"].update(trl_args={"max_grad_norm": "one"}),
         "dpo.trl_args.max_grad_norm: Input should be a valid number, got 'one'"),
    ],
    ids=["vllm-typo", "vllm-type", "vllm-owned", "openai-typo", "openai-required", "transformers-type", "eval-typo",
         "trl-typo", "trl-owned", "trl-owned-dpo", "trl-fusechat", "trl-type"],
)
def test_pass_through_options_fail_at_validate_with_their_field(tmp_path, mutate, expect):
    data = _minimal(tmp_path)
    mutate(data)
    path = _write(tmp_path, data)
    out = _cli("recipe", "validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(path) in out.stderr and expect in out.stderr, out.stderr


def test_good_pass_through_options_validate_and_stay_light(tmp_path):
    data = _minimal(tmp_path)
    data["sources"][0]["engine_options"] = {"tensor_parallel_size": 2, "max_model_len": 8192, "dtype": "bfloat16",
                                            "gpu_memory_utilization": 1, "enforce_eager": True, "tokenizer": "./model"}
    data["sft"]["trl_args"] = {"weight_decay": 0.1, "optim": "adamw_torch_fused", "max_grad_norm": 0.5}
    data["dpo"]["trl_args"] = {"label_smoothing": 0.1, "logging_steps": 5}
    path = _write(tmp_path, data)
    # checking them reads vLLM's and TRL's argument lists without importing either
    code = textwrap.dedent(
        f"""
        import sys
        from fusechat.recipe import load_recipe
        r = load_recipe({str(path)!r})
        assert r.sft.trl_args["weight_decay"] == 0.1 and not r._notes, r._notes
        heavy = [m for m in ("torch", "vllm", "transformers", "trl") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_unreadable_vllm_options_are_a_note_not_an_error(tmp_path, monkeypatch):
    # stands for a machine without vLLM (a CPU box that only trains): the package cannot be found
    import importlib.util

    from fusechat import engine_options

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    engine_options.vllm_option_types.cache_clear()
    engine_options.vllm_options_model.cache_clear()
    try:
        data = _minimal(tmp_path)
        data["sources"][0]["engine_options"] = {"tensor_paralel_size": 2}
        r = load_recipe(_write(tmp_path, data))
    finally:
        engine_options.vllm_option_types.cache_clear()
        engine_options.vllm_options_model.cache_clear()
    assert r._notes == ["sources[0].engine_options: not checked: vllm is not installed here"]


def test_argument_lists_read_from_source_match_the_libraries(tmp_path):
    # the names read without importing are the names of the imported dataclasses
    import dataclasses
    import inspect

    from trl import DPOConfig, SFTConfig
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    from fusechat.engine_options import vllm_option_types
    from fusechat.recipe import TRL_CONFIGS, TRL_OWNED
    from fusechat.source_fields import read_fields
    from fusechat.train.common import config_kwargs

    init = [p.name for p in inspect.signature(LLM.__init__).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    want = {f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")} | set(init)
    assert set(vllm_option_types()) == want
    assert vllm_option_types()["max_model_len"] is int
    for stage, config in (("sft", SFTConfig), ("dpo", DPOConfig)):
        fields = {f.name for f in dataclasses.fields(config) if f.init and not f.name.startswith("_")}
        assert set(read_fields(TRL_CONFIGS[stage])) == fields
        assert set(TRL_OWNED[stage]) <= fields

    # every TRL argument fusechat sets from the recipe is one `trl_args` may not set, and the rest reach TRL
    r = load_recipe(_write(tmp_path, {**_minimal(tmp_path), "sft": {"learning_rate": 1e-5, "trl_args": {
        "weight_decay": 0.1, "max_grad_norm": 0.5, "logging_steps": 3}}}))
    kwargs = config_kwargs(r.sft, tmp_path, "sft")
    assert set(kwargs) - {"logging_steps", "logging_first_step", "ddp_find_unused_parameters", "weight_decay",
                          "max_grad_norm"} <= set(TRL_OWNED["sft"])
    args = SFTConfig(**kwargs)
    assert (args.weight_decay, args.max_grad_norm, args.logging_steps) == (0.1, 0.5, 3)


# -- a recipe with only the data part --------------------------------------------------------------
def test_the_data_recipe_runs_the_data_stages_and_training_says_what_it_needs(tmp_path):
    out = _cli("recipe", "validate", str(RECIPES / "fusechat-3.0-data.yaml"))
    assert out.returncode == 0, out.stderr
    assert "recipe 'fusechat-3.0-data'" in out.stdout  # the name defaults to the file's stem
    data = {k: v for k, v in _minimal(tmp_path).items() if k not in ("name", "target", "sft", "dpo")}
    path = _write(tmp_path, data, "only-data.yaml")
    r = load_recipe(path)
    assert r.name == "only-data" and r.target is r.sft is r.dpo is None

    from fusechat.prompts.stage import build_prompts

    assert build_prompts(r).rows_out == 1  # a data stage runs on it
    for stage, needs in (("sft", "the `target` and `sft` sections"), ("dpo", "the `target` and `dpo` sections"),
                         ("eval", "the `target` section")):
        out = _cli(stage, str(path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert f"recipe 'only-data': fusechat {stage} needs {needs}" in lines[0]


# -- the reference ----------------------------------------------------------------------------------
def test_every_recipe_field_is_documented_and_docs_recipe_md_is_current():
    from pydantic import BaseModel

    from fusechat.recipe import Recipe, reference_markdown

    undocumented, todo, seen = [], [Recipe], set()
    while todo:
        model = todo.pop()
        seen.add(model)
        for name, info in model.model_fields.items():
            if not info.exclude and not info.description:
                undocumented.append(f"{model.__name__}.{name}")
            for t in [info.annotation, *getattr(info.annotation, "__args__", ())]:
                for u in [t, *getattr(t, "__args__", ())]:
                    if isinstance(u, type) and issubclass(u, BaseModel) and u not in seen:
                        todo.append(u)
    assert not undocumented
    assert (ROOT / "docs" / "recipe.md").read_text() == reference_markdown(), (
        "docs/recipe.md is out of date: fusechat recipe docs > docs/recipe.md")
    out = _cli("recipe", "docs")
    assert out.returncode == 0 and out.stdout == reference_markdown()


def test_fusechat_run_of_a_data_recipe_runs_the_data_stages(tmp_path):
    from fusechat.pipeline import stages_for
    from fusechat.stages import PIPELINE

    data = load_recipe(ROOT / "recipes" / "fusechat-3.0-data.yaml", check_paths=False)
    assert stages_for(data) == ("prompts", "sample", "score", "build", "publish")
    assert stages_for(load_recipe(ROOT / "recipes" / "llama-3.1-8b.yaml", check_paths=False)) == PIPELINE
