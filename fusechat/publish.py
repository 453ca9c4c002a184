"""Publish the built data sets: a folder in hub layout with a dataset card, uploaded when possible.

`<run_dir>/datasets/hub/{sft,dpo}/` each hold `data/{split}-00000-of-00001.parquet`, the build's
plots and a `README.md` whose YAML header names the data files, so `datasets.load_dataset(folder)`
reads the folder as the hub would read the uploaded repository.

Uploading needs `build.hub_repo_prefix` (repositories `<prefix>-sft` and `<prefix>-dpo`), a Hugging
Face token (HF_TOKEN or a stored login) and a network. Without any of them, with HF_HUB_OFFLINE, with
FUSECHAT_PUBLISH_DRY_RUN=1 or with `dry_run=True`, the stage prints what it would upload (files,
sizes, target repository) and uploads nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fusechat import audit as rm_audit
from fusechat.recipe import RecipeError
from fusechat.run import Manifest, atomic_write_bytes, load_manifest, stage_dir
from fusechat.tables import TABLES, read

if TYPE_CHECKING:
    from fusechat.recipe import Recipe

KINDS = ("sft", "dpo")
SPLITS = ("train", "test")
TITLES = {
    "sft": "supervised fine-tuning: the best-scored source response per prompt",
    "dpo": "preference pairs: one source model's high- and low-scoring responses per prompt",
}


def _upload_blocker(recipe: Recipe) -> str | None:
    """Why this run cannot upload, or None when it can."""
    from huggingface_hub import constants, get_token

    if recipe.build.hub_repo_prefix is None:
        return "build.hub_repo_prefix is not set in the recipe"
    if os.environ.get("FUSECHAT_PUBLISH_DRY_RUN", "").lower() in ("1", "true", "yes"):
        return "FUSECHAT_PUBLISH_DRY_RUN is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not get_token():
        return "no Hugging Face token (set HF_TOKEN or log in)"
    return None


def _card(recipe: Recipe, kind: str, splits: dict[str, object], build: dict, plots: list[str],
          audit: dict | None = None) -> str:
    import pandas as pd
    from huggingface_hub import DatasetCard, DatasetCardData

    from fusechat.build import markdown_table

    frames = []
    for split, table in splits.items():
        f = table.select(["dataset", "domain", "source_model"]).to_pandas()
        f["split"] = split
        frames.append(f)
    rows = pd.concat(frames, ignore_index=True)
    counts = pd.crosstab([rows["dataset"], rows["domain"]], rows["split"]).reset_index()
    counts.columns.name = None
    by_source = rows.groupby("source_model").size().rename("rows").reset_index()
    languages = ["en", "zh"] if (rows["domain"] == "chinese").any() else ["en"]
    n = len(rows)
    size = next(s for limit, s in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"),
                                   (1e6, "100K<n<1M"), (float("inf"), "n>1M")) if n < limit)
    data = DatasetCardData(
        license="other",
        license_name="upstream-terms",
        language=languages,
        task_categories=["text-generation"],
        tags=["fusechat", "model-fusion", kind, "synthetic", "trl"],
        size_categories=[size],
        pretty_name=f"{recipe.name} {kind.upper()} data",
        configs=[{"config_name": "default", "data_files": [
            {"split": split, "path": f"data/{split}-00000-of-00001.parquet"} for split in splits]}],
    )
    sources = pd.DataFrame([
        {"source": s.name, "model": s.model, "revision": build["models"].get(s.name, s.revision or "")}
        for s in recipe.sources
    ] + [{"source": name, "model": name, "revision": rev}
         for name, rev in build["models"].items() if name not in {s.name for s in recipe.sources}])
    prompts = pd.DataFrame([{"data set": d.name, "path": d.path, "revision": d.revision or "",
                             "split": d.split, "domain": d.domain} for d in recipe.datasets])
    opts = build["extra"]["options"]
    columns = ("`messages` (the prompt turns followed by one assistant turn), `score`" if kind == "sft" else
               "`prompt` (the prompt turns), `chosen` and `rejected` (one assistant turn each), "
               "`chosen_score`, `rejected_score`, `margin`")
    text = [
        f"# {recipe.name}: {TITLES[kind]}",
        "Built by fusechat with the FuseChat-3.0 recipe (arXiv 2503.04222): responses sampled from "
        "several source chat models, scored by a reward model, math answer checks and code tests, "
        "then selected by the recipe's rules.",
        f"Recipe `{recipe.name}`, hash `{build['recipe_hash']}`. Selection: band "
        f"{opts['band']['low']} <= margin <= {opts['band']['high']}, SFT fraction {opts['sft_fraction']}, "
        f"pair policy `{opts['pair_policy']}`, band before split {opts['band_before_split']}, drop "
        f"truncated {opts['drop_truncated']}, held-out fraction {opts['test_fraction']}, seed {opts['seed']}.",
        "## Columns",
        f"{columns}; plus `prompt_id`, `dataset` (the prompt's source data set), `domain`, `source_model`. "
        "Conversations use TRL's layout (lists of `{role, content}`).",
        "## Rows", markdown_table(counts),
        "## Rows per source model", markdown_table(by_source),
        "## Source models", markdown_table(sources),
        f"Reward model: `{recipe.scoring.reward_model.model}` (revision "
        f"`{recipe.scoring.reward_model.revision or 'unpinned'}`).",
        "## Prompt data sets", markdown_table(prompts),
        # how far the reward model that chose these rows can be trusted, where a checker knows
        rm_audit.markdown(audit) if audit is not None else
        "## Reward-model audit\n\nNot computed (built before the audit existed): run `fusechat build` again.",
        "## License",
        "Rows derive from the prompt data sets and source models above; their terms apply to each row "
        "(for example, alpaca_gpt4_zh is CC BY-NC 4.0 upstream).",
    ]
    text += [f"![{Path(p).stem}]({p})" for p in plots]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(text) + "\n"))


def write_hub_folders(recipe: Recipe) -> tuple[dict[str, Path], int]:
    """Write hub/{sft,dpo} (a set without rows gets no folder); returns the folders and rows written."""
    out = stage_dir(recipe, "datasets")
    build = load_manifest(out)
    if build.get("recipe_hash") != recipe.content_hash():
        raise RecipeError(f"{out / 'manifest.json'}: built with recipe hash {build.get('recipe_hash')}, "
                          f"but this recipe hashes to {recipe.content_hash()}; run `fusechat build` again")
    plots = sorted((out / "plots").glob("*.png"))
    folders: dict[str, Path] = {}
    rows = 0
    for kind in KINDS:
        folder = out / "hub" / kind
        splits = {}
        for split in SPLITS:
            src = out / kind / f"{split}.parquet"
            table = read(TABLES[kind], src)
            dest = folder / "data" / f"{split}-00000-of-00001.parquet"
            if table.num_rows:  # an empty split would be an empty config split on the hub
                atomic_write_bytes(dest, src.read_bytes())
                splits[split] = table
                rows += table.num_rows
            elif dest.exists():
                dest.unlink()
        if not splits:  # nothing to publish (e.g. a Chinese-only run has no pairs)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for p in plots:
            atomic_write_bytes(folder / "plots" / p.name, p.read_bytes())
        card = _card(recipe, kind, splits, build, [f"plots/{p.name}" for p in plots], rm_audit.load(out))
        atomic_write_bytes(folder / "README.md", card.encode())
        folders[kind] = folder
    return folders, rows


def run_publish(recipe: Recipe, dry_run: bool | None = None) -> Manifest:
    """datasets/{sft,dpo} -> datasets/hub/{sft,dpo} (+ upload). dry_run None: upload when possible."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    manifest = Manifest.start(recipe, "publish")
    blocker = _upload_blocker(recipe)
    if dry_run is False and blocker:
        raise RecipeError(f"publish: cannot upload: {blocker}")
    out = stage_dir(recipe, "datasets")
    manifest.rows_in = sum(load_manifest(out)["outputs"].get(f"{k}/{s}.parquet", 0) for k in KINDS for s in SPLITS)
    folders, manifest.rows_out = write_hub_folders(recipe)
    manifest.models = load_manifest(out)["models"]

    prefix = recipe.build.hub_repo_prefix
    targets = {k: f"{prefix}-{k}" if prefix else f"(set build.hub_repo_prefix)-{k}" for k in folders}
    reason = "dry run requested" if dry_run else blocker
    uploaded: dict[str, str] = {}
    if reason is None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        try:
            for kind, folder in folders.items():
                with console.status(f"publish: uploading {folder} to {targets[kind]}"):
                    api.create_repo(targets[kind], repo_type="dataset", private=recipe.build.hub_private,
                                    exist_ok=True)
                    info = api.upload_folder(
                        repo_id=targets[kind], repo_type="dataset", folder_path=folder,
                        commit_message=f"fusechat {recipe.name} (recipe {recipe.content_hash()[:12]})")
                uploaded[kind] = str(getattr(info, "commit_url", info))
        except HfHubHTTPError:
            raise  # the hub answered and refused (token, permissions): the user must act
        except Exception as e:  # no answer (connection refused, DNS, timeout): nothing more to do here
            reason = f"upload failed, hub unreachable: {type(e).__name__}: {e}"

    listing = Table(title="uploaded" if not reason else f"would upload ({reason})")
    for col in ("repository", "file", "bytes"):
        listing.add_column(col, justify="right" if col == "bytes" else "left")
    files = {}
    for kind, folder in folders.items():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            files[f"{kind}/{rel}"] = path.stat().st_size
            listing.add_row(targets[kind], rel, f"{path.stat().st_size:,}")
    console.print(listing)
    manifest.outputs = {f"hub/{k}": len(list((f / "data").glob("*.parquet"))) for k, f in folders.items()}
    manifest.extra = {"dry_run": reason is not None, "reason": reason, "targets": targets,
                      "uploaded": uploaded, "files": files}
    manifest.check_balance()
    manifest.save(out / "hub")
    return manifest
