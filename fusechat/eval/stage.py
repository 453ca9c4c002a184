"""`run_eval(recipe)`: every source and target model on the held-out sets; `fusechat eval` comes here.

Models: each source (its own engine, options and chat template), the base target
(`recipe.target`), and the SFT and DPO targets when `models/<recipe name>/{sft,dpo}/` exist (the
targets through `eval.engine` / `eval.engine_options`). Generation reuses the sampling stage's
machinery: the held-out prompts become a prompt table under `eval/work/`, every model is a source
of a derived recipe, and `fusechat.sampling.stage.sample_source` runs it in a worker process of
its own (memory freed between models, one-BOS rendering, retries). Shards are content-addressed by
prompts, model revision and settings, so a rerun regenerates nothing already on disk.

Then every response is checked (math, code, exact answer) by the score stage's checkers
(`fusechat.scoring.checks`: the recipe's isolation, limits and workers), scored by the recipe's
reward model (`fusechat.scoring.reward`), and summarized: `generations.parquet`,
`results.parquet`, `table.md`, `gains.png`, AlpacaEval 2 and Arena-Hard answer files,
`manifest.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusechat.errors import IncompleteError
from fusechat.eval.sets import Item, load_sets
from fusechat.recipe import Recipe, RecipeError, Sampling, Source
from fusechat.run import Manifest, folder_fingerprint, stable_hash, stage_dir, write_table
from fusechat.tables import DOMAINS, EVAL_GENERATIONS, EVAL_RESULTS, EVAL_REWARDS, PROMPTS, read
from fusechat.scoring.checks import Checkers
from fusechat.scoring.reward import recipe_scorer, resolve_model

BASE = "target-base"
TRAINED = ("sft", "dpo")
UNAVAILABLE = "model_unavailable"


EvalError = IncompleteError  # some models or scores are missing; what exists is written


def item_key(item: Item) -> str:
    return stable_hash(item.set, item.row_id)


def eval_sampling(recipe: Recipe) -> Sampling:
    # one setting for every model: greedy by default, no top-p/top-k cut, no repetition penalty
    return Sampling(temperature=recipe.eval.temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                    max_tokens=recipe.eval.max_tokens)


def eval_models(recipe: Recipe) -> list[Source]:
    """The models to evaluate, as sources of the derived recipe (row order of the table)."""
    sampling, every = eval_sampling(recipe), {d: 1 for d in DOMAINS}
    models = ([s.model_copy(update={"sampling": sampling, "responses": every}) for s in recipe.sources]
              if recipe.eval.sources else [])
    target = recipe.target

    def as_source(name: str, model: str, revision: str | None) -> Source:
        return Source(name=name, model=model, revision=revision, family=target.family, engine=recipe.eval.engine,
                      engine_options=recipe.eval.engine_options, sampling=sampling, responses=every)

    models.append(as_source(BASE, target.model, target.revision))
    for stage in TRAINED:
        folder = recipe.run_path() / "models" / recipe.name / stage  # read only: no stage_dir, which creates it
        if (folder / "config.json").exists():
            models.append(as_source(f"target-{stage}", str(folder), folder_fingerprint(folder)))
    names = [m.name for m in models]
    for name in set(names):
        if names.count(name) > 1:
            raise RecipeError(f"sources: a source is named {name!r}, which the evaluation uses for a target model")
    return models


def work_recipe(recipe: Recipe, models: list[Source]) -> Recipe:
    """The derived recipe whose run directory is `eval/work/` and whose sources are the models."""
    data = recipe.model_dump(mode="json") | {"base_dir": recipe.base_dir}
    data["run_dir"] = str(stage_dir(recipe, "eval") / "work")
    data["sources"] = [m.model_dump(mode="json") for m in models]
    return Recipe.model_validate(data)


def write_prompt_table(work: Recipe, items: list[Item]) -> None:
    rows = [{"prompt_id": item_key(it), "dataset": it.set, "domain": it.domain,
             "messages": [{"role": "user", "content": it.prompt}], "gold_answer": it.gold,
             "tests": it.tests or None, "meta": "{}"} for it in items]
    write_table(PROMPTS.from_rows(rows), stage_dir(work, "prompts") / "prompts.parquet", PROMPTS)


def generate(work: Recipe, console, launchers: dict[str, Any] | None = None
             ) -> tuple[dict[str, str], dict[str, list], dict[str, Any]]:
    """Missing shards of every model; returns revisions, shards and outcomes (or errors) per model.
    With `launchers` (fusechat.cluster.source_launchers), each model's worker runs as a Ray task
    wherever its GPUs are free, the models side by side."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fusechat.sampling.shards import load_prompts, model_revision, plan_source, shard_path
    from fusechat.sampling.stage import sample_source

    prompts = load_prompts(work)
    revisions, shards, outcomes = {}, {}, {}
    progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    with progress:
        tasks = {}
        for source in work.sources:
            try:
                revisions[source.name] = model_revision(work, source)
            except ValueError as e:
                outcomes[source.name] = f"{source.name} (model {source.model}): {e}"
                shards[source.name] = []
                continue
            shards[source.name] = plan_source(work, source, prompts, revisions[source.name])
            done = sum(len(s.prompt_ids) for s in shards[source.name] if shard_path(work, s).exists())
            tasks[source.name] = progress.add_task(source.name, total=prompts.num_rows, completed=done, note="")

        def on_event(ev: dict[str, Any]) -> None:
            task = tasks[ev["source"]]
            if ev["event"] == "loaded":
                progress.update(task, note=f"loaded in {ev['seconds']:.0f}s")
            elif ev["event"] == "shard":
                progress.update(task, advance=ev["prompts"])
            elif ev["event"] == "retry":
                progress.update(task, note=f"retrying: {ev['message'][:50]}")

        todo = [s.name for s in work.sources if s.name in tasks]
        if launchers is None:
            for name in todo:
                outcomes[name] = sample_source(work, name, shards[name], revisions[name], on_event, retries=1)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(len(todo), 1)) as pool:
                running = {name: pool.submit(sample_source, work, name, shards[name], revisions[name], on_event, 1,
                                             launchers[name]) for name in todo}
            outcomes.update({name: f.result() for name, f in running.items()})
    return revisions, shards, outcomes


