"""`fusechat run`: every stage of the recipe in order, each the same function its command calls."""

from __future__ import annotations

import time

from fusechat.recipe import Recipe
from fusechat.run import Manifest
from fusechat.stages import PIPELINE, STAGES

TRAINING = ("sft", "dpo", "eval")  # the stages that need a target


def stages_for(recipe: Recipe) -> tuple[str, ...]:
    """What `fusechat run` runs: every stage, or the data stages of a data recipe (no target)."""
    return PIPELINE if recipe.target is not None else tuple(s for s in PIPELINE if s not in TRAINING)


def run_all(recipe: Recipe, stages: tuple[str, ...] | None = None) -> dict[str, Manifest]:
    """Run the stages in order; a stage that fails stops the run (what it finished stays on disk)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if stages is None:
        stages = stages_for(recipe)
        if stages != PIPELINE:
            console.print(f"recipe {recipe.name!r} has no target: running the data stages ({', '.join(stages)})")
    done: dict[str, Manifest] = {}
    timings: dict[str, float] = {}
    for stage in stages:
        fn = STAGES[stage].load()
        console.rule(f"[bold]fusechat {stage}")
        t0 = time.time()
        done[stage] = fn(recipe)
        timings[stage] = time.time() - t0

    table = Table(title=f"fusechat run: {recipe.name}")
    for col in ("stage", "status", "rows in", "rows out", "dropped", "seconds"):
        table.add_column(col)
    for stage in stages:
        m = done[stage]
        table.add_row(stage, "done", str(m.rows_in), str(m.rows_out), str(sum(m.dropped.values())),
                      f"{timings[stage]:.1f}")
    console.print(table)
    return done
