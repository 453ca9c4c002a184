"""`fusechat run`: every stage of the recipe in order, each the same function its command calls."""

from __future__ import annotations

import time

from fusechat.recipe import Recipe
from fusechat.run import Manifest

ORDER = ("sample", "score", "build", "publish", "sft", "dpo", "eval")


def run_all(recipe: Recipe, stages: tuple[str, ...] = ORDER) -> dict[str, Manifest]:
    """Run the stages in order; stop (without pretending) at the first one not built yet."""
    from rich.console import Console
    from rich.table import Table

    from fusechat.cli import stage_function

    console = Console(stderr=True)
    done: dict[str, Manifest] = {}
    timings: dict[str, float] = {}
    missing: list[str] = []
    for stage in stages:
        fn = stage_function(stage)
        if fn is None:
            missing = list(stages[stages.index(stage):])
            break
        console.rule(f"[bold]fusechat {stage}")
        t0 = time.time()
        done[stage] = fn(recipe)
        timings[stage] = time.time() - t0

    table = Table(title=f"fusechat run: {recipe.name}")
    for col in ("stage", "status", "rows in", "rows out", "dropped", "seconds"):
        table.add_column(col)
    for stage in stages:
        m = done.get(stage)
        if m is not None:
            table.add_row(stage, "done", str(m.rows_in), str(m.rows_out),
                          str(sum(m.dropped.values())), f"{timings[stage]:.1f}")
        else:
            table.add_row(stage, "not built yet", "-", "-", "-", "-")
    console.print(table)
    if missing:
        console.print(f"stopped before: {', '.join(missing)} (not built in this version of fusechat)")
    return done