def collect(work: Recipe, items: dict[str, Item], shards: dict[str, list], outcomes: dict[str, Any],
            man: Manifest) -> list[dict]:
    """Generated rows of every model from its shard files; what is missing is dropped by reason."""
    from fusechat.sampling.shards import shard_path, shard_rows
    from fusechat.sampling.stage import ENGINE_ERROR_REASON, LOAD_FAILED_REASON

    rows = []
    for source in work.sources:
        expected = len(items)
        man.rows_in += expected
        outcome = outcomes.get(source.name)
        if isinstance(outcome, str):
            man.drop(UNAVAILABLE, expected)
            continue
        answered = 0
        for shard in shards[source.name]:
            path = shard_path(work, shard)
            if not path.exists():
                reason = LOAD_FAILED_REASON if outcome.status == LOAD_FAILED_REASON else ENGINE_ERROR_REASON
                man.drop(reason, len(shard.prompt_ids))
                answered += len(shard.prompt_ids)
                continue
            table, dropped, _ = shard_rows(work, shard)
            for reason, pids in dropped.items():
                man.drop(reason, len(pids))
                answered += len(pids)
            for r in table.to_pylist():
                item = items[r["prompt_id"]]
                rows.append({"model": source.name, "set": item.set, "prompt_id": item.row_id, "column": item.column,
                             "domain": item.domain, "text": r["text"], "finish_reason": r["finish_reason"],
                             "completion_tokens": r["completion_tokens"], "model_revision": r["model_revision"],
                             "_key": r["prompt_id"]})
                answered += 1
        man.drop("fewer_samples_than_requested", expected - answered)
    man.rows_out = len(rows)
    return rows


def score_rewards(recipe: Recipe, work: Recipe, rows: list[dict], items: dict[str, Item], console) -> str | None:
    """Reward of every non-empty response, cached per model under eval/work/rewards/; returns an error or None."""
    for r in rows:
        r["reward"] = None
    try:
        model_path, rm_revision = resolve_model(recipe)
    except Exception as e:
        return f"reward model {recipe.scoring.reward_model.model} unavailable: {type(e).__name__}: {e}"
    settings = recipe.scoring.reward_model.model_dump(mode="json")
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    scorer = None
    from rich.progress import Progress

    with Progress(console=console) as progress:
        task = progress.add_task("reward", total=len(rows))
        for model, mrows in by_model.items():
            key = stable_hash(rm_revision, settings, [(r["_key"], r["text"]) for r in mrows])
            cache = stage_dir(work, "scores") / "rewards" / f"{model}-{key}.parquet"
            if cache.exists():
                got = dict(zip(*read(EVAL_REWARDS, cache).select(["key", "reward"]).to_pydict().values()))
                for r in mrows:
                    r["reward"] = got.get(r["_key"])
                progress.advance(task, len(mrows))
                continue
            todo = [r for r in mrows if r["text"].strip()]
            progress.advance(task, len(mrows) - len(todo))
            if scorer is None:
                scorer = recipe_scorer(recipe, model_path)
            convs = [[{"role": "user", "content": items[r["_key"]].prompt}, {"role": "assistant", "content": r["text"]}]
                     for r in todo]
            for r, o in zip(todo, scorer.score(convs, progress=lambda n: progress.advance(task, n))):
                r["reward"] = o.score
            write_table(EVAL_REWARDS.from_rows({"key": r["_key"], "reward": r["reward"]} for r in mrows), cache,
                        EVAL_REWARDS)
    return None


