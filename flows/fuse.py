"""Prefect flow `fuse`: the whole recipe, each stage a task calling the function its command calls.

Reads like the recipe: prompts, sample, score, build, publish, SFT, DPO, evaluate (the stages of
`fusechat.stages.PIPELINE`). Every stage resumes from
what it already finished, so retrying the flow continues a run instead of redoing it.

    python flows/fuse.py recipes/demo.yaml [--run-dir DIR]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from prefect import flow, task

from fusechat.recipe import load_recipe
from fusechat.stages import STAGES


@task(task_run_name="{stage}")
def stage_task(stage: str, recipe: str, run_dir: str | None = None) -> dict:
    return asdict(STAGES[stage].load()(load_recipe(recipe, run_dir=run_dir)))


@flow(name="fuse")
def fuse(recipe: str, run_dir: str | None = None, stages: list[str] | None = None) -> dict:
    """`stages` defaults to every stage in order (a data recipe: its data stages); name a subset to
    run only those."""
    from fusechat.pipeline import stages_for

    stages = stages or list(stages_for(load_recipe(recipe, run_dir=run_dir)))
    return {stage: stage_task(stage, recipe, run_dir) for stage in stages}


def deployments() -> list:
    """For `python -m flows.serve`: a deployment named `local`."""
    return [fuse.to_deployment(name="local")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    fuse(args.recipe, args.run_dir)
