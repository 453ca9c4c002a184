"""Work is the rows not yet computed: on the demo world (its prompt files, its source models and its
reward model), each change of the recipe samples and scores only what it changes.

One run directory goes through the changes in order: add a source; add a data set and raise another
one's limit; change one source's sampling settings; change the reward model; prune. Sources run on
the transformers engine (the planning is the engine's caller; vLLM's own path is tested in
test_sampling.py), so each step costs seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.recipe import load_recipe
from fusechat.sampling.stage import run_sample
from fusechat.scoring.stage import run_score
from fusechat.tables import DOMAINS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 16}


def _source(name: str, responses: dict[str, int], **extra) -> dict:
    family = name.split("-")[0]
    return {"name": name, "model": str(DEMO / "models" / name), "family": family, "engine": "transformers",
            "sampling": SAMPLING, "responses": responses, "shard_size": 4, **extra}


def _dataset(domain: str, limit: int) -> dict:
    return {"name": f"demo-{domain}", "path": str(DEMO / "prompts" / "train" / f"{domain}.jsonl"),
            "adapter": "demo", "domain": domain, "limit": limit}


class Run:
    """One run directory and the recipe it is at now."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = {
            "name": "incremental", "run_dir": str(folder / "run"), "seed": 0,
            "sources": [_source("llama3-math", {"math": 2, "code": 1, "instruction": 1}),
                        _source("gemma2-instruct", {"math": 1, "code": 1, "instruction": 2})],
            "datasets": [_dataset("math", 4), _dataset("code", 4)],
            "filters": {"near_dedup_threshold": None},
            "scoring": {"reward_model": {"model": str(DEMO / "models" / "reward"), "kind": "armorm",
                                         "max_length": 512},
                        "math": {"timeout_s": 5, "workers": 1}, "code": {"timeout_s": 5, "workers": 1},
                        "shard_size": 8},
        }

    def write(self) -> Path:
        path = self.folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        return path

    def recipe(self):
        return load_recipe(self.write())

    def table(self, name: str) -> list[dict]:
        stage = {"responses": "responses", "scores": "scores", "prompts": "prompts"}[name]
        return pq.read_table(self.folder / "run" / stage / f"{name}.parquet").to_pylist()


def _counts(manifest) -> dict[str, int]:
    return {n: s["rows_computed"] for n, s in manifest.extra["per_source"].items()}


def _expected(run: Run, prompts: set[str] | None = None) -> dict[str, int]:
    """Responses each source owes on `prompts` (default: every prompt of the table)."""
    rows = [p for p in run.table("prompts") if prompts is None or p["prompt_id"] in prompts]
    return {s["name"]: sum(s["responses"].get(p["domain"], 0) for p in rows) for s in run.data["sources"]}


def _assert_one_go_order(run: Run) -> None:
    """Rows as a run computed in one go writes them: by source, domain, prompt-table order, sample."""
    position = {p["prompt_id"]: (DOMAINS.index(p["domain"]), i) for i, p in enumerate(run.table("prompts"))}
    source = {s["name"]: i for i, s in enumerate(run.data["sources"])}
    rows = run.table("responses")
    keys = [(source[r["source"]], *position[r["prompt_id"]], r["sample_index"]) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    scores = run.table("scores")
    assert [s["response_id"] for s in scores] == [r["response_id"] for r in rows]  # every row, same order


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("incremental"))
    first = run_sample(r.recipe())
    assert _counts(first) == _expected(r)
    scored = run_score(r.recipe())
    assert scored.extra["reward"] == {"rows_computed": first.rows_out, "rows_reused": 0}
    return r


def test_adding_a_source_samples_and_scores_only_its_responses(run, capfd):
    before = {r["response_id"]: r["text"] for r in run.table("responses")}
    run.data["sources"].append(_source("mistral-code", {"code": 1, "instruction": 1}))
    run_sample(run.recipe())
    # the summary says what was computed and what reused
    assert "responses: 4 computed now, 20 reused from finished shards" in capfd.readouterr().err
    rows = run.table("responses")
    new = [r for r in rows if r["source"] == "mistral-code"]
    assert len(new) == _expected(run)["mistral-code"] == 4
    assert {r["response_id"]: r["text"] for r in rows if r["source"] != "mistral-code"} == before
    scored = run_score(run.recipe())
    assert scored.extra["reward"] == {"rows_computed": len(new), "rows_reused": len(before)}
    assert scored.extra["checks"] == {"rows_computed": len(new), "rows_reused": len(before)}
    _assert_one_go_order(run)


def test_a_new_data_set_and_a_raised_limit_sample_only_new_prompts(run):
    old = {p["prompt_id"] for p in run.table("prompts")}
    run.data["datasets"][0]["limit"] = 6  # math: two more prompts, interleaved with the earlier ones
    run.data["datasets"].append(_dataset("instruction", 4))
    recipe = run.recipe()
    sampled = run_sample(recipe)
    new = {p["prompt_id"] for p in run.table("prompts")} - old
    assert len(new) == 6 and old <= {p["prompt_id"] for p in run.table("prompts")}
    owed = _expected(run, new)
    assert _counts(sampled) == owed and all(owed.values())  # every source, only the new prompts
    assert sampled.extra["rows_reused"] == sampled.rows_out - sum(owed.values())
    scored = run_score(recipe)
    assert scored.extra["reward"]["rows_computed"] == scored.extra["checks"]["rows_computed"] == sum(owed.values())
    _assert_one_go_order(run)


