"""`run_sample(recipe)`: responses from every source, resumable; `fusechat sample` and the
`sample-sources` flow both come here.

Sources run one after another, each in a worker process of its own (`fusechat.sampling.worker`),
so each model gets the accelerator's whole memory (with a Ray address, the same worker processes run
as Ray tasks wherever a source's GPUs are free, sources side by side: fusechat.cluster). A worker
that dies mid-shard (engine crash, out of memory, kill) is started again for the shards still missing, up to `retries` times; a model
that fails to load is not retried. Either way the other sources go on, every finished shard stays
on disk, the table and manifest are written from what exists, and the stage then raises
`SamplingError` naming what is missing, so a rerun computes only that. A shard file that cannot be
read (cut short by a full disk or a killed copy) is moved to `damaged/` beside it and sampled
again; the manifest lists it under `damaged_shards`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fusechat.errors import IncompleteError
from fusechat.recipe import Recipe, RecipeError, Source
from fusechat.run import Manifest, stage_dir, table_writer
from fusechat.sampling.shards import (
    RECEIVED, Shard, load_prompts, model_revision, plan_source, shard_path, shard_rows,
)
from fusechat.tables import RESPONSES
from fusechat.sampling.worker import LOAD_FAILED

LOAD_FAILED_REASON = "source_load_failed"
ENGINE_ERROR_REASON = "engine_error"


SamplingError = IncompleteError  # some shards could not be computed; names sources, paths, causes


@dataclass
class SourceOutcome:
    source: str
    revision: str
    status: str = "done"  # done | load_failed | failed
    message: str = ""
    computed: int = 0  # shards computed in this run (the rest were already on disk)
    prompts: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # engine time of the computed shards
    hosts: list[str] = field(default_factory=list)


def plan(recipe: Recipe) -> tuple[dict[str, str], dict[str, list[Shard]]]:
    """Revision and shards of every source, from the prompts table."""
    prompts = load_prompts(recipe)
    revisions, shards = {}, {}
    for i, source in enumerate(recipe.sources):
        try:
            revisions[source.name] = model_revision(recipe, source)
        except ValueError as e:
            raise RecipeError(f"sources[{i}] ({source.name}): {e}") from None
        shards[source.name] = plan_source(recipe, source, prompts, revisions[source.name])
    return revisions, shards


def _source(recipe: Recipe, name: str) -> tuple[int, Source]:
    for i, s in enumerate(recipe.sources):
        if s.name == name:
            return i, s
    raise RecipeError(f"no source named {name!r} in recipe {recipe.name!r}")


def _log_tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    text = [line for line in text if line.strip()]
    return "\n".join("    " + line for line in text[-lines:]) or "    (the log is empty)"


def sample_source(
    recipe: Recipe,
    name: str,
    shards: list[Shard],
    revision: str,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    retries: int = 2,
    launch: Callable[[Path, Path, Callable[[dict[str, Any]], None]], int] | None = None,
) -> SourceOutcome:
    """Compute the missing ones among `shards` of source `name` in worker processes, started
    here or, with `launch` (fusechat.cluster), as Ray tasks on the node Ray picks."""
    index, source = _source(recipe, name)
    out = SourceOutcome(name, revision)
    logs = stage_dir(recipe, "responses") / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    where = f"sources[{index}] {name!r} (model {recipe.resolve(source.model)}, engine {source.engine})"
    for attempt in range(retries + 1):
        todo = [s.shard_id for s in shards if not shard_path(recipe, s).exists()]
        if not todo:
            break
        job = logs / f".job-{name}-{os.getpid()}.json"
        data = recipe.model_dump(mode="json") | {"base_dir": recipe.base_dir}
        job.write_text(json.dumps({"recipe": data, "source": name, "shards": todo}))
        failure: dict[str, Any] = {}

        def handle(event: dict[str, Any]) -> None:
            if event["event"] == "shard":
                out.computed += 1
                out.prompts += event["prompts"]
                out.completion_tokens += event["completion_tokens"]
                out.seconds += event["seconds"]
            elif event["event"] in ("load_failed", "shard_failed"):
                failure.update(event)
            if on_event is not None:
                on_event({"source": name, **event})

        code = (launch or _run_worker)(job, log, handle)
        job.unlink(missing_ok=True)
        if code == 0:
            continue
        if code == LOAD_FAILED:
            out.status = LOAD_FAILED_REASON
            cause = failure.get("message") or "no message"
            out.message = f"{where} failed to load (worker exit code {code}): {cause}\n  log {log}:\n{_log_tail(log)}"
            return out
        cause = failure.get("message") or f"worker exited with code {code}"
        out.message = f"{where}: attempt {attempt + 1} stopped: {cause}\n  log {log}:\n{_log_tail(log)}"
        if on_event is not None:
            on_event({"source": name, "event": "retry", "message": cause})
    if any(not shard_path(recipe, s).exists() for s in shards):
        out.status = "failed"
    else:
        out.status, out.message = "done", ""
    return out


def _run_worker(job: Path, log: Path, handle: Callable[[dict[str, Any]], None]) -> int:
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, FUSECHAT_EVENTS_FD=str(write_fd), FUSECHAT_PARENT_PID=str(os.getpid()))
    with open(log, "ab") as logf:
        # Own session: the worker and the engine processes it spawns form one group, killed together.
        proc = subprocess.Popen(
            [sys.executable, "-m", "fusechat.sampling.worker", str(job)],
            env=env, stdout=logf, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as events:
            for line in events:
                handle(json.loads(line))
        return proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover engine processes, or all on interrupt
        except ProcessLookupError:
            pass
        proc.wait()


def merge(
    recipe: Recipe,
    revisions: dict[str, str],
    shards: dict[str, list[Shard]],
    outcomes: dict[str, SourceOutcome] | None = None,
    started_at: float | None = None,
) -> Manifest:
    """`responses/responses.parquet` and its manifest from the shard files that exist; the
    manifest's wall time counts from `started_at` (default: now), and rows of shards finished since
    then count as computed, the others as reused."""
    outcomes = outcomes or {}
    man = Manifest.start(recipe, "responses")
    if started_at is not None:
        man.started_at = started_at
    out_dir = stage_dir(recipe, "responses")
    with table_writer(out_dir / "responses.parquet", RESPONSES) as append:
        per_source, requests_in, requests_done, requests_dropped = _merge_shards(recipe, shards, outcomes, man, append)
    # A request that returned fewer samples than asked (a server that ignores n) must not vanish.
    short = man.rows_in - man.rows_out - sum(man.dropped.values())
    man.drop("fewer_samples_than_requested", short)
    man.outputs = {"responses.parquet": man.rows_out}
    man.models = dict(revisions)
    man.extra = {
        "requests": {"in": requests_in, "answered": requests_done, "dropped": requests_dropped},
        "truncated": sum(s["truncated"] for s in per_source.values()),
        "rows_computed": sum(s["rows_computed"] for s in per_source.values()),
        "rows_reused": sum(s["rows_reused"] for s in per_source.values()),
        "per_source": per_source,
        "failures": {n: o.message for n, o in outcomes.items() if o.status != "done"},
        # shard files that could not be read, set aside and sampled again
        "damaged_shards": sorted(str(p.relative_to(out_dir)) for name in shards
                                 for p in (out_dir / "shards" / name).glob("*/damaged/*")),
    }
    man.check_balance()
    man.save(out_dir)
    return man


def _in_table_order(recipe: Recipe, shards: list[Shard], position: dict[str, int]):
    """The rows of one source's shards of one domain (those that exist), in the order a run
    computed in one go writes them: prompt-table order, then sample index.

    A run computed in one go, or grown by shards of prompts that all come after the earlier ones,
    streams shard by shard. Shards whose prompts interleave (a data set added in the middle, a
    raised limit) are gathered and sorted together: memory of one source's domain, not the run."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def ordered(table: pa.Table) -> pa.Table:
        pos = pa.array([position[p] for p in table.column("prompt_id").to_pylist()], pa.int64())
        if len(pos) > 1 and not pc.all(pc.greater_equal(pos[1:], pos[:-1])).as_py():
            table = table.take(pc.sort_indices(pa.table({"p": pos, "s": table.column("sample_index")}),
                                               sort_keys=[("p", "ascending"), ("s", "ascending")]))
        return table

    spans = sorted(((min(position[p] for p in s.prompt_ids), max(position[p] for p in s.prompt_ids), s)
                    for s in shards if s.prompt_ids and shard_path(recipe, s).exists()),
                   key=lambda x: (x[0], x[2].shard_id))
    if all(a[1] < b[0] for a, b in zip(spans, spans[1:])):
        for _, _, shard in spans:
            table, dropped, meta = shard_rows(recipe, shard)
            yield shard, ordered(table), table.num_rows, dropped, meta
        return
    read = [(s, *shard_rows(recipe, s)) for _, _, s in spans]
    whole = ordered(pa.concat_tables([table for _, table, _, _ in read]))
    for i, (shard, table, dropped, meta) in enumerate(read):  # the books stay per shard
        yield shard, (whole if i == 0 else whole.slice(0, 0)), table.num_rows, dropped, meta


