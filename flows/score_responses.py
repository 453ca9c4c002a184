"""Prefect flow `score-responses`: responses -> scores, the same stage function as `fusechat score`.

The stage writes each finished shard atomically, so a retried task (or a later `fusechat score`)
computes only the shards still missing. The task takes the recipe path, not a recipe object, so
run parameters and cache keys stay plain strings. With several GPUs the stage itself starts one
process per GPU; with `ray_address` it scores rewards as Ray tasks of one GPU each on that cluster
(deployment `ray`: the address from `FUSECHAT_RAY_ADDRESS`, default `auto`, docs/cluster.md).

    python flows/score_responses.py RECIPE [--run-dir DIR] [--ray-address HOST:PORT]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from prefect import flow, task


@task(name="score", retries=2, retry_delay_seconds=5)
def score(recipe: str, run_dir: str | None = None, ray_address: str | None = None) -> dict:
    from fusechat.recipe import load_recipe
    from fusechat.stages import STAGES

    return asdict(STAGES["score"].load()(load_recipe(recipe, run_dir=run_dir), ray_address=ray_address))


@flow(name="score-responses")
def score_responses(recipe: str, run_dir: str | None = None, ray_address: str | None = None) -> dict:
    """Score every response: reward model, math answers, code tests; returns the stage manifest.
    With `ray_address`, rewards are scored on that Ray cluster, a GPU per scorer."""
    return score(recipe, run_dir, ray_address)


def deployments() -> list:
    """For `python -m flows.serve`: deployments `local` and `ray`."""
    return [score_responses.to_deployment(name="local"),
            score_responses.to_deployment(
                name="ray", parameters={"ray_address": os.environ.get("FUSECHAT_RAY_ADDRESS", "auto")})]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    parser.add_argument("--ray-address", help="score rewards on this Ray cluster (head host:port)")
    args = parser.parse_args()
    score_responses(args.recipe, args.run_dir, args.ray_address)