def test_new_sampling_settings_resample_only_that_source(run):
    before = {r["response_id"]: r["text"] for r in run.table("responses")}
    run.data["sources"][2]["sampling"] = {**SAMPLING, "temperature": 0.5}
    sampled = run_sample(run.recipe())
    assert _counts(sampled) == {"llama3-math": 0, "gemma2-instruct": 0, "mistral-code": _expected(run)["mistral-code"]}
    rows = run.table("responses")
    assert {r["response_id"]: r["text"] for r in rows if r["source"] != "mistral-code"} == \
        {k: v for k, v in before.items() if k in {r["response_id"] for r in rows if r["source"] != "mistral-code"}}
    assert not {r["response_id"] for r in rows if r["source"] == "mistral-code"} & set(before)  # new ids
    scored = run_score(run.recipe())
    changed = _expected(run)["mistral-code"]
    assert scored.extra["reward"] == {"rows_computed": changed, "rows_reused": len(rows) - changed}
    assert scored.extra["checks"]["rows_computed"] == changed
    _assert_one_go_order(run)


def test_a_new_reward_model_recomputes_rewards_and_reuses_checks(run):
    before = {s["response_id"]: s for s in run.table("scores")}
    run.data["scoring"]["reward_model"]["max_length"] = 384
    scored = run_score(run.recipe())
    assert scored.extra["reward"] == {"rows_computed": len(before), "rows_reused": 0}
    assert scored.extra["checks"] == {"rows_computed": 0, "rows_reused": len(before)}
    after = run.table("scores")
    assert {s["response_id"]: s["check_status"] for s in after} == {k: s["check_status"] for k, s in before.items()}


def test_prune_removes_what_the_recipe_no_longer_uses(run):
    shards = run.folder / "run"
    files = lambda: sorted(shards.glob("*/shards/**/*.parquet"))  # noqa: E731
    before = files()
    scores, responses = run.table("scores"), run.table("responses")
    from fusechat.prune import prune

    dry = {u.stage: u for u in prune(run.recipe(), dry_run=True)}
    assert files() == before
    # through the command, which deletes and says how much
    proc = subprocess.run([sys.executable, "-m", "fusechat", "prune", str(run.write())], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unused files" in proc.stderr and "MB" in proc.stderr
    found = dry
    # mistral-code's earlier settings; the earlier reward model's scores and the checks of mistral's old texts
    assert len(found["sample"].files) == 2 and all("mistral-code" in str(p) for p in found["sample"].files)
    assert found["score"].files and all(not p.exists() for u in found.values() for p in u.files)
    assert found["sample"].bytes > 0 and len(files()) == len(before) - sum(len(u.files) for u in found.values())
    # what remains is exactly what the recipe uses: nothing to compute, the same tables
    assert sum(_counts(run_sample(run.recipe())).values()) == 0
    again = run_score(run.recipe())
    assert again.extra["reward"]["rows_computed"] == again.extra["checks"]["rows_computed"] == 0
    assert run.table("responses") == responses and run.table("scores") == scores


def test_copied_models_keep_the_finished_work(run, tmp_path):
    """The recipe pointed at copies of its models (another folder, the same bytes), as after moving
    models or a recipe: sampling and reward scoring compute nothing and give the same tables."""
    import copy
    import shutil

    responses, scores, saved = run.table("responses"), run.table("scores"), copy.deepcopy(run.data)
    for block in (*run.data["sources"], run.data["scoring"]["reward_model"]):
        moved = tmp_path / Path(block["model"]).name
        shutil.copytree(block["model"], moved)
        block["model"] = str(moved)
    try:
        assert sum(_counts(run_sample(run.recipe())).values()) == 0
        again = run_score(run.recipe())
        assert again.extra["reward"]["rows_computed"] == again.extra["checks"]["rows_computed"] == 0
        assert run.table("responses") == responses and run.table("scores") == scores
    finally:
        run.data = saved


def test_a_model_retrained_in_place_is_new_work_and_a_copy_is_not(tmp_path, monkeypatch):
    """Local models are keyed by their contents: a retrained model has the same file sizes (the
    demo's trainers rewrite their folders in place), a copied one the same bytes."""
    import shutil

    from fusechat import run as fusechat_run
    from fusechat.run import folder_fingerprint
    from fusechat.sampling.shards import model_revision
    from fusechat.scoring.reward import resolve_model

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(DEMO / "models" / "llama3-math", a)
    shutil.copytree(a, b)
    first = folder_fingerprint(a)
    assert first.startswith("local-") and folder_fingerprint(b) == first
    (a / "checkpoints").mkdir()  # a trainer's checkpoints are not the model
    (a / "checkpoints" / "optimizer.pt").write_bytes(b"state")
    assert folder_fingerprint(a) == first

    def flip(path: Path, offset: int) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 1
        path.write_bytes(bytes(data))

    weights = a / "model.safetensors"
    size = weights.stat().st_size
    flip(weights, size - 1)  # the last weight's last byte: same size, another model
    assert weights.stat().st_size == size and folder_fingerprint(a) not in (first, folder_fingerprint(b))

    # every stage that keys work by a local model uses it: sampling (and eval), the reward model
    r = Run(tmp_path)
    r.data["sources"][0]["model"] = str(a)
    r.data["scoring"]["reward_model"]["model"] = str(a)
    recipe = r.recipe()
    assert model_revision(recipe, recipe.sources[0]) == folder_fingerprint(a) == resolve_model(recipe)[1]

    # files above the whole-file limit are read in chunks spread over the file, head and tail included
    monkeypatch.setattr(fusechat_run, "WHOLE_FILE_BYTES", 4096)
    monkeypatch.setattr(fusechat_run, "CHUNK_BYTES", 64)
    chunked = folder_fingerprint(b)
    for offset in (0, (size - 64) * 32 // 63, size - 1):  # the first, a middle and the last chunk
        flip(b / "model.safetensors", offset)
        assert folder_fingerprint(b) != chunked, offset
        flip(b / "model.safetensors", offset)
    assert folder_fingerprint(b) == chunked
