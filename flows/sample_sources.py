"""Prefect flow `sample-sources`: the sampling stage as tasks per source and shard group.

The flow calls the same functions as `fusechat sample` (prompts, plan, sample_source, merge), so a
run started here and one started from the command line share shards: either resumes the other.

Task runners:
- deployment `local`: one task at a time, so two source models never share one accelerator.
- deployment `ray`: a Ray cluster (prefect-ray's RayTaskRunner). `FUSECHAT_RAY_ADDRESS=host:6379`
  names an existing cluster (`ray start --head` on one node, `ray start --address` on the others);
  without it a Ray instance on this machine starts. Each task asks Ray for its source's
  `tensor_parallel_size` GPUs and one CPU, so Ray runs it where they are free and the shards of a
  source spread over `tasks_per_source` GPU groups. The run directory must be on a file system
  all nodes share (docs/cluster.md).

Usage: `python -m flows.sample_sources run RECIPE [--ray-address HOST:PORT] [--tasks-per-source K]`
(a one-off run) or `python -m flows.serve` (serve the deployments for `prefect deployment run`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
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
    result["ray_worker"] = None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # which Ray worker ran it
        result["ray_worker"] = f"{sys.modules['ray'].get_runtime_context().get_node_id()[:8]}/{os.getpid()}"
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
    r = _recipe(recipe, run_dir)
    placed = lambda source: nullcontext()  # noqa: E731
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # under RayTaskRunner
        from prefect_ray.context import remote_options

        from fusechat.cluster import check_sources, gpus_of

        check_sources(r)
        gpus = {s.name: gpus_of(s) for s in r.sources}
        placed = lambda source: remote_options(num_gpus=gpus[source], num_cpus=1)  # noqa: E731
    todo = plan_shards(recipe, run_dir)
    futures = []
    for source, shard_ids in todo.items():
        for k in range(tasks_per_source):
            part = shard_ids[k::tasks_per_source]
            if part:
                with placed(source):  # each task asks Ray for its source's GPUs
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


def ray_runner():
    """RayTaskRunner on `FUSECHAT_RAY_ADDRESS` (checked to answer now: `ray.init` would retry for a
    minute), or on a Ray instance of this machine."""
    from prefect_ray import RayTaskRunner

    from fusechat.cluster import check_answers

    address = os.environ.get("FUSECHAT_RAY_ADDRESS")
    if address:
        check_answers(address)
    return RayTaskRunner(address=address, init_kwargs={"log_to_driver": False})


def deployments() -> list:
    return [
        sample_sources.to_deployment(name="local"),
        sample_sources.with_options(task_runner=ray_runner()).to_deployment(name="ray"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sample_sources")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir")
    parser.add_argument("--tasks-per-source", type=int, default=1)
    parser.add_argument("--ray-address", help="run on this Ray cluster (head host:port)")
    args = parser.parse_args()
    fl = sample_sources
    if args.ray_address:
        from fusechat.errors import FusechatError

        os.environ["FUSECHAT_RAY_ADDRESS"] = args.ray_address
        try:
            fl = sample_sources.with_options(task_runner=ray_runner())
        except FusechatError as e:
            raise SystemExit(f"error: {e}") from None
    print(json.dumps(fl(args.recipe, args.run_dir, args.tasks_per_source), default=str))


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    main()
