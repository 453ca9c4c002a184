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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.errors import InputError
from fusechat.run import Manifest, set_aside, stable_hash, stage_dir, write_table
from fusechat.tables import CHECK_SHARD, PROMPTS, RESPONSES, REWARD_SHARD, SCORES, read, readable
from fusechat.scoring.checks import PRELUDE_KEY, Checkers
from fusechat.scoring.reward import recipe_scorer, resolve_model

if TYPE_CHECKING:
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


def _load_rows(recipe: Recipe, manifest: Manifest) -> list[dict[str, Any]]:
    """Responses joined with their prompts; bad rows dropped by reason, bad tables rejected."""
    import pyarrow as pa

    run = recipe.run_path()
    prompts = _load_prompts(run / "prompts" / "prompts.parquet")
    path = run / "responses" / "responses.parquet"
    table = read(RESPONSES, path, RESPONSE_COLUMNS)
    manifest.rows_in = table.num_rows
    # read text as bytes: a writer that put non-UTF-8 bytes in the column must not stop the stage
    raw_text = table.column("text").cast(pa.binary()).to_pylist()
    seen: set[str] = set()
    rows = []
    non_utf8 = 0
    for i, r in enumerate(table.select(["response_id", "prompt_id", "source", "truncated"]).to_pylist()):
        if r["response_id"] in seen:
            manifest.drop("duplicate_response_id")
            continue
        prompt = prompts.get(r["prompt_id"])
        if prompt is None:
            manifest.drop("unknown_prompt_id")
            continue
        seen.add(r["response_id"])
        raw = raw_text[i] or b""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            non_utf8 += 1
        rows.append({
            **r, "truncated": bool(r["truncated"]), "text": text, "domain": prompt["domain"],
            "messages": prompt["messages"],  # shared by the prompt's responses, not copied
            "gold_answer": prompt["gold_answer"], "tests": prompt["tests"] or [],
            "setup": prompt["meta"].get("test_setup", "") or "",
            "prelude": prompt["meta"].get(PRELUDE_KEY, "") or "",
        })
    manifest.extra["non_utf8_text"] = non_utf8
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
                   devices: list[str] | None = None) -> None:
    """Missing reward shards; with several devices, one spawned process per device."""
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
def _shards(recipe: Recipe, rows: list[dict], revision: str, shards_dir: Path):
    rm, s = recipe.scoring.reward_model, recipe.scoring
    reward_settings = [rm.model, revision, rm.kind, rm.max_length, rm.overlong, rm.dtype]
    check_settings = [s.math.model_dump(), s.code.model_dump()]
    size = s.shard_size
    # all samples of a prompt, from every source, in one shard: the reward model reads the prompt once
    rows = sorted(rows, key=lambda r: r["prompt_id"])
    for k in range(0, len(rows), size):
        part = rows[k : k + size]
        content = stable_hash([(r["response_id"], r["text"]) for r in part])
        checks_in = stable_hash([(r["gold_answer"], r["tests"], r["setup"], r["prelude"]) for r in part])
        yield (part, shards_dir / f"reward-{k // size:05d}-{stable_hash(content, reward_settings)}.parquet",
               shards_dir / f"checks-{k // size:05d}-{stable_hash(content, checks_in, check_settings)}.parquet")


