"""`build_prompts`: read the recipe's prompt data sets, filter them, write one prompt table.

Order, per data set in recipe order (earlier data sets win duplicates):
  read + adapt -> empty -> over-long -> code/math in instruction or Chinese sets -> code without
  tests -> exact duplicate -> contaminated -> near-duplicate -> over the data set's limit.
Duplicates are checked against the prompts kept from earlier data sets and against this data set's
own earlier rows; only prompts that survive the limit enter the cross-data-set indexes, so a
prompt that the limit leaves out never blocks a later one. The limit keeps a seeded random sample
(seed = recipe seed + data set name) in source order: first-N would inherit the source's sort
order (OpenMathInstruct-2 is grouped by problem source).

Every row read is either in prompts.parquet or in dropped.parquet with its reason; the manifest
balances and counts both per data set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from fusechat.errors import FusechatError
from fusechat.prompts.adapters import ADAPTERS, Adapter, BadValue
from fusechat.prompts.classify import classify
from fusechat.prompts.filters import Decontaminator, NearDedup
from fusechat.recipe import PromptDataset, Recipe
from fusechat.run import Manifest, load_manifest, stable_hash, stage_dir, write_table

# bump when adapters or filters change what they produce, so old prompt tables are not reused
FORMAT = 1
REASONS = (
    "empty", "too_long", "off_domain_code", "off_domain_math", "code_without_tests", "duplicate",
    "contaminated", "near_duplicate", "over_limit",
)


class PromptDataError(FusechatError, ValueError):
    """A prompt data set that cannot be read; the message names the data set, row and column."""


def _where(i: int, d: PromptDataset) -> str:
    return f"datasets[{i}] {d.name!r} ({d.path})"


def load_table(ref: str, split: str, revision: str | None = None):
    """A `datasets.Dataset` from a local file or folder (absolute path) or a hub id."""
    from datasets import load_dataset

    path = Path(ref)
    if not path.is_absolute():
        return load_dataset(ref, revision=revision, split=split)
    if path.is_dir():
        return load_dataset(str(path), split=split)
    # a single file is the split itself
    builder = "parquet" if ".parquet" in path.suffixes else "json"
    return load_dataset(builder, data_files=str(path), split="train")


def _fingerprint(ref: str) -> list | None:
    """Size and mtime of a local file or folder's files: an edited file invalidates reuse."""
    path = Path(ref)
    if not path.is_absolute() or not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def prompts_key(recipe: Recipe) -> str:
    """Hash of what the prompt table depends on: data sets, filters, seed and the local files."""
    datasets = [(d.model_dump(mode="json"), _fingerprint(recipe.resolve(d.path))) for d in recipe.datasets]
    evals = [_fingerprint(recipe.resolve(f)) for f in recipe.filters.decontaminate]
    return stable_hash(FORMAT, recipe.seed, datasets, recipe.filters.model_dump(mode="json"), evals, n=64)


