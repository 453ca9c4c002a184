"""Prefect flow `score-responses`: responses -> scores, the same stage function as `fusechat score`.

The stage writes each finished shard atomically, so a retried task (or a later `fusechat score`)
computes only the shards still missing. The task takes the recipe path, not a recipe object, so
run parameters and cache keys stay plain strings. With several GPUs the stage itself starts one
process per GPU.

    python flows/score_responses.py RECIPE [--run-dir DIR]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from prefect import flow, task


@task(name="score", retries=2, retry_delay_seconds=5)
def score(recipe: str, run_dir: str | None = None) -> dict:
    from fusechat.recipe import load_recipe
    from fusechat.stages import STAGES

    return asdict(STAGES["score"].load()(load_recipe(recipe, run_dir=run_dir)))


@flow(name="score-responses")
def score_responses(recipe: str, run_dir: str | None = None) -> dict:
    """Score every response: reward model, math answers, code tests; returns the stage manifest."""
    return score(recipe, run_dir)


def deployments() -> list:
    """For `python -m flows.serve`: a deployment named `local`."""
    return [score_responses.to_deployment(name="local")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    score_responses(args.recipe, args.run_dir)
