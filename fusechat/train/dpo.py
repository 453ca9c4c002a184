"""`fusechat dpo`: DPO of the SFT model on `datasets/dpo/` with TRL's DPOTrainer.

The SFT model (`models/sft/`) is both the starting point and the reference. Loss: standard DPO
(`sigmoid`), length-normalized DPO (`sigmoid_norm`: mean instead of summed log-probabilities) or
IPO, from `recipe.dpo`. A checkpoint every `save_steps`, each evaluated on `datasets/dpo/test`; the
better of the last `keep_best_of_last` (by `select_by`) becomes the final model in `models/dpo/`.
Reference log-probabilities can be computed once before training (`precompute_ref_log_probs`),
which frees the reference model's memory during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat import templates
from fusechat.recipe import RecipeError
from fusechat.run import Manifest
from fusechat.train import attention, common

if TYPE_CHECKING:
    from fusechat.recipe import Recipe

COLUMNS = ("prompt", "chosen", "rejected")


def sft_model(recipe: Recipe) -> Path:
    path = common.model_dir(recipe, "sft")
    if not (path / "config.json").exists():
        raise RecipeError(f"{path}: no SFT model; run `fusechat sft` first")
    return path


def _lengths(ds, tokenizer, variables) -> tuple[list[int], list[int]]:
    full, prompt = [], []
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"], strict=True):
        full.append(max(common.token_length(tokenizer, p + c, **variables),
                        common.token_length(tokenizer, p + r, **variables)))
        prompt.append(common.token_length(tokenizer, p, add_generation_prompt=True, **variables))
    return full, prompt


def build_trainer(
    recipe: Recipe, out: Path, manifest: Manifest | None = None, attn_implementation: str | None = None,
    **overrides,
):
    """The DPOTrainer for this recipe, with its data read, checked and length-filtered.

    `overrides` replace DPOConfig fields (benchmarks compare with and without precomputed
    reference log-probabilities this way)."""
    from trl import DPOConfig, DPOTrainer

    cfg = recipe.dpo
    base = sft_model(recipe)
    # settings first: a bad batch size or device choice fails before any data is read
    kwargs = common.config_kwargs(cfg, out, "dpo")
    # the attention kernel (fusechat.train.attention): packed rows cost per real token where one is installed
    kwargs["model_init_kwargs"]["attn_implementation"] = attn_implementation or attention.choose()
    peft = common.peft_config(cfg, "dpo", kwargs["model_init_kwargs"])
    tokenizer = common.load_tokenizer(str(base))
    variables = templates.template_kwargs(recipe.template_date)

    data_dir = recipe.run_path() / "datasets" / "dpo"
    test_path = data_dir / "test.parquet"
    if not common.has_rows(test_path) and cfg.keep_best_of_last > 1:
        raise RecipeError(
            f"{test_path}: missing or empty; dpo.keep_best_of_last: {cfg.keep_best_of_last} picks checkpoints by their "
            "held-out metrics (set it to 1 to keep the last checkpoint without a test split)"
        )
    splits, counts = {}, {}
    for split in ("train", "test"):
        path = data_dir / f"{split}.parquet"
        if split == "test" and not common.has_rows(path):
            continue
        ds = common.load_split(path, COLUMNS, common.check_dpo_row, out / "cache")
        ds = common.for_template(ds, COLUMNS, recipe.target.family, variables)
        full, prompt = _lengths(ds, tokenizer, variables)
        splits[split], counts[split] = common.apply_length_policy(
            ds, full, prompt, cfg, manifest if split == "train" else None
        )
        counts[split]["rows"] = len(ds)

    has_test = "test" in splits
    kwargs.update(
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        eval_strategy="steps" if has_test else "no",
        eval_steps=cfg.save_steps,
        save_total_limit=max(cfg.save_total_limit, cfg.keep_best_of_last),
    )
    kwargs.update(overrides)
    trainer = DPOTrainer(
        model=str(base),
        args=DPOConfig(**kwargs),
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
        peft_config=peft,
    )
    paths = {s: data_dir / f"{s}.parquet" for s in splits}
    return trainer, paths, counts


def select_checkpoint(trainer, keep: int, select_by: str) -> tuple[Path, list[dict[str, Any]]]:
    """The better of the last `keep` checkpoints by their held-out metric (the published rule;
    which metric is open: `select_by`). Returns the chosen folder and the candidates compared."""
    ckpt_dir = Path(trainer.args.output_dir)
    last = common.last_complete_checkpoint(ckpt_dir)
    ckpts = sorted(
        (p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[-1]),
    )[-keep:]
    key = f"eval_{select_by}"
    evals = {e["step"]: e for e in trainer.state.log_history if key in e}
    candidates = []
    for p in ckpts:
        step = int(p.name.split("-")[-1])
        if step in evals:
            candidates.append({"checkpoint": p.name, "step": step, key: evals[step][key]})
    if not candidates:
        return last, []
    lower_is_better = select_by == "loss"
    best = (min if lower_is_better else max)(candidates, key=lambda c: c[key])
    return ckpt_dir / best["checkpoint"], candidates


def load_checkpoint(trainer, folder: Path) -> None:
    """A saved checkpoint's weights into the trainer's model, through public APIs: DeepSpeed's
    and accelerate's FSDP loaders where the weights are sharded, PEFT's for adapters, else the
    checkpoint read as a model (any layout the Trainer writes: one file or shards)."""
    from peft import PeftModel, load_peft_weights, set_peft_model_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        deepspeed_load_checkpoint(trainer.model_wrapped, str(folder), load_module_strict=not isinstance(model, PeftModel))
    elif trainer.is_fsdp_enabled:
        from accelerate.utils import load_fsdp_model

        load_fsdp_model(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.model, str(folder))
    elif isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(folder)))
    else:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(str(folder), dtype=model.dtype).state_dict())


def run_dpo(recipe: Recipe) -> Manifest:
    recipe.require("dpo", "target", "dpo")
    cfg = recipe.dpo
    manifest = Manifest.start(recipe, "dpo")
    out = common.model_dir(recipe, "dpo")
    base = sft_model(recipe)
    manifest.models[str(base)] = "models/sft"
    trainer, paths, counts = build_trainer(recipe, out, manifest)
    common.log(f"dpo: {len(trainer.train_dataset)} training pairs")

    # the SFT manifest changes whenever the SFT model is retrained into the same folder
    sft_id = f"{base}@{common.file_sha256(base / 'manifest.json')}" if (base / "manifest.json").exists() else str(base)
    key = common.run_key(recipe.dpo, sft_id, paths)
    result, resumed = common.train_resuming(trainer, key)
    metrics: dict[str, Any] = dict(result.metrics)
    chosen, candidates = select_checkpoint(trainer, cfg.keep_best_of_last, cfg.select_by)
    if chosen.name != f"checkpoint-{trainer.state.global_step}":
        common.log(f"dpo: keeping {chosen.name}, the better of the last {cfg.keep_best_of_last} by eval {cfg.select_by}")
        load_checkpoint(trainer, chosen)
    step = int(chosen.name.split("-")[-1])
    held_out = next(
        (e for e in reversed(trainer.state.log_history) if e.get("step") == step and "eval_loss" in e), {}
    )
    metrics.update({k: v for k, v in held_out.items() if k.startswith("eval_")})
    metrics.update(
        world_size=trainer.args.world_size,
        ranks=common.gather_ranks(trainer),
        resumed_from_step=resumed,
        global_step=trainer.state.global_step,
        selected_checkpoint=chosen.name,
        candidates=candidates,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
    )
    metrics["attn_implementation"] = attention.used_by(trainer)
    common.save_final(trainer, out, str(base), trainer.args.model_init_kwargs["dtype"])
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(str(out))
        manifest.outputs = {"models/dpo": manifest.rows_out}
        manifest.extra = {
            "length_policy": counts, "resumed_from_step": resumed, "world_size": trainer.args.world_size,
            "selected_checkpoint": chosen.name, "candidates": candidates,
        }
        manifest.extra["attn_implementation"] = metrics["attn_implementation"]
        common.write_outputs(
            out, recipe, manifest, stage="dpo", base_model=str(base), data=paths,
            rows={s: c["rows"] for s, c in counts.items()}, cfg=cfg, metrics=metrics,
        )
    return manifest


if __name__ == "__main__":
    common.module_main("dpo", run_dpo)
