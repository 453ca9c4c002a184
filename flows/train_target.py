"""Prefect flow `train-target`: SFT, then DPO from the SFT model, by the recipe.

The tasks call the same stage functions as `fusechat sft` and `fusechat dpo`. Both resume from
their last checkpoint, so a retried task continues rather than starting over.

    python flows/train_target.py recipes/demo.yaml [--run-dir DIR]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from prefect import flow, task

from fusechat.recipe import load_recipe
from fusechat.stages import STAGES


@task(name="sft", retries=1)
def sft(recipe: str, run_dir: str | None = None) -> dict:
    return asdict(STAGES["sft"].load()(load_recipe(recipe, run_dir=run_dir)))


@task(name="dpo", retries=1)
def dpo(recipe: str, run_dir: str | None = None) -> dict:
    return asdict(STAGES["dpo"].load()(load_recipe(recipe, run_dir=run_dir)))


@flow(name="train-target")
def train_target(recipe: str, run_dir: str | None = None) -> dict:
    trained = sft(recipe, run_dir)
    return {"sft": trained, "dpo": dpo(recipe, run_dir, wait_for=[trained])}


def deployments() -> list:
    """For `python -m flows.serve`: a deployment named `local`."""
    return [train_target.to_deployment(name="local")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    train_target(args.recipe, args.run_dir)
