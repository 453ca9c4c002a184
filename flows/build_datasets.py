"""Prefect flow `build-datasets`: scores -> SFT and DPO data sets -> hub-layout folders (+ upload).

The tasks call the same stage functions as `fusechat build` and `fusechat publish`; they take the
recipe path, not a recipe object, so Prefect's cache keys and run parameters stay plain strings.

    python flows/build_datasets.py recipes/demo.yaml [--run-dir DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from prefect import flow, task

from fusechat.recipe import load_recipe
from fusechat.stages import STAGES


@task(name="build")
def build(recipe: str, run_dir: str | None = None) -> dict:
    return asdict(STAGES["build"].load()(load_recipe(recipe, run_dir=run_dir)))


@task(name="publish")
def publish(recipe: str, run_dir: str | None = None, dry_run: bool | None = None) -> dict:
    return asdict(STAGES["publish"].load()(load_recipe(recipe, run_dir=run_dir), dry_run=dry_run))


@flow(name="build-datasets")
def build_datasets(recipe: str, run_dir: str | None = None, dry_run: bool | None = None) -> dict:
    """dry_run None: upload when the recipe names a repository and a token and network are there."""
    built = build(recipe, run_dir)
    return {"build": built, "publish": publish(recipe, run_dir, dry_run, wait_for=[built])}


def deployments() -> list:
    """For `python -m flows.serve`: a deployment named `local`."""
    return [build_datasets.to_deployment(name="local")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    parser.add_argument("--dry-run", action="store_true", default=None)
    args = parser.parse_args()
    build_datasets(args.recipe, args.run_dir, args.dry_run)
