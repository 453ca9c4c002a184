"""Score stage: responses -> scores/scores.parquet (reward model, math answers, code tests).

Work is keyed by content: a response's reward depends on its id, its text and its prompt's turns
(and the reward model's settings), its check on its id, its text and its prompt's gold answer,
tests and setup (and the check settings). Finished reward scores live in
`scores/shards/reward-<settings hash>/`, check results in `scores/shards/checks-<settings hash>/`,
each row under its key. A run computes only the rows whose key no finished shard holds, sorted by
prompt (all samples of a prompt in one shard: the reward model reads the prompt once) and cut into
new shards of `scoring.shard_size` rows, each written atomically. So a rerun after a kill computes
what is missing, one more source scores only its responses, and a new reward model recomputes
rewards but reuses the checks. Shards of earlier settings stay until `fusechat prune`.

Several GPUs: one process per GPU, each scoring every n-th missing shard with its own copy of the
reward model (`CUDA` device i for process i); the main process merges the shard files. One GPU or
CPU: the same shards, in this process.

Decisions where the recipe is open:
- an empty (or whitespace-only) response gets no reward (null, reason in `check_detail`): a reward
  model's score for nothing would compete in selection; its checks still run (and fail);
- text that is not valid UTF-8 is decoded with replacement characters and counted;
- a math prompt without gold answer, or a code prompt without tests, gets check `none`;
- a response whose prompt_id is not in the prompt table, or a repeated response_id, is dropped
  and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.errors import InputError
from fusechat.run import Manifest, model_identity, set_aside, stable_hash, stage_dir, write_table
from fusechat.tables import CHECK_SHARD, PROMPTS, RESPONSES, REWARD_SHARD, RIGHT, SCORES, read, readable
from fusechat.scoring.checks import PRELUDE_KEY, Checkers
from fusechat.scoring.reward import recipe_scorer, resolve_model

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from fusechat.recipe import Recipe

COLUMNS = tuple(SCORES.names)
# the columns of the responses table that scoring reads (the prompts table is read whole)
RESPONSE_COLUMNS = ("response_id", "prompt_id", "source", "text", "truncated")
ScoreInputError = InputError  # the name earlier versions raised


def _load_prompts(path: Path) -> dict[str, dict[str, Any]]:
    table = read(PROMPTS, path)
    prompts: dict[str, dict[str, Any]] = {}
    for row, p in enumerate(table.select(PROMPTS.names).to_pylist()):
        if p["prompt_id"] in prompts:
            raise InputError(f"{path}: row {row}: prompt_id {p['prompt_id']!r} appears twice")
        try:
            p["meta"] = json.loads(p["meta"]) if p["meta"] else {}
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: row {row}: field meta is not valid JSON ({e})") from None
        if not isinstance(p["messages"], list) or not p["messages"]:
            raise InputError(f"{path}: row {row}: field messages is empty")
        prompts[p["prompt_id"]] = p
    return prompts


def _decode(raw: bytes | None) -> tuple[str, bool]:
    """A text read as bytes, and whether it was not valid UTF-8 (then decoded with replacement
    characters): a writer that put such bytes in the column must not stop the stage."""
    raw = raw or b""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


@dataclass
class Inputs:
    """The responses to score, joined with their prompts. Texts are gigabytes at the recipe's
    volume: they stay in the file and are read row group by row group (a row group is a sampling
    shard), only the groups that hold rows to compute are kept in Arrow, and they become Python
    strings one shard at a time."""

    table: pa.Table  # RESPONSE_COLUMNS of responses.parquet but the text, every row
    path: Path  # responses.parquet
    prompts: dict[str, dict[str, Any]]
    kept: np.ndarray  # table rows kept, in table order (the order of scores.parquet)
    domain: np.ndarray  # per table row: its prompt's domain (None when the prompt is unknown)
    starts: np.ndarray  # first table row of each row group of the file
    _texts: dict[int, pa.Array] = field(default_factory=dict)  # row group -> its texts, as read
    _file: Any = None  # the open ParquetFile: opening reads the footer, which grows with the groups

    def column(self, name: str, rows) -> list:
        import pyarrow as pa

        if name == "domain":
            return self.domain[rows].tolist()
        return self.table.column(name).take(pa.array(rows, pa.int64())).to_pylist()

    def group_texts(self, group: int) -> pa.Array:
        """One row group's texts as bytes (read from the file, not kept)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self.path)
        column = self._file.read_row_group(group, columns=["text"]).column("text")
        return column.combine_chunks().cast(pa.binary())

    def texts(self, rows) -> pa.Array:
        """The texts of the given table rows, as bytes, taken row group by row group (the groups
        read once and kept until `forget_texts`)."""
        import numpy as np
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        group = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(group, kind="stable")
        parts = []
        for part in np.split(order, np.flatnonzero(np.diff(group[order])) + 1):
            if len(part):
                g = int(group[part[0]])
                if g not in self._texts:
                    self._texts[g] = self.group_texts(g)
                parts.append(self._texts[g].take(pa.array(rows[part] - self.starts[g])))
        got = pa.concat_arrays(parts) if parts else pa.array([], pa.binary())
        back = np.empty(len(rows), dtype=np.int64)
        back[order] = np.arange(len(rows))
        return got.take(pa.array(back))

    def forget_texts(self) -> None:
        import pyarrow as pa

        self._texts.clear()
        self._file = None
        pa.default_memory_pool().release_unused()

    def rows(self, rows) -> tuple[list[dict[str, Any]], int]:
        """The given table rows as dicts with text and prompt fields, and how many texts were not
        valid UTF-8 (decoded with replacement characters)."""
        import pyarrow as pa

        idx = pa.array(rows, pa.int64())
        # read text as bytes: a writer that put non-UTF-8 bytes in the column must not stop the stage
        raw_text = self.texts(rows).to_pylist()
        meta = self.table.select(["response_id", "prompt_id", "source", "truncated"]).take(idx).to_pylist()
        out, non_utf8 = [], 0
        for r, raw in zip(meta, raw_text):
            text, bad = _decode(raw)
            non_utf8 += bad
            prompt = self.prompts[r["prompt_id"]]
            out.append({
                **r, "truncated": bool(r["truncated"]), "text": text, "domain": prompt["domain"],
                "messages": prompt["messages"],  # shared by the prompt's responses, not copied
                "gold_answer": prompt["gold_answer"], "tests": prompt["tests"] or [],
                "setup": prompt["meta"].get("test_setup", "") or "",
                "prelude": prompt["meta"].get(PRELUDE_KEY, "") or "",
            })
        return out, non_utf8