def _merge_shards(recipe: Recipe, shards: dict[str, list[Shard]], outcomes: dict[str, SourceOutcome],
                  man: Manifest, append: Callable) -> tuple[dict[str, dict[str, Any]], int, int, dict[str, int]]:
    """Append every existing shard's rows (one shard in memory at a time where prompts do not
    interleave) and count the books."""
    import pyarrow.compute as pc

    prompt_ids = load_prompts(recipe).column("prompt_id").to_pylist()
    position = {pid: i for i, pid in enumerate(prompt_ids)}
    per_source: dict[str, dict[str, Any]] = {}
    requests_in = requests_done = 0
    requests_dropped: dict[str, int] = {}
    for name, source_shards in shards.items():
        stats = per_source.setdefault(name, {"shards": len(source_shards), "shards_done": 0, "requests": 0,
                                             "responses": 0, "rows_computed": 0, "rows_reused": 0,
                                             "truncated": 0, "dropped": {}})
        status = outcomes.get(name).status if name in outcomes else "not_run"
        missing = LOAD_FAILED_REASON if status == LOAD_FAILED_REASON else (
            ENGINE_ERROR_REASON if status == "failed" else "not_run")
        books: list[tuple[Shard, dict[str, list[str]]]] = []
        for shard in source_shards:
            if not shard_path(recipe, shard).exists():
                books.append((shard, {missing: list(shard.prompt_ids)}))
        for domain in dict.fromkeys(s.domain for s in source_shards):
            group = [s for s in source_shards if s.domain == domain]
            for shard, table, rows, dropped, meta in _in_table_order(recipe, group, position):
                append(table.drop_columns([RECEIVED]))
                stats["shards_done"] += 1
                stats["responses"] += rows
                fresh = meta.get("finished_at", 0) >= man.started_at
                stats["rows_computed" if fresh else "rows_reused"] += rows
                stats["truncated"] += int(pc.sum(pc.fill_null(table.column("truncated"), False)).as_py() or 0)
                man.rows_out += rows
                books.append((shard, dropped))
        for shard, reasons in books:
            asked = len(shard.prompt_ids)
            man.rows_in += asked * shard.n
            requests_in += asked
            stats["requests"] += asked
            if shard_path(recipe, shard).exists():
                requests_done += asked - sum(len(p) for p in reasons.values())
            for reason, pids in reasons.items():
                man.drop(reason, len(pids) * shard.n)
                requests_dropped[reason] = requests_dropped.get(reason, 0) + len(pids)
                stats["dropped"][reason] = stats["dropped"].get(reason, 0) + len(pids) * shard.n
    return per_source, requests_in, requests_done, requests_dropped