def write_exports(out_dir: Path, rows: list[dict], items: dict[str, Item], revisions: dict[str, str]) -> dict[str, int]:
    from fusechat.eval.export import alpacaeval_rows, arena_hard_rows, write_alpacaeval, write_arena_hard

    written = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        alpaca = [(items[r["_key"]].row, r["text"]) for r in mine if r["set"] == "alpacaeval2"]
        if alpaca:
            path = write_alpacaeval(out_dir, model, alpacaeval_rows(model, alpaca))
            written[str(path.relative_to(out_dir))] = len(alpaca)
        arena = [(items[r["_key"]].row, r["text"], r["completion_tokens"]) for r in mine if r["set"] == "arena_hard"]
        if arena:
            path = write_arena_hard(out_dir, model, arena_hard_rows(model, revisions.get(model, ""), arena))
            written[str(path.relative_to(out_dir))] = len(arena)
    return written


def _generations_table(rows: list[dict]):
    return EVAL_GENERATIONS.from_rows({k: r[k] for k in EVAL_GENERATIONS.names} for r in rows)


def run_eval(recipe: Recipe, ray_address: str | None = None) -> Manifest:
    """With `ray_address`, the models generate on that Ray cluster (fusechat.cluster); checks,
    rewards and the report run here."""
    recipe.require("eval", "target")
    from rich.console import Console

    from fusechat.eval import report
    from fusechat.eval.checks import check_all

    console = Console(stderr=True)
    all_items = load_sets(recipe)  # every file checked before any model starts
    items = {item_key(it): it for it in all_items}
    models = eval_models(recipe)
    work = work_recipe(recipe, models)
    write_prompt_table(work, all_items)
    man = Manifest.start(recipe, "eval")
    launchers = None
    if ray_address:  # checked before any model starts: a model no node can hold fails here
        from fusechat.cluster import source_launchers

        launchers = source_launchers(work, ray_address)
    revisions, shards, outcomes = generate(work, console, launchers)
    rows = collect(work, items, shards, outcomes, man)

    from rich.progress import Progress

    with Progress(console=console) as progress, Checkers(recipe) as checkers:
        task = progress.add_task("checks", total=len(rows))
        verdicts = check_all(recipe, [(items[r["_key"]], r["text"]) for r in rows], lambda: progress.advance(task),
                             checkers)
    for r, v in zip(rows, verdicts):
        r["correct"], r["check_status"], r["check_detail"] = v.correct, v.status, v.detail
    reward_error = score_rewards(recipe, work, rows, items, console)

    out_dir = stage_dir(recipe, "eval")
    names = [m.name for m in models]
    columns = list(dict.fromkeys(it.column for it in all_items if it.column))
    totals = {c: sum(1 for it in all_items if it.column == c) for c in columns}
    results = report.metrics(rows, columns, totals, BASE)
    write_table(_generations_table(rows), out_dir / "generations.parquet", EVAL_GENERATIONS)
    write_table(EVAL_RESULTS.from_rows(results), out_dir / "results.parquet", EVAL_RESULTS)
    header, table = report.table_rows(results, names, columns)
    title = f"fusechat eval: {recipe.name}"
    notes, audit_warnings = report.audit_notes(recipe.run_path() / "datasets", rows)
    (out_dir / "table.md").write_text(report.markdown(header, table, title, notes))
    report.plot(results, names, columns, out_dir / "gains.png")
    exports = write_exports(out_dir, rows, items, revisions)

    failures = {n: (o if isinstance(o, str) else o.message) for n, o in outcomes.items()
                if isinstance(o, str) or o.status != "done"}
    if reward_error:
        failures["reward_model"] = reward_error
    man.outputs = {"generations.parquet": len(rows), "results.parquet": len(results), **exports}
    man.models = dict(revisions)
    man.extra = {
        "sets": {s: sum(1 for it in all_items if it.set == s) for s in dict.fromkeys(it.set for it in all_items)},
        "computed_shards": {n: (o.computed if not isinstance(o, str) else 0) for n, o in outcomes.items()},
        "unscored_rewards": sum(r["reward"] is None for r in rows),
        "failures": failures,
    }
    if checkers.isolation is not None:
        man.extra["sandbox"] = checkers.isolation
    man.check_balance()
    man.save(out_dir)
    Console().print(report.rich_table(header, table, title))
    for w in audit_warnings:
        Console(stderr=True).print(f"[bold red]WARNING: {w}")
    if failures:
        raise EvalError("evaluation incomplete; what exists is written and a rerun computes only the rest:\n"
                        + "\n".join(f"- {k}: {v}" for k, v in failures.items()))
    return man