def load_inputs(recipe: Recipe, manifest: Manifest) -> Inputs:
    """Responses and prompts; a repeated response_id (after its first kept row) and a response
    whose prompt_id is not in the prompt table are dropped by reason, bad tables rejected."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    import pyarrow.parquet as pq

    run = recipe.run_path()
    prompts = _load_prompts(run / "prompts" / "prompts.parquet")
    path = run / "responses" / "responses.parquet"
    # the texts stay in the file (Inputs.texts); the other columns, one chunk each: takes stay cheap
    table = read(RESPONSES, path, [c for c in RESPONSE_COLUMNS if c != "text"], only=True)
    table = pa.table({c: table.column(c).combine_chunks() for c in table.column_names})
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise InputError(path, "missing column(s) text of the responses table (docs/architecture.md)")
    starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])[:-1]
    manifest.rows_in = table.num_rows
    frame = pd.DataFrame({"rid": table.column("response_id").to_pandas(),
                          "pid": table.column("prompt_id").to_pandas()})
    domain = frame["pid"].map({pid: p["domain"] for pid, p in prompts.items()}).to_numpy(dtype=object)
    known = pd.notna(domain)
    # a response id counts as seen from its first row with a known prompt on
    first_known = pd.Series(np.where(known, np.arange(len(frame)), len(frame))).groupby(frame["rid"].to_numpy()).transform("min")
    duplicate = np.arange(len(frame)) > first_known.to_numpy()
    manifest.drop("duplicate_response_id", int(duplicate.sum()))
    manifest.drop("unknown_prompt_id", int((~duplicate & ~known).sum()))
    return Inputs(table, path, prompts, np.flatnonzero(known & ~duplicate), domain, starts)


def _load_rows(recipe: Recipe, manifest: Manifest) -> list[dict[str, Any]]:
    """Every kept response as a dict (texts as Python strings: small runs and tests)."""
    inputs = load_inputs(recipe, manifest)
    rows, manifest.extra["non_utf8_text"] = inputs.rows(inputs.kept)
    return rows


# -- reward -------------------------------------------------------------------------------------
def _reward_shard(scorer, rows: list[dict], path: Path, progress=None) -> None:
    import pyarrow as pa

    from fusechat.scoring.reward import RewardOutput

    todo = [i for i, r in enumerate(rows) if r["text"].strip()]
    outputs: list = [RewardOutput(None, None, False, "empty response: not scored")] * len(rows)
    if progress and len(todo) < len(rows):
        progress(len(rows) - len(todo))
    for i, o in zip(todo, scorer.score([rows[i]["messages"] + [{"role": "assistant", "content": rows[i]["text"]}]
                                        for i in todo], progress=progress)):
        outputs[i] = o
    write_table(pa.Table.from_pylist([
        {"key": r["key"], "response_id": r["response_id"], "reward": o.score, "objective_rewards": o.objectives,
         "reward_truncated": o.truncated, "reward_detail": o.detail}
        for r, o in zip(rows, outputs)
    ], schema=REWARD_SHARD.schema()), path, REWARD_SHARD)


def _reward_worker(rank: int, recipe_json: str, model_path: str, todo: list, devices: list[str]) -> None:
    from fusechat.recipe import Recipe

    recipe = Recipe.model_validate_json(recipe_json)
    scorer = recipe_scorer(recipe, model_path, device=devices[rank])
    for rows, path in todo[rank :: len(devices)]:
        _reward_shard(scorer, rows, Path(path))


def _score_rewards(recipe: Recipe, model_path: str, todo: list[tuple[list[dict], Path]], progress,
                   devices: list[str] | None = None, ray_address: str | None = None) -> None:
    """Missing reward shards; with several devices, one spawned process per device; with a Ray
    address, one Ray task per GPU of that cluster (fusechat.cluster)."""
    if ray_address and todo:
        from fusechat.cluster import score_rewards

        score_rewards(recipe, model_path, todo)
        progress(sum(len(rows) for rows, _ in todo))
        return
    import torch

    if devices is None and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if devices and len(devices) > 1 and len(todo) > 1:
        import torch.multiprocessing as tmp

        devices = devices[: len(todo)]
        args = (recipe.model_dump_json(), model_path, [(rows, str(p)) for rows, p in todo], devices)
        tmp.start_processes(_reward_worker, args=args, nprocs=len(devices), join=True, start_method="spawn")
        progress(sum(len(rows) for rows, _ in todo))
        return
    scorer = recipe_scorer(recipe, model_path, device=devices[0] if devices else None)
    for rows, path in todo:
        _reward_shard(scorer, rows, path, progress)


# -- checks -------------------------------------------------------------------------------------
def _check_shard(checkers: Checkers, rows: list[dict], path: Path, progress) -> None:
    import pyarrow as pa

    out = [{"key": r["key"], "response_id": r["response_id"], "check": "none", "check_status": "none",
            "check_detail": ""} for r in rows]
    math_idx, code_idx = [], []
    for i, r in enumerate(rows):
        if r["domain"] == "math":
            if r["gold_answer"] is None or not str(r["gold_answer"]).strip():
                out[i]["check_detail"] = "math prompt without gold answer: not checked"
            else:
                math_idx.append(i)
        elif r["domain"] == "code":
            if not r["tests"]:
                out[i]["check_detail"] = "code prompt without tests: not checked"
            else:
                code_idx.append(i)
    progress(len(rows) - len(math_idx) - len(code_idx))
    if math_idx:
        results = checkers.math_many([(str(rows[i]["gold_answer"]), rows[i]["text"]) for i in math_idx], progress)
        for i, res in zip(math_idx, results):
            out[i].update(check="math", check_status=res.status, check_detail=res.detail)
    if code_idx:
        items = [(rows[i]["text"], rows[i]["tests"], rows[i]["setup"], rows[i]["prelude"]) for i in code_idx]
        for i, res in zip(code_idx, checkers.code_many(items, progress)):
            out[i].update(check="code", check_status=res.status, check_detail=res.detail)
    write_table(pa.Table.from_pylist(out, schema=CHECK_SHARD.schema()), path, CHECK_SHARD)


# -- the work plan ------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run holds and what it must compute, per kept response (in kept order)."""

    reward_dir: Path  # scores/shards/reward-<hash of the reward model's settings>
    check_dir: Path  # scores/shards/checks-<hash of the check settings>
    reward_keys: pa.Array
    check_keys: pa.Array
    # new shards: (table rows, their keys, the file to write)
    reward_todo: list[tuple[np.ndarray, list[str], Path]]
    check_todo: list[tuple[np.ndarray, list[str], Path]]
    empty: int  # responses with no text but whitespace
    non_utf8: int  # texts not valid UTF-8 (decoded with replacement characters)
    damaged: list[Path]  # shard files that could not be read, moved to damaged/

    def rows(self, kind: str) -> dict[str, int]:
        todo = self.reward_todo if kind == "reward" else self.check_todo
        computed = sum(len(rows) for rows, _, _ in todo)
        return {"rows_computed": computed, "rows_reused": len(self.reward_keys) - computed}


