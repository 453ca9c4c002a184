"""The sampling work plan: shards keyed by content, and their files.

A response is known by what decides it: its prompt, the source (name, model, revision, engine), the
sampling settings, n, the recipe seed and the template date. Every finished shard of one source and
one such setting lives in `responses/shards/<source>/<settings key>/<shard id>.parquet` and names
its prompts (and n) in its metadata. The planner takes every prompt some finished shard already
answers from that shard, wherever it was computed, and cuts only the prompts no shard answers into
new shards of up to `Source.shard_size`. A new data set, a raised `limit` or one more source
therefore samples only what is new; shards of other settings stay on disk until `fusechat prune`.

A shard is written atomically, so it is either complete or absent and a rerun computes exactly the
absent ones. Planning again after some planned shards finished gives the same remaining shards (they
were consecutive slices of the missing prompts), so a worker or a Prefect task that plans again
finds the shard ids it was given. What a shard skipped (empty or over-long prompts) travels in the
same file's metadata, so the books balance across any number of reruns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.recipe import Recipe, Source, is_local_path
from fusechat.run import folder_fingerprint, model_identity, set_aside, stable_hash, stage_dir
from fusechat.tables import DOMAINS, PROMPTS, RESPONSE_SHARD, RESPONSES, read, readable

if TYPE_CHECKING:
    import pyarrow as pa

META_KEY = b"fusechat"
# Shard files carry the prompt ids each engine received (for the one-BOS audit); the merged table
# drops them.
RECEIVED = "received_ids"
COLUMNS = tuple(RESPONSES.names)


@dataclass(frozen=True)
class Shard:
    shard_id: str
    source: str
    domain: str
    n: int
    seed: int
    prompt_ids: tuple[str, ...]  # the prompts this run takes from the shard, in prompt-table order
    key: str  # the source's settings key: the shard's folder


def model_revision(recipe: Recipe, source: Source) -> str:
    """What exactly the source model is: the pinned revision, or a fingerprint of a local folder's
    contents (`fusechat.run.folder_fingerprint`)."""
    if source.revision:
        return source.revision
    path = Path(recipe.resolve(source.model))
    if path.is_dir():
        return folder_fingerprint(path)
    if source.engine == "openai":
        return f"served:{source.model}"
    if not is_local_path(source.model):
        from huggingface_hub import snapshot_download

        try:  # the commit of the cached snapshot; hub ids without one must be pinned
            return Path(snapshot_download(source.model, local_files_only=True)).name
        except Exception:
            raise ValueError(
                f"source {source.name!r}: model {source.model} is neither cached nor pinned; "
                f"set its `revision:` so shards and responses record which weights made them"
            ) from None
    raise ValueError(f"source {source.name!r}: model folder {path} does not exist")


def settings(source: Source, revision: str) -> dict[str, Any]:
    return {
        "source": source.name, "model": model_identity(source.model, revision),
        "engine": source.engine, "sampling": source.sampling.model_dump(mode="json"),
    }


def settings_key(recipe: Recipe, setting: dict[str, Any]) -> str:
    """The folder of a source's shards: everything but the prompts and n that decides a response."""
    return stable_hash(setting, recipe.seed, recipe.template_date)


def source_dir(recipe: Recipe, source: str) -> Path:
    return stage_dir(recipe, "responses") / "shards" / source


def finished(folder: Path) -> dict[tuple[str, int], str]:
    """(prompt id, n) -> shard id, for every prompt a readable shard file in `folder` answers.

    A file that cannot be read (cut short by a full disk or a killed copy) is moved to `damaged/`
    beside it, so its prompts count as missing. Reads file footers only."""
    import pyarrow.parquet as pq

    have: dict[tuple[str, int], str] = {}
    for path in sorted(folder.glob("*.parquet")):
        if not readable(path):
            set_aside(path)
            continue
        meta = json.loads((pq.read_schema(path).metadata or {}).get(META_KEY, b"{}"))
        for pid in meta.get("prompt_ids", ()):
            have.setdefault((pid, meta["n"]), path.stem)
    return have


def response_id(prompt_id: str, source: str, sample_index: int, setting: dict[str, Any], seed: int) -> str:
    return stable_hash(prompt_id, source, sample_index, setting, seed)


def load_prompts(recipe: Recipe) -> pa.Table:
    return read(PROMPTS, stage_dir(recipe, "prompts") / "prompts.parquet", ("prompt_id", "domain"))


def plan_source(recipe: Recipe, source: Source, prompts: pa.Table, revision: str) -> list[Shard]:
    """Every shard the source's responses come from: finished shards that answer some of today's
    prompts (with those prompts), then new shards cut from the prompts none answers."""
    setting = settings(source, revision)
    key = settings_key(recipe, setting)
    have = finished(source_dir(recipe, source.name) / key)
    ids = prompts.column("prompt_id").to_pylist()
    domains = prompts.column("domain").to_pylist()
    shards = []
    for domain in DOMAINS:
        n = source.responses.get(domain, 0)
        if n <= 0:
            continue  # e.g. the chinese domain goes only to the sources that name it
        reused: dict[str, list[str]] = {}
        missing = []
        for pid in (pid for pid, d in zip(ids, domains) if d == domain):
            sid = have.get((pid, n))
            if sid is None:
                missing.append(pid)
            else:
                reused.setdefault(sid, []).append(pid)
        shards += [Shard(sid, source.name, domain, n, 0, tuple(pids), key) for sid, pids in reused.items()]
        for start in range(0, len(missing), source.shard_size):
            chunk = tuple(missing[start:start + source.shard_size])
            sid = stable_hash(chunk, setting, domain, n, recipe.seed)
            shards.append(Shard(sid, source.name, domain, n, int(sid[:8], 16), chunk, key))
    return shards


def shard_path(recipe: Recipe, shard: Shard) -> Path:
    return source_dir(recipe, shard.source) / shard.key / f"{shard.shard_id}.parquet"


def write_shard(recipe: Recipe, shard: Shard, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    from fusechat.run import write_table

    table = RESPONSE_SHARD.from_rows(rows, {META_KEY: json.dumps(meta).encode()})
    path = shard_path(recipe, shard)
    write_table(table, path, RESPONSE_SHARD)
    return path


def read_shard(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    table = read(RESPONSE_SHARD, path)
    return table, json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))


def shard_rows(recipe: Recipe, shard: Shard) -> tuple[pa.Table, dict[str, list[str]], dict[str, Any]]:
    """A finished shard's rows and skipped prompts, restricted to the prompts this run takes from it
    (a shard computed for an earlier, larger prompt set may answer prompts no longer asked)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, meta = read_shard(shard_path(recipe, shard))
    asked = set(shard.prompt_ids)
    if len(asked) < len(meta.get("prompt_ids", asked)):
        table = table.filter(pc.is_in(table.column("prompt_id"), value_set=pa.array(shard.prompt_ids)))
    dropped = {reason: kept for reason, pids in meta.get("dropped", {}).items()
               if (kept := [p for p in pids if p in asked])}
    return table, dropped, meta
