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

from fusechat.errors import InputError
from fusechat.prompts.adapters import ADAPTERS
from fusechat.prompts.base import Adapter, BadValue, Prompt
from fusechat.prompts.classify import classify
from fusechat.prompts.filters import Decontaminator, NearDedup
from fusechat.recipe import Filters, PromptDataset, Recipe
from fusechat.run import Manifest, load_manifest, stable_hash, stage_dir, write_table
from fusechat.tables import DROPPED_PROMPTS, PROMPTS, readable

# bump when adapters or filters change what they produce, so old prompt tables are not reused
FORMAT = 2
REASONS = (
    "empty", "too_long", "off_domain_code", "off_domain_math", "code_without_tests", "duplicate",
    "contaminated", "near_duplicate", "over_limit",
)


PromptDataError = InputError  # a prompt data set that cannot be read (the name earlier versions raised)


def _where(i: int, d: PromptDataset) -> str:
    return f"datasets[{i}] {d.name!r} ({d.path})"


def load_table(ref: str, split: str, revision: str | None = None):
    """A `datasets.Dataset` from a local file or folder (absolute path) or a hub id."""
    from datasets.utils import logging as datasets_logging

    # a file that fails to parse is reported once, by the caller, with its line (json_problem)
    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        return _load_table(ref, split, revision)
    finally:
        datasets_logging.set_verbosity(level)


def _load_table(ref: str, split: str, revision: str | None):
    from datasets import load_dataset

    path = Path(ref)
    if not path.is_absolute():
        return load_dataset(ref, revision=revision, split=split)
    if path.is_dir():
        return load_dataset(str(path), split=split)
    # a single file is the split itself
    builder = "parquet" if ".parquet" in path.suffixes else "json"
    return load_dataset(builder, data_files=str(path), split="train")