def settings_dirs(recipe: Recipe, revision: str, shards_dir: Path) -> tuple[Path, Path]:
    """The folders of the reward scores and check results of the recipe's settings."""
    rm, s = recipe.scoring.reward_model, recipe.scoring
    reward_settings = [model_identity(rm.model, revision), rm.kind, rm.max_length, rm.overlong, rm.dtype]
    check_settings = [s.math.model_dump(), s.code.model_dump()]
    return (shards_dir / f"reward-{stable_hash(reward_settings)}",
            shards_dir / f"checks-{stable_hash(check_settings)}")


def row_keys(inputs: Inputs) -> tuple[pa.Array, pa.Array, int, int]:
    """Reward and check keys of every kept row, and the empty and non-UTF-8 texts among them.

    Texts are read and hashed row group by row group in file order (one sampling shard at a time),
    so only one group's texts are in memory at any time and reads stay sequential."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    reward_of, check_of = {}, {}
    for pid, p in inputs.prompts.items():
        reward_of[pid] = stable_hash(p["messages"]).encode()
        check_of[pid] = stable_hash(p["gold_answer"], p["tests"], p["meta"].get("test_setup", "") or "",
                                    p["meta"].get(PRELUDE_KEY, "") or "").encode()
    rids, pids = inputs.table.column("response_id"), inputs.table.column("prompt_id")
    reward_keys: list[str] = []
    check_keys: list[str] = []
    empty = non_utf8 = 0
    bounds = [*inputs.starts.tolist(), inputs.table.num_rows]
    for g in range(len(inputs.starts)):
        lo, hi = np.searchsorted(inputs.kept, bounds[g : g + 2])
        rows = inputs.kept[lo:hi]
        if not len(rows):
            continue
        taken = pa.array(rows, pa.int64())
        raw_texts = inputs.group_texts(g).take(pa.array(rows - bounds[g], pa.int64())).to_pylist()
        for rid, pid, raw in zip(rids.take(taken).to_pylist(), pids.take(taken).to_pylist(), raw_texts):
            raw = raw or b""
            text, bad = _decode(raw)
            non_utf8 += bad
            empty += not text.strip()
            head = rid.encode() + b"\0" + hashlib.blake2b(raw, digest_size=16).digest()
            reward_keys.append(hashlib.blake2b(head + reward_of[pid], digest_size=16).hexdigest())
            check_keys.append(hashlib.blake2b(head + check_of[pid], digest_size=16).hexdigest())
    return pa.array(reward_keys, pa.string()), pa.array(check_keys, pa.string()), empty, non_utf8


def _missing(folder: Path, spec, keys: pa.Array, inputs: Inputs, size: int, damaged: list[Path]):
    """New shards for the kept rows whose key no readable shard file in `folder` holds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    held = []
    for path in sorted(folder.glob("*.parquet")):
        if readable(path):
            held.append(read(spec, path, ("key",), only=True).column("key"))
        else:  # cut short (full disk, killed copy): work to redo, not an input to trust
            damaged.append(set_aside(path))
    have = pa.chunked_array(held, pa.string()).combine_chunks() if held else pa.array([], pa.string())
    missing = np.flatnonzero(~pc.is_in(keys, value_set=have).to_numpy(zero_copy_only=False))
    rows, todo_keys = inputs.kept[missing], keys.take(pa.array(missing, pa.int64()))
    # all samples of a prompt, from every source, in one shard: the reward model reads the prompt once
    # (Arrow's sort is stable, and orders UTF-8 bytes as Python orders code points)
    order = pc.sort_indices(inputs.table.column("prompt_id").take(pa.array(rows, pa.int64()))).to_numpy()
    rows, todo_keys = rows[order], todo_keys.take(pa.array(order, pa.int64())).to_pylist()
    todo = []
    for k in range(0, len(rows), size):
        part = todo_keys[k : k + size]
        todo.append((rows[k : k + size], part, folder / f"{stable_hash(part)}.parquet"))
    return todo


