"""Score stage: responses -> scores/scores.parquet (reward model, math answers, code tests).

Work is cut into shards of `scoring.shard_size` responses; each shard's reward scores and check
results are written atomically to `scores/shards/` under a name that hashes their inputs and
settings, so a rerun after a kill computes only the shards that are missing.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.errors import InputError
from fusechat.run import Manifest, set_aside, stable_hash, stage_dir, write_table
from fusechat.tables import CHECK_SHARD, PROMPTS, RESPONSES, REWARD_SHARD, SCORES, read, readable
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


@dataclass
class Inputs:
    """The responses to score, joined with their prompts. Texts stay in the Arrow column and
    become Python strings one shard at a time: at the recipe's volume they are gigabytes."""

    table: pa.Table  # RESPONSE_COLUMNS of responses.parquet, every row
    prompts: dict[str, dict[str, Any]]
    kept: np.ndarray  # table rows kept, in table order (the order of scores.parquet)
    domain: np.ndarray  # per table row: its prompt's domain (None when the prompt is unknown)
    _starts: np.ndarray | None = None  # first row of each chunk of the text column

    def column(self, name: str, rows) -> list:
        import pyarrow as pa

        if name == "domain":
            return self.domain[rows].tolist()
        return self.table.column(name).take(pa.array(rows, pa.int64())).to_pylist()

    def texts(self, rows) -> pa.Array:
        """The texts of the given table rows, as bytes. Taken chunk by chunk: the column has one
        chunk per row group (a sampling shard), and a take across all chunks at once would join
        them all first, for every shard."""
        import numpy as np
        import pyarrow as pa

        column = self.table.column("text")
        if self._starts is None:
            self._starts = np.cumsum([0] + [len(c) for c in column.chunks])[:-1]
        rows = np.asarray(rows, dtype=np.int64)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        parts = []
        for group in np.split(order, np.flatnonzero(np.diff(chunk[order])) + 1):
            if len(group):
                c = int(chunk[group[0]])
                parts.append(column.chunk(c).take(pa.array(rows[group] - self._starts[c])).cast(pa.binary()))
        got = pa.concat_arrays(parts) if parts else pa.array([], pa.binary())
        back = np.empty(len(rows), dtype=np.int64)
        back[order] = np.arange(len(rows))
        return got.take(pa.array(back))

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
            raw = raw or b""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                non_utf8 += 1
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

    run = recipe.run_path()
    prompts = _load_prompts(run / "prompts" / "prompts.parquet")
    table = read(RESPONSES, run / "responses" / "responses.parquet", RESPONSE_COLUMNS, only=True)
    # one chunk per column except the texts (gigabytes, kept as read): takes per shard stay cheap
    table = pa.table({c: table.column(c) if c == "text" else table.column(c).combine_chunks()
                      for c in table.column_names})
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
    return Inputs(table, prompts, np.flatnonzero(known & ~duplicate), domain)


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
        {"response_id": r["response_id"], "reward": o.score, "objective_rewards": o.objectives,
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

    out = [{"response_id": r["response_id"], "check": "none", "check_status": "none", "check_detail": ""} for r in rows]
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


# -- stage --------------------------------------------------------------------------------------
def _shard_paths(recipe: Recipe, part: list[dict], k: int, revision: str, shards_dir: Path) -> tuple[Path, Path]:
    """The reward and check files of shard `k`: names that hash its inputs and settings."""
    rm, s = recipe.scoring.reward_model, recipe.scoring
    reward_settings = [rm.model, revision, rm.kind, rm.max_length, rm.overlong, rm.dtype]
    check_settings = [s.math.model_dump(), s.code.model_dump()]
    content = stable_hash([(r["response_id"], r["text"]) for r in part])
    checks_in = stable_hash([(r["gold_answer"], r["tests"], r["setup"], r["prelude"]) for r in part])
    return (shards_dir / f"reward-{k:05d}-{stable_hash(content, reward_settings)}.parquet",
            shards_dir / f"checks-{k:05d}-{stable_hash(content, checks_in, check_settings)}.parquet")


def _shards(recipe: Recipe, rows: list[dict], revision: str, shards_dir: Path):
    """(rows, reward path, check path) per shard of a list of rows (`_load_rows`)."""
    size = recipe.scoring.shard_size
    # all samples of a prompt, from every source, in one shard: the reward model reads the prompt once
    rows = sorted(rows, key=lambda r: r["prompt_id"])
    for k in range(0, len(rows), size):
        part = rows[k : k + size]
        yield (part, *_shard_paths(recipe, part, k // size, revision, shards_dir))


def shard_plan(recipe: Recipe, inputs: Inputs, revision: str, shards_dir: Path):
    """The shards of `_shards`, one at a time: (table rows, rows as dicts, texts not valid UTF-8,
    reward path, check path). Only one shard's texts are Python strings at any time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    size = recipe.scoring.shard_size
    # Arrow's sort is stable, as `sorted` is, and orders UTF-8 bytes as Python orders code points
    pids = inputs.table.column("prompt_id").take(pa.array(inputs.kept, pa.int64()))
    order = inputs.kept[pc.sort_indices(pids).to_numpy()]
    for k in range(0, len(order), size):
        rows = order[k : k + size]
        part, non_utf8 = inputs.rows(rows)
        yield (rows, part, non_utf8, *_shard_paths(recipe, part, k // size, revision, shards_dir))


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
    shards, empty, non_utf8 = [], 0, 0
    for rows, part, bad_utf8, rp, cp in shard_plan(recipe, inputs, revision, shards_dir):
        shards.append((rows, rp, cp))
        empty += sum(not r["text"].strip() for r in part)
        non_utf8 += bad_utf8
    manifest.extra["non_utf8_text"] = non_utf8
    # a shard file cut short (full disk, killed copy) is work to redo, not an input to trust
    damaged = [set_aside(p) for _, rp, cp in shards for p in (rp, cp) if p.exists() and not readable(p)]
    reward_todo = [(inputs.rows(rows)[0], rp) for rows, rp, _ in shards if not rp.exists()]
    check_todo = [(rows, cp) for rows, _, cp in shards if not cp.exists()]

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    checkers = Checkers(recipe)
    try:
        with Progress(*columns) as bar:
            if reward_todo:
                task = bar.add_task("reward model", total=sum(len(p) for p, _ in reward_todo))
                _score_rewards(recipe, model_path, reward_todo, lambda n=1: bar.advance(task, n),
                               ray_address=ray_address)
            if check_todo:
                task = bar.add_task("math + code checks", total=sum(len(p) for p, _ in check_todo))
                for rows, path in check_todo:
                    _check_shard(checkers, inputs.rows(rows)[0], path, lambda n=1: bar.advance(task, n))
    finally:
        checkers.close()
    if checkers.isolation is not None:
        manifest.extra["sandbox"] = checkers.isolation

    # the texts are done with: the merge holds every score and check instead
    inputs.table = inputs.table.drop_columns(["text"])
    pa.default_memory_pool().release_unused()
    merged, reward_detail = _merge(inputs, shards)
    write_table(merged, out_dir / "scores.parquet", SCORES)
    expected = {p.name for _, rp, cp in shards for p in (rp, cp)}
    for stale in shards_dir.glob("*.parquet"):  # shards of earlier settings or inputs
        if stale.name not in expected:
            stale.unlink()
    manifest.rows_out = merged.num_rows
    manifest.outputs["scores.parquet"] = merged.num_rows
    manifest.extra.update(_counts(inputs, merged, reward_detail))
    manifest.extra["empty_responses"] = empty
    manifest.extra["shards"] = {"total": len(shards), "reward_computed": len(reward_todo),
                                "checks_computed": len(check_todo)}
    # shard files that could not be read, moved to shards/damaged/ and computed again
    manifest.extra["damaged_shards"] = [str(p.relative_to(out_dir)) for p in damaged]
    manifest.extra["summary"] = summary(merged)
    manifest.check_balance()
    manifest.save(out_dir)
    _print_summary(manifest.extra["summary"])
    return manifest


def _merge(inputs: Inputs, shards) -> tuple[pa.Table, pa.ChunkedArray]:
    """scores.parquet's table (kept responses in table order) joined in Arrow with the shard
    files, and the reward shards' `reward_detail` per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def gather(spec, paths):
        tables = [read(spec, p) for p in paths]
        return pa.concat_tables(tables) if tables else spec.schema().empty_table()

    rw = gather(REWARD_SHARD, [rp for _, rp, _ in shards])
    ck = gather(CHECK_SHARD, [cp for _, _, cp in shards])
    kept = pa.array(inputs.kept, pa.int64())
    t = inputs.table.select(["response_id", "prompt_id", "source", "truncated"]).take(kept)
    rid = t.column("response_id").combine_chunks()
    joined = []
    for table in (rw, ck):
        at = pc.index_in(rid, value_set=table.column("response_id").combine_chunks())
        if at.null_count:  # every kept response is in exactly one shard: a bug, not bad input
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
        for name, good in (("math", "correct"), ("code", "pass")):
            checked = idx[check[idx] == name]
            if len(checked):
                row[f"{name}_checked"] = len(checked)
                row[f"{name}_{good}_rate"] = int(np.sum(status[checked] == good)) / len(checked)
        out.append(row)
    return out


def _print_summary(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scores per source and domain")
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
