"""The sampling work plan: content-addressed shards and their files.

A shard is up to `Source.shard_size` prompts of one domain for one source. Its id hashes everything
that decides its output: the prompt ids, the source (name, model, revision, engine), the sampling
settings, n, and the recipe seed. A finished shard is one Parquet file under
`responses/shards/<source>/<shard_id>.parquet`, written atomically, so a shard is either complete
or absent and a rerun computes exactly the absent ones. What a shard skipped (empty or over-long
prompts) travels in the same file's metadata, so the books balance across any number of reruns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.recipe import Recipe, Source, is_local_path
from fusechat.run import set_aside, stable_hash, stage_dir
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
    prompt_ids: tuple[str, ...]


def model_revision(recipe: Recipe, source: Source) -> str:
    """What exactly the source model is: the pinned revision, or a fingerprint of a local folder.

    A local folder has no commit; its config plus the names and sizes of its files tell versions
    apart without reading gigabytes of weights.
    """
    if source.revision:
        return source.revision
    path = Path(recipe.resolve(source.model))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        cfg = path / "config.json"
        parts = [cfg.read_text() if cfg.exists() else ""]
        parts += [(str(p.relative_to(path)), p.stat().st_size) for p in files]
        return "local-" + stable_hash(*parts, n=12)
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
        "source": source.name, "model": source.model, "revision": revision,
        "engine": source.engine, "sampling": source.sampling.model_dump(mode="json"),
    }


def response_id(prompt_id: str, source: str, sample_index: int, setting: dict[str, Any], seed: int) -> str:
    return stable_hash(prompt_id, source, sample_index, setting, seed)


def load_prompts(recipe: Recipe) -> pa.Table:
    return read(PROMPTS, stage_dir(recipe, "prompts") / "prompts.parquet", ("prompt_id", "domain"))


def plan_source(recipe: Recipe, source: Source, prompts: pa.Table, revision: str) -> list[Shard]:
    setting = settings(source, revision)
    ids = prompts.column("prompt_id").to_pylist()
    domains = prompts.column("domain").to_pylist()
    shards = []
    for domain in DOMAINS:
        n = source.responses.get(domain, 0)
        if n <= 0:
            continue  # e.g. the chinese domain goes only to the sources that name it
        chosen = [pid for pid, d in zip(ids, domains) if d == domain]
        for start in range(0, len(chosen), source.shard_size):
            chunk = tuple(chosen[start:start + source.shard_size])
            sid = stable_hash(chunk, setting, domain, n, recipe.seed)
            shards.append(Shard(sid, source.name, domain, n, int(sid[:8], 16), chunk))
    return shards


def shard_path(recipe: Recipe, shard: Shard) -> Path:
    return stage_dir(recipe, "responses") / "shards" / shard.source / f"{shard.shard_id}.parquet"


def set_aside_damaged(recipe: Recipe, shards: list[Shard]) -> list[Path]:
    """Move shard files that cannot be read (cut short by a full disk or a killed copy) into
    `damaged/` beside them, so that they count as missing and are sampled again."""
    paths = [shard_path(recipe, s) for s in shards]
    return [set_aside(p) for p in paths if p.exists() and not readable(p)]


def write_shard(recipe: Recipe, shard: Shard, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    from fusechat.run import write_table

    table = RESPONSE_SHARD.from_rows(rows, {META_KEY: json.dumps(meta).encode()})
    path = shard_path(recipe, shard)
    write_table(table, path, RESPONSE_SHARD)
    return path


def read_shard(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    table = read(RESPONSE_SHARD, path)
    return table, json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