def json_problem(ref: str) -> tuple[Path, str] | None:
    """(file, "line N: ...") for the first malformed line of a local JSON or JSON Lines file (or
    folder of them); None when they all parse. The `datasets` loader's own error names no line."""
    path = Path(ref)
    if not path.is_absolute() or not path.exists():
        return None
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in (f for f in files if f.is_file() and f.suffix in (".json", ".jsonl")):
        text = f.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
            continue  # one JSON document
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):  # an array over many lines: the parser's line is right
                return f, f"line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
        for n, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as e:
                return f, f"line {n}: not valid JSON ({e.msg}, column {e.colno})"
    return None


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
        raise InputError(
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


# -- per-row filters: (prompt, record, data set, filters) -> (reason, detail) when the row is dropped
Drop = tuple[str, str] | None


def _empty(p: Prompt, rec: dict, d: PromptDataset, f: Filters) -> Drop:
    return ("empty", "") if not p.messages[-1]["content"].strip() else None


def _too_long(p: Prompt, rec: dict, d: PromptDataset, f: Filters) -> Drop:
    chars = sum(len(m["content"]) for m in p.messages)
    return ("too_long", f"{chars} chars > {f.max_prompt_chars}") if chars > f.max_prompt_chars else None


def _off_domain(p: Prompt, rec: dict, d: PromptDataset, f: Filters) -> Drop:
    """Code or math prompts in an instruction or Chinese data set."""
    if not (f.drop_code_math_from_instruction and d.domain in ("instruction", "chinese")):
        return None
    found = classify(rec["text"], p.meta.get("task_category"))
    return (f"off_domain_{found[0]}", found[1]) if found else None


def _code_without_tests(p: Prompt, rec: dict, d: PromptDataset, f: Filters) -> Drop:
    if f.require_code_tests and d.domain == "code" and not p.tests:
        return "code_without_tests", p.meta.get("tests_note", "")
    return None


ROW_FILTERS = (_empty, _too_long, _off_domain, _code_without_tests)  # in order: the first that drops says why


def _read(i: int, d: PromptDataset, adapter: Adapter, recipe: Recipe, books: _Books) -> list[dict]:
    """Adapted rows of one data set that pass the per-row filters."""
    from rich.progress import track

    ref = recipe.resolve(d.path)
    try:
        table = load_table(ref, d.split, d.revision)
    except Exception as e:  # datasets raises many types; all mean the same to the user
        bad_line = json_problem(ref)  # datasets logged its own version of this, without the line
        if bad_line:
            file, why = bad_line
            inside = "" if file == Path(ref) else f"{file}: "  # a folder: name its file
            raise InputError(f"{_where(i, d)}: {inside}{why}") from None
        raise InputError(f"{_where(i, d)}: cannot load split {d.split!r}: {e}") from e
    columns, missing = adapter.columns(table.column_names)
    if missing:
        raise InputError(
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
            raise InputError(f"{_where(i, d)}: row {r}: column {e.column!r}: {e}") from None
        rec = {
            "prompt_id": stable_hash(d.name, _normalized(p.messages)),
            "dataset": d.name, "domain": d.domain, "messages": p.messages,
            "gold_answer": p.gold_answer, "tests": p.tests, "meta": {**p.meta, "row": r}, "row": r,
            "text": "\n".join(m["content"] for m in p.messages if m["role"] == "user"),
        }
        drop = next((why for rule in ROW_FILTERS if (why := rule(p, rec, d, f))), None)
        if drop:
            books.drop(rec, *drop)
        else:
            out.append(rec)
    return out


# -- per-data-set filters: one data set's records in, the kept ones out, the rest dropped in `books`
def _drop_exact_duplicates(records: list[dict], earlier: dict[str, str], books: _Books) -> list[dict]:
    """Records whose normalized messages (`hash`) neither a kept prompt of an earlier data set
    (`earlier`: hash -> prompt id) nor an earlier row of this data set has."""
    kept: list[dict] = []
    first_of: dict[str, dict] = {}
    for rec in records:
        h = rec["hash"]
        if h in earlier:
            books.drop(rec, "duplicate", f"same as {earlier[h]} (earlier data set)")
        elif h in first_of:
            first = first_of[h]
            books.drop(rec, "duplicate", f"same as {first['prompt_id']}")
            # OpenMathInstruct-2 lists a problem once per solution: keep every solution
            if "solutions" in rec["meta"] and "solutions" in first["meta"]:
                first["meta"]["solutions"] += rec["meta"]["solutions"]
        else:
            first_of[h] = rec
            kept.append(rec)
    return kept


def _drop_contaminated(records: list[dict], decon: Decontaminator, books: _Books) -> list[dict]:
    kept = []
    for rec in records:
        hit = decon.hit(rec["text"])
        if hit:
            books.drop(rec, "contaminated", hit)
        else:
            kept.append(rec)
    return kept


def _drop_near_duplicates(records: list[dict], earlier: NearDedup, threshold: float, name: str,
                          books: _Books) -> tuple[list[dict], dict[str, Any]]:
    """Records not near a kept prompt of an earlier data set (`earlier`) or an earlier row of this
    one, and the MinHash signature of each by prompt id."""
    from rich.progress import track

    local = NearDedup(threshold)
    kept, signatures = [], {}
    sigs = NearDedup.signatures_of(r["text"] for r in records)
    for rec, sig in track(zip(records, sigs), total=len(records), description=f"{name}: near-duplicates",
                          transient=True):
        match = earlier.find(sig) or local.find(sig)
        if match:
            books.drop(rec, "near_duplicate", f"Jaccard {match[1]:.2f} with {match[0]}")
        else:
            local.add(rec["prompt_id"], sig)
            signatures[rec["prompt_id"]] = sig
            kept.append(rec)
    return kept, signatures


def _limit(records: list[dict], limit: int, seed: str, books: _Books) -> list[dict]:
    """A seeded random sample of `limit` records, in their source order."""
    if len(records) <= limit:
        return records
    chosen = set(random.Random(seed).sample(range(len(records)), limit))
    for k, rec in enumerate(records):
        if k not in chosen:
            books.drop(rec, "over_limit", f"limit {limit}")
    return [rec for k, rec in enumerate(records) if k in chosen]


def build_prompts(recipe: Recipe) -> Manifest:
    """Write `<run_dir>/prompts/{prompts,dropped}.parquet` + manifest; reuse them when unchanged."""
    from rich.console import Console

    console = Console(stderr=True)
    out_dir = stage_dir(recipe, "prompts")
    key = prompts_key(recipe)
    # a table cut short (full disk, stopped copy) is rebuilt, not reused
    if readable(out_dir / "prompts.parquet") and (out_dir / "manifest.json").exists():
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
            raise InputError(f"filters.decontaminate: {e}") from e
    exact: dict[str, str] = {}  # normalized-messages hash -> kept prompt id, over all data sets
    near = NearDedup(f.near_dedup_threshold) if f.near_dedup_threshold else None
    books = _Books()

    for i, (d, adapter) in enumerate(zip(recipe.datasets, adapters)):
        survivors = _read(i, d, adapter, recipe, books)
        for rec in survivors:
            rec["hash"] = stable_hash(_normalized(rec["messages"]))
        if f.exact_dedup:
            survivors = _drop_exact_duplicates(survivors, exact, books)
        if decon is not None:
            survivors = _drop_contaminated(survivors, decon, books)
        signatures: dict[str, Any] = {}
        if near is not None:
            survivors, signatures = _drop_near_duplicates(survivors, near, f.near_dedup_threshold, d.name, books)
        if d.limit is not None:
            survivors = _limit(survivors, d.limit, stable_hash(recipe.seed, d.name), books)
        for rec in survivors:  # only what survives the limit blocks later data sets' prompts
            exact[rec["hash"]] = rec["prompt_id"]
            if near is not None:
                near.add(rec["prompt_id"], signatures[rec["prompt_id"]])
        books.kept += survivors
        books.per_dataset[d.name]["kept"] = len(survivors)

    prompts = PROMPTS.from_rows(
        {"prompt_id": r["prompt_id"], "dataset": r["dataset"], "domain": r["domain"],
         "messages": r["messages"], "gold_answer": r["gold_answer"], "tests": r["tests"],
         "meta": json.dumps(r["meta"], ensure_ascii=False, sort_keys=True)}
        for r in books.kept
    )
    dropped = DROPPED_PROMPTS.from_rows(books.dropped)
    write_table(prompts, out_dir / "prompts.parquet", PROMPTS)
    write_table(dropped, out_dir / "dropped.parquet", DROPPED_PROMPTS)

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
