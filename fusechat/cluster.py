"""Ray as the distributed engine: join a cluster, check that every source fits on one of its
nodes, and run the stages' worker processes as Ray tasks.

A Ray task here does what the local path does in the driver: it starts the very same worker
process (`python -m fusechat.sampling.worker JOB.json`) on the node Ray chose and reports its
exit code and events back. So shards, resume and manifests are the local ones; the run directory
must be on a file system every node shares. Ray places a task by the resources it asks for: a
source asks for `tensor_parallel_size` GPUs (all on one node: vLLM's own executor runs the
tensor-parallel group inside that node) and `cpus` CPUs. A task whose Ray worker process dies
(node lost, killed) is started again by Ray (`max_retries`) and computes only the shards still
missing, because the worker skips every shard already on disk.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from fusechat.errors import FusechatError

CONNECT_TIMEOUT_S = 5.0
TASK_RETRIES = 2  # Ray restarts a task whose worker process died this many times


class ClusterError(FusechatError):
    """A Ray cluster that cannot be reached or cannot hold what the recipe asks for."""


def check_answers(address: str) -> None:
    """Fail in seconds on an address nothing listens at: `ray.init` itself retries for a minute."""
    if address == "auto" or address.startswith("ray://"):
        return  # "auto" reads the local node's file; Ray Client checks its own connection
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"Ray cluster at {address!r} does not answer ({e}); start its head with "
                           "`ray start --head --port PORT` or pass the address it printed") from None


_lock = threading.Lock()


def connect(address: str) -> dict[str, Any]:
    """Join the Ray cluster at `address` (host:port of the head, or "auto"); returns its resources."""
    import ray

    with _lock:
        if not ray.is_initialized():
            check_answers(address)
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                raise ClusterError(f"Ray cluster at {address!r}: {e}") from None
    return ray.cluster_resources()


def gpus_of(source) -> int:
    """GPUs one engine of `source` takes: its tensor-parallel group (times pipeline stages)."""
    opts = source.engine_options
    return int(opts.get("tensor_parallel_size", 1)) * int(opts.get("pipeline_parallel_size", 1))


def _check_fits(asks: dict[str, tuple[int, float]]) -> None:
    """Raise before anything starts when a task asks for more than any live node of the joined
    cluster has: Ray would otherwise keep it pending forever. `asks`: what -> (GPUs, CPUs)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for what, (gpus, cpus) in asks.items():
        if any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= cpus for n in nodes):
            continue
        have = ", ".join(f"{int(n.get('GPU', 0))} GPUs/{int(n.get('CPU', 0))} CPUs" for n in nodes) or "no live node"
        raise ClusterError(f"{what} asks for {gpus} GPUs and {cpus:g} CPUs on one node, more than any node of "
                           f"the Ray cluster at {ray.get_runtime_context().gcs_address} has ({have})")


def check_sources(recipe, cpus: float = 1) -> None:
    """Every source's task fits on some node (see `_check_fits`)."""
    _check_fits({f"sources[{i}] {s.name!r} (tensor_parallel_size {gpus_of(s)})": (gpus_of(s), cpus)
                 for i, s in enumerate(recipe.sources)})


def _worker_task(job: str, log: str) -> tuple[int, list[dict[str, Any]]]:
    from fusechat.sampling.stage import _run_worker

    events: list[dict[str, Any]] = []
    return _run_worker(Path(job), Path(log), events.append), events


def worker_dispatcher(gpus: int, cpus: float, parts: int = 1) -> Callable[[Path, Path, Callable], int]:
    """A drop-in for the local worker launcher (`run(job, log, handle) -> exit code`) that splits
    the job's shards round-robin over `parts` Ray tasks of `gpus` GPUs and `cpus` CPUs each."""
    import ray

    from fusechat.sampling.worker import LOAD_FAILED

    remote = ray.remote(_worker_task).options(num_gpus=gpus, num_cpus=cpus, max_retries=TASK_RETRIES)

    def run(job: Path, log: Path, handle: Callable[[dict[str, Any]], None]) -> int:
        data = json.loads(job.read_text())
        shards = data["shards"]
        k = max(1, min(parts, len(shards)))
        jobs = []
        for i in range(k):
            jobs.append(job.with_name(f"{job.stem}-{i}.json"))
            jobs[-1].write_text(json.dumps(data | {"shards": shards[i::k]}))
        pending = {remote.remote(str(p), str(log)): p for p in jobs}
        codes = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                pending.pop(ready[0])
                try:
                    code, events = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # retries spent, or the task could not run
                    code, events = 1, [{"event": "shard_failed", "message": f"Ray task: {type(e).__name__}: {e}"}]
                for ev in events:
                    handle(ev)
                codes.append(code)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            for p in jobs:
                p.unlink(missing_ok=True)
        return LOAD_FAILED if LOAD_FAILED in codes else max(codes)

    return run


def source_launchers(recipe, address: str, parts: int = 1, cpus: float = 1) -> dict[str, Callable]:
    """Join the cluster and check every source fits on a node, before any prompt or model is
    touched; returns each source's Ray launcher for `sample_source`."""
    connect(address)
    check_sources(recipe, cpus)
    return {s.name: worker_dispatcher(gpus_of(s), cpus, parts) for s in recipe.sources}


def check_reward_scorer(address: str) -> None:
    """Join the cluster and check a reward scorer (one GPU, one CPU) fits on a node."""
    connect(address)
    _check_fits({"scoring.reward_model (one scorer per task)": (1, 1)})


def _reward_task(recipe_json: str, model_path: str, todo: list[tuple[list[dict], str]]) -> None:
    from fusechat.scoring.stage import _reward_worker

    todo = [(rows, p) for rows, p in todo if not Path(p).exists()]  # a retried task skips finished shards
    if todo:
        _reward_worker(0, recipe_json, model_path, todo, [None])  # the GPU Ray granted is the visible one


def score_rewards(recipe, model_path: str, todo: list[tuple[list[dict], Path]]) -> None:
    """Missing reward shards as Ray tasks of one GPU each, as many as the cluster has GPUs (at
    least one), shards round-robin; each task writes its shards as the local path does."""
    import ray

    from fusechat.errors import IncompleteError

    k = max(1, min(int(ray.cluster_resources().get("GPU", 0)), len(todo)))
    remote = ray.remote(_reward_task).options(num_gpus=1, num_cpus=1, max_retries=TASK_RETRIES)
    data = recipe.model_dump_json()
    refs = [remote.remote(data, model_path, [(rows, str(p)) for rows, p in todo[i::k]]) for i in range(k)]
    try:
        ray.get(refs)
    except ray.exceptions.RayError as e:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise IncompleteError(f"reward scoring on Ray stopped: {type(e).__name__}: {e}\n"
                              "finished shards are kept and a rerun computes only the rest") from None