def run_sample(recipe: Recipe, retries: int = 2, ray_address: str | None = None, tasks_per_source: int = 1) -> Manifest:
    """Prompts first (`fusechat prompts`: reused when unchanged), then every source's missing shards;
    with `ray_address`, on that Ray cluster, each source's shards spread over `tasks_per_source` tasks."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fusechat.prompts import build_prompts

    started_at = time.time()
    console = Console(stderr=True)
    launchers = None
    if ray_address:  # checked before anything starts: a source no node can hold fails here
        from fusechat.cluster import source_launchers

        launchers = source_launchers(recipe, ray_address, tasks_per_source)
    build_prompts(recipe)
    revisions, shards = plan(recipe)
    outcomes: dict[str, SourceOutcome] = {}
    progress = Progress(
        TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
    )
    with progress:
        tasks = {}
        for name, source_shards in shards.items():
            total = sum(len(s.prompt_ids) for s in source_shards)
            done = sum(len(s.prompt_ids) for s in source_shards if shard_path(recipe, s).exists())
            tasks[name] = progress.add_task(name, total=total, completed=done, rate="")

        seen: dict[str, list[float]] = {name: [0, 0, 0.0] for name in shards}  # prompts, tokens, s

        def on_event(ev: dict[str, Any]) -> None:
            task, stats = tasks[ev["source"]], seen[ev["source"]]
            if ev["event"] == "loaded":
                progress.update(task, rate=f"loaded in {ev['seconds']:.0f}s")
            elif ev["event"] == "retry":
                progress.update(task, rate=f"retrying: {ev['message'][:60]}")
            elif ev["event"] == "shard":
                stats[0] += ev["prompts"]
                stats[1] += ev["completion_tokens"]
                stats[2] += ev["seconds"]
                progress.update(task, advance=ev["prompts"], rate=f"{stats[0] / max(stats[2], 1e-9):.2f} prompts/s "
                                f"{stats[1] / max(stats[2], 1e-9):.0f} tok/s")

        if launchers is None:
            for name, source_shards in shards.items():
                outcomes[name] = sample_source(recipe, name, source_shards, revisions[name], on_event, retries)
        else:  # on a cluster the sources run side by side, each wherever Ray finds its GPUs
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(len(shards), 1)) as pool:
                running = {name: pool.submit(sample_source, recipe, name, source_shards, revisions[name],
                                             on_event, retries, launchers[name])
                           for name, source_shards in shards.items()}
            outcomes.update({name: f.result() for name, f in running.items()})
    manifest = merge(recipe, revisions, shards, outcomes, started_at)
    Console(stderr=True, width=max(console.width, 120)).print(summary_table(manifest, outcomes))
    failed = [o for o in outcomes.values() if o.status != "done"]
    if failed:
        raise SamplingError(
            "sampling incomplete; finished shards are kept and a rerun computes only the rest:\n"
            + "\n".join(f"- {o.message}" for o in failed)
        )
    return manifest


def summary_table(manifest: Manifest, outcomes: dict[str, SourceOutcome]):
    from rich.table import Table

    table = Table(title=f"fusechat sample: {manifest.recipe_name}",
                  caption=f"responses: {manifest.extra['rows_computed']} computed now, "
                          f"{manifest.extra['rows_reused']} reused from finished shards")
    for col in ("source", "status", "shards", "requests", "responses", "computed", "reused", "truncated",
                "dropped", "tok/s"):
        table.add_column(col, justify="left" if col in ("source", "status") else "right")
    for name, s in manifest.extra["per_source"].items():
        o = outcomes.get(name)
        rate = f"{o.completion_tokens / o.seconds:.0f}" if o and o.seconds else "-"
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "0"
        table.add_row(name, o.status if o else "-", f"{s['shards_done']}/{s['shards']}",
                      str(s["requests"]), str(s["responses"]), str(s["rows_computed"]), str(s["rows_reused"]),
                      str(s["truncated"]), dropped, rate)
    return table