def _adapter(i: int, d: PromptDataset) -> Adapter:
    if d.adapter not in ADAPTERS:
        raise PromptDataError(
            f"{_where(i, d)}: unknown adapter {d.adapter!r}; known adapters: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[d.adapter]


def _normalized(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": " ".join(m["content"].split())} for m in messages]


class _Books:
    """Kept and dropped prompts with per-data-set counts."""

    def __init__(self):
        self.kept: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.per_dataset: dict[str, dict[str, Any]] = {}

    def drop(self, rec: dict[str, Any], reason: str, detail: str = "") -> None:
        self.dropped.append(
            {"prompt_id": rec["prompt_id"], "dataset": rec["dataset"], "row": rec["row"],
             "reason": reason, "detail": detail}
        )
        counts = self.per_dataset[rec["dataset"]]["dropped"]
        counts[reason] = counts.get(reason, 0) + 1


def _read(i: int, d: PromptDataset, adapter: Adapter, recipe: Recipe, books: _Books) -> list[dict]:
    """Adapted rows of one data set that pass the per-row filters."""
    from rich.progress import track

    ref = recipe.resolve(d.path)
    try:
        table = load_table(ref, d.split, d.revision)
    except Exception as e:  # datasets raises many types; all mean the same to the user
        raise PromptDataError(f"{_where(i, d)}: cannot load split {d.split!r}: {e}") from e
    columns, missing = adapter.columns(table.column_names)
    if missing:
        raise PromptDataError(
            f"{_where(i, d)}: adapter {adapter.name!r} needs column {', '.join(missing)}; "
            f"the table has {', '.join(table.column_names)}"
        )
    books.per_dataset[d.name] = {"read": len(table), "kept": 0, "dropped": {}}
    f = recipe.filters
    out = []
    for r, row in enumerate(track(table.select_columns(columns), total=len(table),
                                  description=f"{d.name}: reading", transient=True)):
        try:
            p = adapter.convert(row)
        except BadValue as e:
            raise PromptDataError(f"{_where(i, d)}: row {r}: column {e.column!r}: {e}") from None
        rec = {
            "prompt_id": stable_hash(d.name, _normalized(p.messages)),
            "dataset": d.name, "domain": d.domain, "messages": p.messages,
            "gold_answer": p.gold_answer, "tests": p.tests, "meta": {**p.meta, "row": r}, "row": r,
            "text": "\n".join(m["content"] for m in p.messages if m["role"] == "user"),
        }
        chars = sum(len(m["content"]) for m in p.messages)
        if not p.messages[-1]["content"].strip():
            books.drop(rec, "empty")
        elif chars > f.max_prompt_chars:
            books.drop(rec, "too_long", f"{chars} chars > {f.max_prompt_chars}")
        elif f.drop_code_math_from_instruction and d.domain in ("instruction", "chinese") and (
            found := classify(rec["text"], p.meta.get("task_category"))
        ):
            books.drop(rec, f"off_domain_{found[0]}", found[1])
        elif f.require_code_tests and d.domain == "code" and not p.tests:
            books.drop(rec, "code_without_tests", p.meta.get("tests_note", ""))
        else:
            out.append(rec)
    return out


def build_prompts(recipe: Recipe) -> Manifest:
    """Write `<run_dir>/prompts/{prompts,dropped}.parquet` + manifest; reuse them when unchanged."""
    import pyarrow as pa
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    out_dir = stage_dir(recipe, "prompts")
    key = prompts_key(recipe)
    if (out_dir / "prompts.parquet").exists() and (out_dir / "manifest.json").exists():
        previous = load_manifest(out_dir)
        if previous.get("extra", {}).get("prompts_key") == key:
            console.print(f"prompts: reusing {out_dir / 'prompts.parquet'} (same data sets and filters)")
            return Manifest(**previous)

    adapters = [_adapter(i, d) for i, d in enumerate(recipe.datasets)]  # all names checked up front
    f = recipe.filters
    manifest = Manifest.start(recipe, "prompts")
    decon = None
    if f.decontaminate:
        try:
            decon = Decontaminator(
                [(Path(p).name, recipe.resolve(p)) for p in f.decontaminate], f.ngram,
                lambda path: load_table(path, "train"),
            )
        except ValueError as e:
            raise PromptDataError(f"filters.decontaminate: {e}") from e
    exact: dict[str, str] = {}  # normalized-messages hash -> kept prompt id, over all data sets
    near = NearDedup(f.near_dedup_threshold) if f.near_dedup_threshold else None
    books = _Books()

    for i, (d, adapter) in enumerate(zip(recipe.datasets, adapters)):
        records = _read(i, d, adapter, recipe, books)
        survivors: list[dict] = []
        local_exact: dict[str, dict] = {}
        for rec in records:
            h = stable_hash(_normalized(rec["messages"]))
            if f.exact_dedup and h in exact:
                books.drop(rec, "duplicate", f"same as {exact[h]} (earlier data set)")
            elif f.exact_dedup and h in local_exact:
                first = local_exact[h]
                books.drop(rec, "duplicate", f"same as {first['prompt_id']}")
                # OpenMathInstruct-2 lists a problem once per solution: keep every solution
                if "solutions" in rec["meta"] and "solutions" in first["meta"]:
                    first["meta"]["solutions"] += rec["meta"]["solutions"]
            else:
                local_exact[h] = rec
                rec["hash"] = h
                survivors.append(rec)
        if decon is not None:
            clean = []
            for rec in survivors:
                hit = decon.hit(rec["text"])
                if hit:
                    books.drop(rec, "contaminated", hit)
                else:
                    clean.append(rec)
            survivors = clean
        signatures: dict[str, Any] = {}
        if near is not None:
            local = NearDedup(f.near_dedup_threshold)
            unique = []
            sigs = NearDedup.signatures_of(r["text"] for r in survivors)
            for rec, sig in track(zip(survivors, sigs), total=len(survivors),
                                  description=f"{d.name}: near-duplicates", transient=True):
                match = near.find(sig) or local.find(sig)
                if match:
                    books.drop(rec, "near_duplicate", f"Jaccard {match[1]:.2f} with {match[0]}")
                else:
                    local.add(rec["prompt_id"], sig)
                    signatures[rec["prompt_id"]] = sig
                    unique.append(rec)
            survivors = unique
        if d.limit is not None and len(survivors) > d.limit:
            rng = random.Random(stable_hash(recipe.seed, d.name))
            chosen = set(rng.sample(range(len(survivors)), d.limit))
            for k, rec in enumerate(survivors):
                if k not in chosen:
                    books.drop(rec, "over_limit", f"limit {d.limit}")
            survivors = [rec for k, rec in enumerate(survivors) if k in chosen]
        for rec in survivors:
            exact[rec["hash"]] = rec["prompt_id"]
            if near is not None:
                near.add(rec["prompt_id"], signatures[rec["prompt_id"]])
        books.kept += survivors
        books.per_dataset[d.name]["kept"] = len(survivors)

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    prompts = pa.Table.from_pylist(
        [
            {"prompt_id": r["prompt_id"], "dataset": r["dataset"], "domain": r["domain"],
             "messages": r["messages"], "gold_answer": r["gold_answer"], "tests": r["tests"],
             "meta": json.dumps(r["meta"], ensure_ascii=False, sort_keys=True)}
            for r in books.kept
        ],
        schema=pa.schema([
            ("prompt_id", pa.string()), ("dataset", pa.string()), ("domain", pa.string()),
            ("messages", pa.list_(message)), ("gold_answer", pa.string()),
            ("tests", pa.list_(pa.string())), ("meta", pa.string()),
        ]),
    )
    dropped = pa.Table.from_pylist(
        books.dropped,
        schema=pa.schema([
            ("prompt_id", pa.string()), ("dataset", pa.string()), ("row", pa.int64()),
            ("reason", pa.string()), ("detail", pa.string()),
        ]),
    )
    write_table(prompts, out_dir / "prompts.parquet")
    write_table(dropped, out_dir / "dropped.parquet")

    manifest.rows_in = sum(c["read"] for c in books.per_dataset.values())
    manifest.rows_out = prompts.num_rows
    for rec in books.dropped:
        manifest.drop(rec["reason"])
    manifest.outputs = {"prompts.parquet": prompts.num_rows, "dropped.parquet": dropped.num_rows}
    manifest.extra = {
        "prompts_key": key,
        "per_dataset": books.per_dataset,
        "datasets": {d.name: {"path": d.path, "revision": d.revision, "split": d.split, "adapter": d.adapter}
                     for d in recipe.datasets},
        "decontamination": decon.counts if decon else {},
        "near_dedup_threshold": f.near_dedup_threshold,
    }
    manifest.check_balance()
    manifest.save(out_dir)
    _summary(console, books)
    return manifest


def _summary(console, books: _Books) -> None:
    from rich.table import Table

    reasons = [r for r in REASONS if any(r in c["dropped"] for c in books.per_dataset.values())]
    table = Table(title="prompts")
    for col in ("dataset", "read", "kept", *reasons):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, c in books.per_dataset.items():
        table.add_row(name, str(c["read"]), str(c["kept"]), *(str(c["dropped"].get(r, 0)) for r in reasons))
    console.print(table)
