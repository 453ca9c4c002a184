"""The `fusechat` command: a thin layer that loads the recipe and calls a stage function.

One command per stage of `fusechat.stages.STAGES`; stage functions live in their own modules and
are imported only when their command runs, so `fusechat --help` never pays for torch or vllm.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from fusechat.errors import FusechatError
from fusechat.recipe import RecipeError, load_recipe
from fusechat.stages import STAGES

app = typer.Typer(
    help="Fuse several chat models into one small model (the FuseChat-3.0 recipe).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Check and inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

RecipeArg = Annotated[str, typer.Argument(help="recipe YAML file")]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", help="override the recipe's run_dir")]


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(msg, err=True)
    raise typer.Exit(code)


def _load(recipe: str, run_dir: str | None):
    try:
        return load_recipe(recipe, run_dir=run_dir)
    except RecipeError as e:
        _fail(str(e))


def _call(fn, recipe: str, run_dir: str | None, **kwargs) -> None:
    r = _load(recipe, run_dir)
    try:
        fn(r, **kwargs)
    except FusechatError as e:
        _fail(str(e))


def _run_stage(stage: str, recipe: str, run_dir: str | None, **kwargs) -> None:
    _call(STAGES[stage].load(), recipe, run_dir, **kwargs)


def _plain_command(stage: str):
    def command(recipe: RecipeArg, run_dir: RunDirOpt = None) -> None:
        _run_stage(stage, recipe, run_dir)

    return command


def _train_command(stage: str):
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        nproc: Annotated[int, typer.Option(help="processes per machine (one per GPU)")] = 1,
        config: Annotated[Optional[str], typer.Option(help="accelerate config: ddp, fsdp, zero3 or a YAML file")] = None,
        nnodes: Annotated[int, typer.Option(help="machines taking part")] = 1,
        node_rank: Annotated[int, typer.Option(help="this machine's rank")] = 0,
        master_addr: Annotated[str, typer.Option(help="address of the rank-0 machine")] = "127.0.0.1",
        master_port: Annotated[int, typer.Option(help="port on the rank-0 machine")] = 29500,
    ) -> None:
        if nproc == 1 and nnodes == 1 and config is None:
            _run_stage(stage, recipe, run_dir)
            return
        # Several processes: re-launch this stage under torchrun/accelerate (fusechat.train.launch).
        from fusechat.train.launch import main as launch

        _load(recipe, run_dir)  # fail fast, before spawning processes, on a bad recipe
        argv = [stage, recipe, "--nproc", str(nproc), "--nnodes", str(nnodes), "--node-rank", str(node_rank),
                "--master-addr", master_addr, "--master-port", str(master_port)]
        argv += ["--run-dir", run_dir] if run_dir else []
        argv += ["--config", config] if config else []
        raise typer.Exit(launch(argv))

    return command


def _publish_command(stage: str):
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        dry_run: Annotated[
            Optional[bool],
            typer.Option("--dry-run/--upload", help="only show what would be uploaded / require an upload; default: upload when a token and network are available"),
        ] = None,
    ) -> None:
        _run_stage(stage, recipe, run_dir, dry_run=dry_run)

    return command


def _cluster_command(stage: str):
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        ray_address: Annotated[
            Optional[str], typer.Option(help="run on this Ray cluster (head host:port, or auto); default: this machine")
        ] = None,
        tasks_per_source: Annotated[int, typer.Option(help="with --ray-address: Ray tasks per source")] = 1,
    ) -> None:
        _run_stage(stage, recipe, run_dir, ray_address=ray_address, tasks_per_source=tasks_per_source)

    return command


def _score_command(stage: str):
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        ray_address: Annotated[
            Optional[str], typer.Option(help="score rewards on this Ray cluster (head host:port, or auto), a GPU per scorer")
        ] = None,
    ) -> None:
        _run_stage(stage, recipe, run_dir, ray_address=ray_address)

    return command


def _eval_command(stage: str):
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        ray_address: Annotated[
            Optional[str], typer.Option(help="generate on this Ray cluster (head host:port, or auto); default: this machine")
        ] = None,
    ) -> None:
        _run_stage(stage, recipe, run_dir, ray_address=ray_address)

    return command


# one command per stage, in pipeline order; the stages with options of their own get their own form
_FORMS = {"sft": _train_command, "dpo": _train_command, "publish": _publish_command, "sample": _cluster_command,
          "score": _score_command, "eval": _eval_command}
for _stage in STAGES.values():
    _command = _FORMS.get(_stage.name, _plain_command)(_stage.name)
    _command.__doc__ = _stage.doc
    app.command(_stage.name)(_command)


@app.command("run")
def run(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    skip_doctor: Annotated[bool, typer.Option("--skip-doctor", help="start without the preflight checks")] = False,
) -> None:
    """Run every stage in order (the whole recipe), after `fusechat doctor`'s checks."""
    from fusechat.pipeline import run_all

    if not skip_doctor:
        from fusechat.doctor import doctor as preflight

        blockers = preflight(_load(recipe, run_dir))
        if blockers:
            _fail(f"fusechat run: doctor found {blockers} blocker(s); nothing was run (fix them, or --skip-doctor)", 1)
    _call(run_all, recipe, run_dir)


@app.command("doctor")
def doctor(recipe: RecipeArg, run_dir: RunDirOpt = None) -> None:
    """Check the recipe's models in seconds, before GPU hours: templates, BOS, stop ids, trained tokens,
    ArmoRM's gating pattern, lengths, revisions, engine options, memory (tokenizers and configs only)."""
    from fusechat.doctor import doctor as preflight

    if preflight(_load(recipe, run_dir)):
        raise typer.Exit(1)


@app.command("prune")
def prune(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, remove nothing")] = False,
) -> None:
    """Remove the sampling and scoring shards the recipe no longer uses (other settings, sources or
    prompts), and say how many files and MB; stage runs themselves never delete finished work."""
    from fusechat.prune import prune as remove_unused

    _call(remove_unused, recipe, run_dir, dry_run=dry_run)


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, run_dir: RunDirOpt = None) -> None:
    """Validate a recipe: schema, values and local paths."""
    r = _load(recipe, run_dir)
    for note in r._notes:
        typer.echo(f"{recipe}: note: {note}", err=True)
    typer.echo(f"{recipe}: ok (recipe {r.name!r}, hash {r.content_hash()[:12]})")


@recipe_app.command("docs")
def recipe_docs() -> None:
    """Print the recipe reference (every field, type, default and meaning) as markdown; docs/recipe.md is this."""
    from fusechat.recipe import reference_markdown

    typer.echo(reference_markdown(), nl=False)


@recipe_app.command("show")
def recipe_show(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the resolved recipe as JSON")] = False,
) -> None:
    """Print the fully resolved recipe (defaults filled in) with its content hash."""
    r = _load(recipe, run_dir)
    data = {"recipe_hash": r.content_hash(), "recipe": r.model_dump(mode="json")}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        import yaml

        typer.echo(f"# recipe hash {data['recipe_hash']}")
        typer.echo(yaml.safe_dump(data["recipe"], sort_keys=False).rstrip())


def main() -> None:  # pragma: no cover - console entry point alias
    sys.exit(app())
