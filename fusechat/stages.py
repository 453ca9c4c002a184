"""Every stage of a run, declared once: its command, function, folder and tables.

The CLI makes one command per stage from this list, `fusechat run` and the Prefect flow `fuse` run
`PIPELINE` in order, and `fusechat.tables` names the command that writes a missing table from the
`outputs` here. A stage function takes a validated Recipe and returns a Manifest; it is imported
only when it runs, so reading this list costs nothing (`fusechat --help` stays instant).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str  # the command: `fusechat <name>`
    function: str  # "module:function"
    folder: str  # the run folder it writes (`<run_dir>/<folder>/`)
    inputs: tuple[str, ...]  # tables it reads (names in fusechat.tables.TABLES)
    outputs: tuple[str, ...]  # tables it writes
    doc: str  # one line: the command's help

    def load(self) -> Callable[..., Any]:
        module, func = self.function.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prompts", "fusechat.prompts.stage:build_prompts", "prompts", (), ("prompts", "dropped_prompts"),
          "Read and filter the recipe's prompt data sets (data sets -> prompts)."),
    Stage("sample", "fusechat.sampling.stage:run_sample", "responses", ("prompts",), ("responses",),
          "Sample responses from every source model (prompts -> responses; builds prompts first when missing or stale)."),
    Stage("score", "fusechat.scoring.stage:run_score", "scores", ("prompts", "responses"), ("scores",),
          "Score responses: reward model, math answers, code tests (responses -> scores)."),
    Stage("build", "fusechat.build:run_build", "datasets", ("prompts", "responses", "scores"),
          ("decisions", "sft", "dpo"),
          "Build the SFT and DPO data sets by the selection rules (scores -> datasets)."),
    Stage("publish", "fusechat.publish:run_publish", "datasets", ("sft", "dpo"), (),
          "Write the data sets in hub layout with cards; upload them when a token is set."),
    Stage("sft", "fusechat.train.sft:run_sft", "models", ("sft",), (),
          "Supervised fine-tuning of the target on the SFT set (--nproc/--config for several processes)."),
    Stage("dpo", "fusechat.train.dpo:run_dpo", "models", ("dpo",), (),
          "DPO of the SFT model on the DPO set (--nproc/--config for several processes)."),
    Stage("eval", "fusechat.eval.stage:run_eval", "eval", (), ("eval_generations", "eval_results"),
          "Evaluate sources and targets on the held-out sets."),
)}

# `fusechat run` and the flow `fuse`: every stage, in order
PIPELINE: tuple[str, ...] = tuple(STAGES)
# the run folders, in the order stages first write them
FOLDERS: tuple[str, ...] = tuple(dict.fromkeys(s.folder for s in STAGES.values()))


def writer_of(table: str) -> Stage | None:
    """The stage whose outputs include `table`."""
    return next((s for s in STAGES.values() if table in s.outputs), None)