def plan(recipe: Recipe, inputs: Inputs, revision: str, shards_dir: Path) -> Plan:
    reward_dir, check_dir = settings_dirs(recipe, revision, shards_dir)
    reward_keys, check_keys, empty, non_utf8 = row_keys(inputs)
    damaged: list[Path] = []
    size = recipe.scoring.shard_size
    return Plan(reward_dir, check_dir, reward_keys, check_keys,
                _missing(reward_dir, REWARD_SHARD, reward_keys, inputs, size, damaged),
                _missing(check_dir, CHECK_SHARD, check_keys, inputs, size, damaged),
                empty, non_utf8, damaged)


def todo_rows(inputs: Inputs, rows, keys: list[str]) -> list[dict[str, Any]]:
    """One new shard's rows as dicts (`Inputs.rows`), each with its key."""
    part, _ = inputs.rows(rows)
    for r, key in zip(part, keys):
        r["key"] = key
    return part


# -- stage --------------------------------------------------------------------------------------
def run_score(recipe: Recipe, ray_address: str | None = None) -> Manifest:
    import pyarrow as pa
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if ray_address:  # before anything starts: a cluster that cannot hold a scorer fails here
        from fusechat.cluster import check_reward_scorer

        check_reward_scorer(ray_address)
    manifest = Manifest.start(recipe, "scores")
    out_dir = stage_dir(recipe, "scores")
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(exist_ok=True)
    inputs = load_inputs(recipe, manifest)
    model_path, revision = resolve_model(recipe)
    manifest.models[recipe.scoring.reward_model.model] = revision
    work = plan(recipe, inputs, revision, shards_dir)
    manifest.extra["non_utf8_text"] = work.non_utf8
    reward_todo = [(todo_rows(inputs, rows, keys), path) for rows, keys, path in work.reward_todo]

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    checkers = Checkers(recipe)
    try:
        with Progress(*columns) as bar:
            if reward_todo:
                task = bar.add_task("reward model", total=sum(len(p) for p, _ in reward_todo))
                _score_rewards(recipe, model_path, reward_todo, lambda n=1: bar.advance(task, n),
                               ray_address=ray_address)
            if work.check_todo:
                task = bar.add_task("math + code checks", total=sum(len(r) for r, _, _ in work.check_todo))
                for rows, keys, path in work.check_todo:
                    _check_shard(checkers, todo_rows(inputs, rows, keys), path, lambda n=1: bar.advance(task, n))
    finally:
        checkers.close()
    if checkers.isolation is not None:
        manifest.extra["sandbox"] = checkers.isolation

    # the texts are done with: the merge holds every score and check instead
    del reward_todo
    inputs.forget_texts()
    merged, reward_detail = _merge(inputs, work)
    write_table(merged, out_dir / "scores.parquet", SCORES)
    manifest.rows_out = merged.num_rows
    manifest.outputs["scores.parquet"] = merged.num_rows
    manifest.extra.update(_counts(inputs, merged, reward_detail))
    manifest.extra["empty_responses"] = work.empty
    manifest.extra["reward"] = work.rows("reward")
    manifest.extra["checks"] = work.rows("checks")
    manifest.extra["shards"] = {"reward_computed": len(work.reward_todo), "checks_computed": len(work.check_todo)}
    # shard files that could not be read, moved to damaged/ and computed again
    manifest.extra["damaged_shards"] = [str(p.relative_to(out_dir)) for p in work.damaged]
    manifest.extra["summary"] = summary(merged)
    manifest.check_balance()
    manifest.save(out_dir)
    _print_summary(manifest.extra["summary"], manifest.extra)
    return manifest


