"""What SFT and DPO share: reading and checking the data sets, the length policy, the TRL config
(batch arithmetic, device and precision), LoRA/QLoRA, resuming, and the final model folder with its
`metrics.json`, model card and manifest.

Both stages run unchanged in one process or under `torchrun`/`accelerate launch`: every rank runs
the same function, the Trainer does the data parallelism, and only rank 0 writes the final files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.errors import FusechatError
from fusechat.recipe import RecipeError
from fusechat.run import Manifest, atomic_write_bytes, stage_dir

if TYPE_CHECKING:
    from datasets import Dataset

    from fusechat.recipe import Recipe, Training

ROLES = ("system", "user", "assistant")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def model_dir(recipe: Recipe, stage: str) -> Path:
    # models/<recipe name>/: the published targets share one run directory (and so one sampled,
    # scored and built data set) and must not overwrite each other's models.
    d = stage_dir(recipe, "models") / recipe.name / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    """One line per rank on stderr, prefixed so interleaved multi-process output stays readable."""
    print(f"[rank {rank()}/{world_size()}] {msg}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- data ------------------------------------------------------------------------------------------
def _check_messages(value: Any, where: str, *, roles: tuple[str, ...] = ROLES) -> None:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: expected a non-empty list of {{role, content}} messages, got {value!r:.80}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in roles:
            raise RecipeError(
                f"{where}[{j}]: expected {{role: {'|'.join(roles)}, content: str}}, got {m!r:.80}"
            )


def check_sft_row(row: dict[str, Any], where: str) -> None:
    _check_messages(row["messages"], f"{where}: messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
        raise RecipeError(f"{where}: messages: no assistant turn with content (nothing to learn from)")


def check_dpo_row(row: dict[str, Any], where: str) -> None:
    _check_messages(row["prompt"], f"{where}: prompt", roles=("system", "user", "assistant"))
    if row["prompt"][-1]["role"] != "user":
        raise RecipeError(f"{where}: prompt: the last message must be a user turn")
    for field in ("chosen", "rejected"):
        _check_messages(row[field], f"{where}: {field}", roles=("assistant",))
        if len(row[field]) != 1 or not row[field][0]["content"].strip():
            raise RecipeError(f"{where}: {field}: expected exactly one non-empty assistant message")


def has_rows(path: Path) -> bool:
    """A split file that exists and holds rows (a small build can leave a held-out split empty)."""
    import pyarrow.parquet as pq

    return path.exists() and pq.read_metadata(path).num_rows > 0


def load_split(path: Path, columns: tuple[str, ...], check, cache_dir: Path) -> Dataset:
    """A data set split as a `datasets.Dataset` (file-backed, so TRL's map/cache steps work), with
    every row checked first: a bad row is an error naming the file, the row and the field."""
    from datasets import Dataset

    import pyarrow.parquet as pq

    if not path.exists():
        raise RecipeError(f"{path}: missing; run `fusechat build` first")
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise RecipeError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(names)}")
    if file.metadata.num_rows == 0:
        raise RecipeError(f"{path}: no rows")
    i = 0  # batch by batch: the rows as Python objects take several times their size in Arrow
    for batch in file.iter_batches(batch_size=4096, columns=list(columns)):
        for row in batch.to_pylist():
            check(row, f"{path}: row {i}")
            i += 1
    return Dataset.from_parquet(str(path), columns=list(columns), cache_dir=str(cache_dir))


def apply_length_policy(
    ds: Dataset, lengths: list[int], prompt_lengths: list[int], cfg: Training, manifest: Manifest | None
) -> tuple[Dataset, dict[str, int]]:
    """Drop (or keep for TRL to truncate) rows longer than max_length, and count each outcome.

    `lengths` is the full tokenized length of a row (for DPO the longer of chosen and rejected),
    `prompt_lengths` the tokens before the first trained token: a row whose prompt alone fills
    max_length has nothing left to learn from after truncation and is always dropped (TRL would
    drop it silently; dropping it here keeps the books balanced).
    """
    counts = {"longer_than_max_length": 0, "prompt_fills_max_length": 0, "truncated": 0}
    keep = []
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        if p >= cfg.max_length:
            counts["prompt_fills_max_length"] += 1
        elif n > cfg.max_length and cfg.overlong == "drop":
            counts["longer_than_max_length"] += 1
        else:
            counts["truncated"] += n > cfg.max_length
            keep.append(i)
    if manifest is not None:
        manifest.rows_in += len(ds)
        manifest.rows_out += len(keep)
        manifest.drop("longer_than_max_length", counts["longer_than_max_length"])
        manifest.drop("prompt_fills_max_length", counts["prompt_fills_max_length"])
    if not keep:
        raise RecipeError(
            f"no rows left after the length policy (max_length {cfg.max_length}, overlong: {cfg.overlong}): {counts}"
        )
    return (ds if len(keep) == len(ds) else ds.select(keep)), counts


def token_length(tokenizer, messages: list[dict[str, str]], **kw) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def for_template(ds: Dataset, columns: tuple[str, ...], family: str, variables: dict[str, Any]) -> Dataset:
    """Rows as the target's chat template takes them, rendered as sampling renders them: Gemma-2's
    system fold (its template raises on a system turn), and the template variables (the recipe's
    date) in TRL's per-row `chat_template_kwargs`, which its trainers pass to every render."""
    from fusechat.templates import template_messages

    def fix(row: dict[str, Any]) -> dict[str, Any]:
        return {**{c: template_messages(row[c], family) for c in columns}, "chat_template_kwargs": variables}

    return ds.map(fix, desc="rows for the chat template")


# -- config --------------------------------------------------------------------------------------
def device_settings(cfg: Training, section: str) -> dict[str, Any]:
    """CPU: fp32, no gradient checkpointing (TRL defaults to bf16 + checkpointing, which fail or
    crawl there); CUDA: bf16 where the card has it, checkpointing on unless the recipe says no."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if cfg.bf16 is True and not bf16_ok:
        raise RecipeError(f"{section}.bf16: true, but this machine has no CUDA device with bf16; use auto or false")
    bf16 = bf16_ok if cfg.bf16 == "auto" else cfg.bf16
    gc = cuda if cfg.gradient_checkpointing == "auto" else cfg.gradient_checkpointing
    return {"use_cpu": not cuda, "bf16": bf16, "fp16": False, "gradient_checkpointing": gc}


def report_to(cfg: Training, section: str) -> list[str] | str:
    import importlib.util

    for name in cfg.report_to:
        if name not in TRACKERS:
            raise RecipeError(f"{section}.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise RecipeError(f"{section}.report_to: {name} is not installed (pip install {name})")
    return list(cfg.report_to) or "none"


def config_kwargs(cfg: Training, out: Path, section: str) -> dict[str, Any]:
    """TrainingArguments shared by SFTConfig and DPOConfig, all from the recipe section; its
    `trl_args` last (load_recipe refused the ones that would replace a setting made here)."""
    ws = world_size()
    per = cfg.per_device_batch_size
    if cfg.global_batch_size % (per * ws):
        raise RecipeError(
            f"{section}.global_batch_size ({cfg.global_batch_size}) is not a multiple of "
            f"per_device_batch_size ({per}) x processes ({ws})"
        )
    dev = device_settings(cfg, section)
    return {
        "output_dir": str(out / "checkpoints"),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": per,
        "per_device_eval_batch_size": per,
        "gradient_accumulation_steps": cfg.global_batch_size // (per * ws),
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": float(cfg.warmup_ratio),  # transformers 5: a float < 1 is a ratio
        "max_length": cfg.max_length,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_steps": max(1, min(10, cfg.save_steps)),
        "logging_first_step": True,
        "report_to": report_to(cfg, section),
        "seed": cfg.seed,
        "ddp_find_unused_parameters": False,
        "model_init_kwargs": {"dtype": "bfloat16" if dev["bf16"] else "float32"},
        **dev,
        **cfg.trl_args,
    }


def peft_config(cfg: Training, section: str, model_init_kwargs: dict[str, Any]):
    """LoRA (or QLoRA: 4-bit base, CUDA + bitsandbytes only) from the recipe; None for full training."""
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    if cfg.lora.load_in_4bit:
        import importlib.util

        import torch

        # everything that is missing in one line, so one fix round is enough
        missing = [what for what, ok in (
            ("a CUDA device (this machine has none)", torch.cuda.is_available()),
            ("bitsandbytes (not installed: pip install bitsandbytes; pinned in requirements/gpu.lock)",
             importlib.util.find_spec("bitsandbytes") is not None),
        ) if not ok]
        if missing:
            raise RecipeError(f"{section}.lora.load_in_4bit: QLoRA needs {' and '.join(missing)}")
        model_init_kwargs["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": model_init_kwargs["dtype"],
        }
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(ref: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# -- running -------------------------------------------------------------------------------------
def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished. The Trainer writes a checkpoint in place and
    `trainer_state.json` last, so a run killed mid-save leaves a folder without it; resuming from
    that folder would fail, so it is skipped."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def train_resuming(trainer, key: str) -> tuple[Any, int]:
    """Train, resuming from the newest complete checkpoint when one exists (an interrupted run
    continues where it stopped when the same command runs again). Returns the output and the step
    it resumed from (0 for a fresh start).

    `key` identifies what the checkpoints are of (settings + data). Checkpoints of another key are
    never resumed: after a recipe or its data changed, the run starts over and the earlier
    checkpoints move to `<checkpoints>.previous` (replacing an older such set, so at most one is
    kept besides the current run)."""
    ckpt_dir = Path(trainer.args.output_dir)
    marker = ckpt_dir / "fusechat-run-key.txt"
    last = last_complete_checkpoint(ckpt_dir)
    stale = last is not None and marker.exists() and marker.read_text().strip() != key
    trainer.accelerator.wait_for_everyone()  # every rank has looked before anything moves
    if stale:
        previous = ckpt_dir.with_name(ckpt_dir.name + ".previous")
        if trainer.accelerator.is_main_process:
            shutil.rmtree(previous, ignore_errors=True)
            ckpt_dir.rename(previous)
            log(f"checkpoints of other settings or data moved to {previous}; starting over")
        trainer.accelerator.wait_for_everyone()
        last = None
    if trainer.accelerator.is_main_process:
        atomic_write_bytes(marker, key.encode())
    resumed = int(last.name.split("-")[-1]) if last else 0
    if last:
        log(f"resuming from {last} (step {resumed})")
    return trainer.train(resume_from_checkpoint=str(last) if last else None), resumed


def run_key(cfg: Training, model: str, data: dict[str, Path]) -> str:
    """What a run's checkpoints depend on: the stage's settings, the starting model, the data."""
    from fusechat.run import stable_hash

    return stable_hash(cfg.model_dump(mode="json"), model, {s: file_sha256(p) for s, p in data.items()})


def gather_ranks(trainer) -> list[int]:
    """The rank of every process that took part, collected over the process group itself, so the
    record shows the ranks really ran together (not merely that WORLD_SIZE was set)."""
    from accelerate.utils import gather_object

    return sorted(gather_object([trainer.accelerator.process_index]))


def save_final(trainer, out: Path, base_ref: str, dtype: str) -> None:
    """The trained weights as a plain model folder. LoRA adapters are merged into a full-precision
    copy of the base so later stages (DPO, vLLM evaluation) load one ordinary folder."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        trainer.save_model(str(out))
        return
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    if trainer.accelerator.is_main_process:
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=getattr(torch, dtype))
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out))
        trainer.processing_class.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()


