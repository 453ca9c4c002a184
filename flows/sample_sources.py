"""Prefect flow `sample-sources`: the sampling stage as tasks per source and shard group.

The flow calls the same functions as `fusechat sample` (prompts, plan, sample_source, merge), so a
run started here and one started from the command line share shards: either resumes the other.

Task runners:
- deployment `local`: one task at a time, so two source models never share one accelerator.
- deployment `dask`: a Dask cluster (DaskTaskRunner). `FUSECHAT_DASK_ADDRESS=tcp://host:8786`
  names an existing cluster (`dask-scheduler` on one node, `dask-worker --nthreads 1` on each GPU
  node); without it a LocalCluster of `FUSECHAT_DASK_WORKERS` (default 2) processes starts. Each
  Dask worker runs one task at a time, each task one model, so the shards of a source spread over
  `tasks_per_source` machines. The run directory must be on a file system all nodes share.

Usage: `python -m flows.sample_sources run RECIPE [--dask-workers N] [--tasks-per-source K]`
(a one-off run) or `python -m flows.serve` (serve the deployments for `prefect deployment run`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner


def _recipe(recipe: str, run_dir: str | None):
    from fusechat.recipe import load_recipe

    return load_recipe(recipe, run_dir=run_dir)


@task(task_run_name="prompts and plan")
def plan_shards(recipe: str, run_dir: str | None) -> dict[str, list[str]]:
    """Missing shard ids per source (the prompt stage runs first, as in `fusechat sample`)."""
    from fusechat.sampling.shards import shard_path
    from fusechat.sampling.stage import plan
    from fusechat.stages import STAGES

    r = _recipe(recipe, run_dir)
    STAGES["prompts"].load()(r)
    _, shards = plan(r)
    return {name: [s.shard_id for s in ss if not shard_path(r, s).exists()] for name, ss in shards.items()}


@task(retries=2, retry_delay_seconds=5, task_run_name="sample {source} ({part})")
def sample_shards(recipe: str, run_dir: str | None, source: str, shard_ids: list[str], part: str) -> dict[str, Any]:
    """One worker process for `source` computing `shard_ids`; a failure raises, so Prefect retries
    the task, which computes only the shards still missing."""
    from fusechat.sampling.stage import SamplingError, plan, sample_source

    logger = get_run_logger()
    r = _recipe(recipe, run_dir)
    revisions, shards = plan(r)
    wanted = set(shard_ids)
    chosen = [s for s in shards[source] if s.shard_id in wanted]

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "shard":
            logger.info("%s: shard %s, %d prompts, %d responses, %.0f tok/s", source, ev["shard"],
                        ev["prompts"], ev["responses"], ev["completion_tokens"] / max(ev["seconds"], 1e-9))
        elif ev["event"] in ("loaded", "retry", "load_failed", "shard_failed"):
            logger.info("%s: %s %s", source, ev["event"], ev.get("message", ""))

    out = sample_source(r, source, chosen, revisions[source], on_event)
    if out.status != "done":
        raise SamplingError(out.message)
    result = asdict(out)
    try:  # which Dask worker ran it (absent under the local runner)
        from distributed import get_worker

        result["dask_worker"] = get_worker().address
    except (ImportError, ValueError):
        result["dask_worker"] = None
    return result


@task(task_run_name="merge responses")
def merge_responses(recipe: str, run_dir: str | None, started_at: float) -> dict[str, Any]:
    from fusechat.sampling.stage import merge, plan

    r = _recipe(recipe, run_dir)
    revisions, shards = plan(r)
    man = merge(r, revisions, shards, started_at=started_at)
    return {"rows_in": man.rows_in, "rows_out": man.rows_out, "dropped": man.dropped,
            "models": man.models, "per_source": man.extra["per_source"]}


@flow(name="sample-sources", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def sample_sources(recipe: str, run_dir: str | None = None, tasks_per_source: int = 1) -> dict[str, Any]:
    """Sample every source of `recipe` (a recipe file path) into `<run_dir>/responses/`."""
    started_at = time.time()
    todo = plan_shards(recipe, run_dir)
    futures = []
    for source, shard_ids in todo.items():
        for k in range(tasks_per_source):
            part = shard_ids[k::tasks_per_source]
            if part:
                futures.append(sample_shards.submit(recipe, run_dir, source, part, f"{k + 1}/{tasks_per_source}"))
    states = [f.wait() or f.state for f in futures]
    results = [f.result(raise_on_failure=False) for f in futures]
    summary = merge_responses(recipe, run_dir, started_at)  # written even when a source failed: nothing is lost
    failed = [s for s in states if not s.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} sampling task(s) failed; finished shards are kept: "
                           + "; ".join(str(r) for r in results if isinstance(r, BaseException)))
    summary["tasks"] = results
    return summary


def dask_runner():
    from prefect_dask import DaskTaskRunner

    address = os.environ.get("FUSECHAT_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    workers = int(os.environ.get("FUSECHAT_DASK_WORKERS", "2"))
    # one thread per worker process: one model per worker at a time
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def deployments() -> list:
    return [
        sample_sources.to_deployment(name="local"),
        sample_sources.with_options(task_runner=dask_runner()).to_deployment(name="dask"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sample_sources")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    parser.add_argument("--tasks-per-source", type=int, default=1)
    parser.add_argument("--dask-workers", type=int, help="run on a local Dask cluster of N processes")
    parser.add_argument("--dask-address", help="run on an existing Dask cluster")
    args = parser.parse_args()
    fl = sample_sources
    if args.dask_address or args.dask_workers:
        if args.dask_address:
            os.environ["FUSECHAT_DASK_ADDRESS"] = args.dask_address
        else:
            os.environ["FUSECHAT_DASK_WORKERS"] = str(args.dask_workers)
        fl = sample_sources.with_options(task_runner=dask_runner())
    print(json.dumps(fl(args.recipe, args.run_dir, args.tasks_per_source), default=str))


if __name__ == "__main__":  # Dask and vLLM spawn processes that re-import the main module
    main()