def _merge(inputs: Inputs, work: Plan) -> tuple[pa.Table, pa.ChunkedArray]:
    """scores.parquet's table (kept responses in table order) joined in Arrow with the shard
    files of the recipe's settings by key, and the reward shards' `reward_detail` per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def gather(spec, folder):
        tables = [read(spec, p) for p in sorted(folder.glob("*.parquet"))]
        return pa.concat_tables(tables) if tables else spec.schema().empty_table()

    kept = pa.array(inputs.kept, pa.int64())
    t = inputs.table.select(["response_id", "prompt_id", "source", "truncated"]).take(kept)
    rid = t.column("response_id").combine_chunks()
    joined = []
    for spec, folder, keys in ((REWARD_SHARD, work.reward_dir, work.reward_keys),
                               (CHECK_SHARD, work.check_dir, work.check_keys)):
        table = gather(spec, folder)
        at = pc.index_in(keys, value_set=table.column("key").combine_chunks())
        if at.null_count:  # every kept response is in some shard: a bug, not bad input
            raise KeyError(rid[int(np.flatnonzero(pc.is_null(at).to_numpy(zero_copy_only=False))[0])].as_py())
        joined.append(table.take(at))
    rw, ck = joined
    null = pc.is_null(rw.column("reward")).to_numpy(zero_copy_only=False)
    detail = ck.column("check_detail").to_numpy(zero_copy_only=False).astype(object)
    why = rw.column("reward_detail")
    for i in np.flatnonzero(null):
        d = detail[i]
        detail[i] = f"reward not computed: {why[int(i)].as_py()}" + (f"; {d}" if d else "")
    truncated = pc.or_kleene(pc.fill_null(t.column("truncated"), False), rw.column("reward_truncated"))
    merged = pa.table({
        "response_id": rid, "prompt_id": t.column("prompt_id"), "source": t.column("source"),
        "domain": pa.array(inputs.domain[inputs.kept], pa.string()), "reward": rw.column("reward"),
        "objective_rewards": rw.column("objective_rewards"), "check": ck.column("check"),
        "check_status": ck.column("check_status"), "check_detail": pa.array(detail, pa.string()),
        "truncated": truncated,
    })
    return SCORES.conform(merged), why


def _counts(inputs: Inputs, merged: pa.Table, reward_detail: pa.ChunkedArray) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    status: dict[str, Counter] = defaultdict(Counter)
    pairs = pa.table({"c": merged.column("check"), "s": merged.column("check_status")}).group_by(["c", "s"]).aggregate([([], "count_all")])
    for c, st, n in zip(*pairs.to_pydict().values()):
        status[c][st] += n
    null = pc.is_null(merged.column("reward"))
    # every reason starts with a fixed tag before its first colon ("overlong", "empty response")
    null_reasons = Counter(d.split(":")[0] for d in reward_detail.filter(null).to_pylist() if d)
    own = pc.fill_null(inputs.table.column("truncated").take(pa.array(inputs.kept, pa.int64())), False)
    return {
        "reward_null": int(pc.sum(null).as_py() or 0),
        "reward_null_reasons": dict(null_reasons),
        "reward_input_truncated": int(pc.sum(pc.and_(pc.fill_null(merged.column("truncated"), False),
                                                      pc.invert(own))).as_py() or 0),
        "check_status": {k: dict(v) for k, v in status.items()},
    }


def summary(merged: pa.Table) -> list[dict[str, Any]]:
    """Per source and domain: responses, mean reward, null rewards, math correct and code pass rates."""
    import numpy as np
    import pyarrow.compute as pc

    frame = merged.select(["source", "domain", "check", "check_status"]).to_pandas()
    null = pc.is_null(merged.column("reward")).to_numpy(zero_copy_only=False)
    reward = pc.fill_null(merged.column("reward"), 0.0).to_numpy(zero_copy_only=False)
    check = frame["check"].to_numpy(dtype=object)
    status = frame["check_status"].to_numpy(dtype=object)
    out = []
    groups = frame.groupby(["source", "domain"], sort=True).indices if len(frame) else {}
    for (source, domain), idx in sorted(groups.items()):
        # a left-to-right sum over Python floats, as the reward mean has always been computed
        rewards = reward[idx][~null[idx]].tolist()
        row: dict[str, Any] = {"source": source, "domain": domain, "responses": len(idx),
                               "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                               "reward_null": len(idx) - len(rewards)}
        for name, (good,) in RIGHT.items():  # the one right status of each check
            checked = idx[check[idx] == name]
            if len(checked):
                row[f"{name}_checked"] = len(checked)
                row[f"{name}_{good}_rate"] = int(np.sum(status[checked] == good)) / len(checked)
        out.append(row)
    return out


def _print_summary(rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    books = "; ".join(f"{what}: {extra[k]['rows_computed']} rows computed, {extra[k]['rows_reused']} reused"
                      for what, k in (("reward model", "reward"), ("checks", "checks")))
    table = Table(title="scores per source and domain", caption=books)
    for col in ("source", "domain", "responses", "mean reward", "no reward", "math correct (n)", "code pass (n)"):
        table.add_column(col, justify="left" if col in ("source", "domain") else "right", no_wrap=True)

    def rate(r, check, good):
        key = f"{check}_{good}_rate"
        return f"{r[key]:.1%} ({r[f'{check}_checked']})" if key in r else "-"

    for r in rows:
        mean = "-" if r["mean_reward"] is None else f"{r['mean_reward']:.4f}"
        table.add_row(r["source"], r["domain"], str(r["responses"]), mean, str(r["reward_null"]),
                      rate(r, "math", "correct"), rate(r, "code", "pass"))
    Console(stderr=True, width=120).print(table)