def run_score(recipe: Recipe) -> Manifest:
    import pyarrow as pa
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    manifest = Manifest.start(recipe, "scores")
    out_dir = stage_dir(recipe, "scores")
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(exist_ok=True)
    rows = _load_rows(recipe, manifest)
    model_path, revision = resolve_model(recipe)
    manifest.models[recipe.scoring.reward_model.model] = revision
    shards = list(_shards(recipe, rows, revision, shards_dir))
    # a shard file cut short (full disk, killed copy) is work to redo, not an input to trust
    damaged = [set_aside(p) for _, rp, cp in shards for p in (rp, cp) if p.exists() and not readable(p)]
    reward_todo = [(part, rp) for part, rp, _ in shards if not rp.exists()]
    check_todo = [(part, cp) for part, _, cp in shards if not cp.exists()]

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    checkers = Checkers(recipe)
    try:
        with Progress(*columns) as bar:
            if reward_todo:
                task = bar.add_task("reward model", total=sum(len(p) for p, _ in reward_todo))
                _score_rewards(recipe, model_path, reward_todo, lambda n=1: bar.advance(task, n))
            if check_todo:
                task = bar.add_task("math + code checks", total=sum(len(p) for p, _ in check_todo))
                for part, path in check_todo:
                    _check_shard(checkers, part, path, lambda n=1: bar.advance(task, n))
    finally:
        checkers.close()
    if checkers.isolation is not None:
        manifest.extra["sandbox"] = checkers.isolation

    merged, reward_details = _merge(rows, shards)
    write_table(pa.Table.from_pylist(merged, schema=SCORES.schema()), out_dir / "scores.parquet", SCORES)
    expected = {p.name for _, rp, cp in shards for p in (rp, cp)}
    for stale in shards_dir.glob("*.parquet"):  # shards of earlier settings or inputs
        if stale.name not in expected:
            stale.unlink()
    manifest.rows_out = len(merged)
    manifest.outputs["scores.parquet"] = len(merged)
    manifest.extra.update(_counts(rows, merged, reward_details))
    manifest.extra["shards"] = {"total": len(shards), "reward_computed": len(reward_todo),
                                "checks_computed": len(check_todo)}
    # shard files that could not be read, moved to shards/damaged/ and computed again
    manifest.extra["damaged_shards"] = [str(p.relative_to(out_dir)) for p in damaged]
    manifest.extra["summary"] = summary(merged)
    manifest.check_balance()
    manifest.save(out_dir)
    _print_summary(manifest.extra["summary"])
    return manifest


def _merge(rows: list[dict], shards) -> tuple[list[dict], list[str]]:
    """Rows of scores.parquet, and why each reward is null ("" where it is not)."""
    rewards, checks = {}, {}
    for _, rp, cp in shards:
        rewards.update({r["response_id"]: r for r in read(REWARD_SHARD, rp).to_pylist()})
        checks.update({r["response_id"]: r for r in read(CHECK_SHARD, cp).to_pylist()})
    merged, reward_details = [], []
    for r in rows:
        rw, ck = rewards[r["response_id"]], checks[r["response_id"]]
        detail = ck["check_detail"]
        reward_details.append(rw["reward_detail"] if rw["reward"] is None else "")
        if rw["reward"] is None:
            detail = f"reward not computed: {rw['reward_detail']}" + (f"; {detail}" if detail else "")
        merged.append({
            "response_id": r["response_id"], "prompt_id": r["prompt_id"], "source": r["source"],
            "domain": r["domain"], "reward": rw["reward"], "objective_rewards": rw["objective_rewards"],
            "check": ck["check"], "check_status": ck["check_status"], "check_detail": detail,
            "truncated": r["truncated"] or rw["reward_truncated"],
        })
    return merged, reward_details


def _counts(rows: list[dict], merged: list[dict], reward_details: list[str]) -> dict[str, Any]:
    status: dict[str, Counter] = defaultdict(Counter)
    for m in merged:
        status[m["check"]][m["check_status"]] += 1
    # every reason starts with a fixed tag before its first colon ("overlong", "empty response")
    null_reasons = Counter(d.split(":")[0] for d in reward_details if d)
    return {
        "empty_responses": sum(not r["text"].strip() for r in rows),
        "reward_null": sum(m["reward"] is None for m in merged),
        "reward_null_reasons": dict(null_reasons),
        "reward_input_truncated": sum(m["truncated"] and not r["truncated"] for r, m in zip(rows, merged)),
        "check_status": {k: dict(v) for k, v in status.items()},
    }


def summary(merged: list[dict]) -> list[dict[str, Any]]:
    """Per source and domain: responses, mean reward, null rewards, math correct and code pass rates."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for m in merged:
        groups[(m["source"], m["domain"])].append(m)
    out = []
    for (source, domain), ms in sorted(groups.items()):
        rewards = [m["reward"] for m in ms if m["reward"] is not None]
        row: dict[str, Any] = {"source": source, "domain": domain, "responses": len(ms),
                               "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                               "reward_null": len(ms) - len(rewards)}
        for check, good in (("math", "correct"), ("code", "pass")):
            checked = [m for m in ms if m["check"] == check]
            if checked:
                row[f"{check}_checked"] = len(checked)
                row[f"{check}_{good}_rate"] = sum(m["check_status"] == good for m in checked) / len(checked)
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