def write_outputs(
    out: Path,
    recipe: Recipe,
    manifest: Manifest,
    *,
    stage: str,
    base_model: str,
    data: dict[str, Path],
    rows: dict[str, int],
    cfg: Training,
    metrics: dict[str, Any],
) -> None:
    """metrics.json, the model card (which data and recipe made this model) and the manifest."""
    from rich.console import Console
    from rich.table import Table

    files = {
        split: {"path": str(p), "rows": rows[split], "sha256": file_sha256(p)} for split, p in data.items()
    }
    metrics = {"stage": stage, "recipe_hash": manifest.recipe_hash, "data": files, **metrics}
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())

    hp = cfg.model_dump(mode="json")
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_model}",
        "tags: [fusechat, trl, " + stage + "]",
        "---",
        f"# {recipe.name}: {stage.upper()}",
        "",
        f"Trained by `fusechat {stage}` from `{base_model}` with the recipe `{recipe.name}` "
        f"(content hash `{manifest.recipe_hash}`).",
        "",
        "## Data",
        "",
        "| split | file | rows | sha256 |",
        "|---|---|---|---|",
        *(f"| {s} | `{f['path']}` | {f['rows']} | `{f['sha256']}` |" for s, f in files.items()),
        "",
        f"Rows in {manifest.rows_in}, used {manifest.rows_out}, dropped {manifest.dropped or 0}.",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in hp.items()),
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float, str)) and k != "stage"),
        "",
    ]
    atomic_write_bytes(out / "README.md", "\n".join(lines).encode())
    manifest.check_balance()
    manifest.save(out)

    table = Table(title=f"fusechat {stage}: {recipe.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(metrics.items()):
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(table)


def module_main(stage: str, fn) -> None:
    """`python -m fusechat.train.<stage> RECIPE [--run-dir DIR]`: the entry point torchrun and
    accelerate launch start on every rank."""
    import argparse

    from fusechat.recipe import load_recipe

    p = argparse.ArgumentParser(prog=f"python -m fusechat.train.{stage}")
    p.add_argument("recipe")
    p.add_argument("--run-dir", default=None)
    args = p.parse_args()
    try:
        fn(load_recipe(args.recipe, run_dir=args.run_dir))
    except FusechatError as e:  # a recipe or an input table that cannot be used
        print(str(e), file=sys.stderr)
        sys.exit(2)
    # Wait for every rank, then tear the process group down before the interpreter exits. Rank 0
    # writes the outputs after the others are done; a rank that exits with the group still up can
    # abort (SIGABRT in gloo's teardown) while rank 0 is writing, and the launcher then kills rank 0.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
