"""`fusechat prune RECIPE`: remove the finished work the recipe no longer uses, and say how much.

Sampling and scoring keep every finished shard, whatever settings or inputs made it: that is what
makes one more source, a grown prompt set or going back to an earlier setting cost only the new
work. Prune is the one place that deletes them, on request:

- sampling: every shard file under `responses/shards/` that the current plan takes no prompt from
  (other settings, other sources, prompts no longer in the prompt table);
- scoring: every file under `scores/shards/` of other reward-model or check settings, and every
  file of the current settings that holds none of today's responses.

Shards set aside as damaged (`damaged/` folders) are left for inspection, and the eval stage's
own work (`eval/work/`) is left alone: it is small, and a model evaluated earlier may come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fusechat.recipe import Recipe
from fusechat.run import stage_dir


@dataclass
class Unused:
    stage: str
    files: list[Path] = field(default_factory=list)
    note: str = ""  # why nothing could be judged, when so
    bytes: int = 0


def _work_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.parquet") if "damaged" not in p.relative_to(folder).parts}


def unused_sampling(recipe: Recipe) -> Unused:
    from fusechat.sampling.shards import shard_path
    from fusechat.sampling.stage import plan

    out = Unused("sample")
    folder = stage_dir(recipe, "responses") / "shards"
    if not (stage_dir(recipe, "prompts") / "prompts.parquet").exists():
        out.note = "no prompt table yet (run fusechat sample): sampling shards not judged"
        return out
    _, shards = plan(recipe)
    used = {shard_path(recipe, s) for source in shards.values() for s in source if s.prompt_ids}
    out.files = sorted(_work_files(folder) - used)
    return out


def unused_scoring(recipe: Recipe) -> Unused:
    import pyarrow.compute as pc

    from fusechat.run import Manifest
    from fusechat.scoring.reward import resolve_model
    from fusechat.scoring.stage import load_inputs, row_keys, settings_dirs
    from fusechat.tables import CHECK_SHARD, REWARD_SHARD, read, readable

    out = Unused("score")
    folder = stage_dir(recipe, "scores") / "shards"
    if not (stage_dir(recipe, "responses") / "responses.parquet").exists():
        out.note = "no responses table yet (run fusechat sample): score shards not judged"
        return out
    inputs = load_inputs(recipe, Manifest.start(recipe, "scores"))
    _, revision = resolve_model(recipe)
    reward_dir, check_dir = settings_dirs(recipe, revision, folder)
    reward_keys, check_keys, _, _ = row_keys(inputs)
    unused = []
    for path in sorted(_work_files(folder)):
        current = {reward_dir: (REWARD_SHARD, reward_keys), check_dir: (CHECK_SHARD, check_keys)}.get(path.parent)
        if current is None:
            unused.append(path)  # other settings
        elif readable(path):
            spec, keys = current
            held = read(spec, path, ("key",), only=True).column("key")
            if not pc.any(pc.is_in(held, value_set=keys)).as_py():
                unused.append(path)  # none of today's responses
    out.files = unused
    return out


def prune(recipe: Recipe, dry_run: bool = False) -> list[Unused]:
    """Delete (or with `dry_run`, only list) the unused work files; prints a table of them."""
    from rich.console import Console
    from rich.table import Table

    found = [unused_sampling(recipe), unused_scoring(recipe)]
    for u in found:
        u.bytes = sum(p.stat().st_size for p in u.files)
    table = Table(title=f"fusechat prune: {recipe.name}" + (" (dry run: nothing deleted)" if dry_run else ""))
    for col in ("stage", "unused files", "MB", "note"):
        table.add_column(col, justify="right" if col in ("unused files", "MB") else "left")
    for u in found:
        table.add_row(u.stage, str(len(u.files)), f"{u.bytes / 1e6:.1f}", u.note)
    if not dry_run:
        for u in found:
            for path in u.files:
                path.unlink()
            root = stage_dir(recipe, "responses" if u.stage == "sample" else "scores") / "shards"
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                if not any(folder.iterdir()):
                    folder.rmdir()
    Console(stderr=True).print(table)
    return found
