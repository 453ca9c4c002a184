"""Publishing: the hub-layout folder loads with `datasets`, the card carries provenance, and no
upload happens without a repository, a token and a network."""

from __future__ import annotations

import socket

import pyarrow.parquet as pq
import pytest
import yaml
from test_build import make_recipe, write_run

from fusechat.build import run_build
from fusechat.publish import run_publish
from fusechat.recipe import RecipeError


@pytest.fixture
def built(tmp_path):
    write_run(tmp_path)
    recipe = make_recipe(tmp_path, test_fraction=0.3, hub_repo_prefix="example-org/fusechat-rules")
    run_build(recipe)
    return recipe


def test_folder_loads_with_datasets_and_card_has_provenance(built, tmp_path, capsys):
    from datasets import load_dataset

    m = run_publish(built)
    assert m.extra["dry_run"] and m.extra["reason"] == "HF_HUB_OFFLINE is set"
    assert m.extra["uploaded"] == {}
    m.check_balance()
    out = tmp_path / "datasets"
    err = capsys.readouterr().err
    assert "example-org/fusechat-rules-sft" in err and "README.md" in err
    for kind in ("sft", "dpo"):
        folder = out / "hub" / kind
        ds = load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
        for split in ("train", "test"):
            want = pq.read_table(out / kind / f"{split}.parquet").to_pylist()
            if want:
                assert ds[split].to_list() == want
            else:
                assert split not in ds
        assert m.extra["files"][f"{kind}/README.md"] == (folder / "README.md").stat().st_size
        card = (folder / "README.md").read_text()
        header = yaml.safe_load(card.split("---")[1])
        assert header["license"] == "other" and header["task_categories"] == ["text-generation"]
        assert kind in header["tags"]
        assert header["configs"][0]["data_files"][0] == {
            "split": "train", "path": "data/train-00000-of-00001.parquet"}
        assert built.content_hash() in card
        assert "| a | org/a | rev-a |" in card  # source, model id, revision from the responses
        assert "(plots/margins.png)" in card and (folder / "plots" / "margins.png").is_file()
        # the reward-model audit travels with the data it chose
        assert "## Reward-model audit" in card and "| math | all | checker |" in card
        assert (folder / "plots" / "reward_audit.png").is_file()


def test_unreachable_hub_uploads_nothing(built, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.delenv("FUSECHAT_PUBLISH_DRY_RUN", raising=False)
    m = run_publish(built)
    assert m.extra["dry_run"] and m.extra["reason"].startswith("upload failed, hub unreachable")
    assert m.extra["uploaded"] == {}
    monkeypatch.setenv("FUSECHAT_PUBLISH_DRY_RUN", "1")
    assert run_publish(built).extra["reason"] == "FUSECHAT_PUBLISH_DRY_RUN is set"


def test_upload_needs_a_repository_and_a_current_build(built, tmp_path):
    with pytest.raises(RecipeError, match="hub_repo_prefix is not set"):
        run_publish(make_recipe(tmp_path, test_fraction=0.3), dry_run=False)
    # another recipe hash than the build's: the folder would misstate provenance
    with pytest.raises(RecipeError, match="run `fusechat build` again"):
        run_publish(make_recipe(tmp_path, test_fraction=0.3))


def test_a_set_without_rows_gets_no_folder(tmp_path):
    write_run(tmp_path, {"Z1": ("zh", "chinese", {"b": [.4]}), "Z2": ("zh", "chinese", {"b": [.3]})})
    recipe = make_recipe(tmp_path)
    run_build(recipe)
    m = run_publish(recipe)
    hub = tmp_path / "datasets" / "hub"
    assert (hub / "sft" / "data" / "train-00000-of-00001.parquet").is_file() and not (hub / "dpo").exists()
    assert (m.rows_in, m.rows_out, list(m.extra["targets"])) == (2, 2, ["sft"])
    assert "language:\n- en\n- zh" in (hub / "sft" / "README.md").read_text()
