"""`fusechat sft`: supervised fine-tuning of the target on `datasets/sft/` with TRL's SFTTrainer.

Packing (best-fit decreasing, padding-free) and a loss on assistant tokens only, as the recipe says;
every hyperparameter comes from `recipe.sft`. Output: `models/sft/` (model, tokenizer,
`metrics.json`, model card, manifest) with checkpoints under `models/sft/checkpoints/`; running the
command again after an interruption resumes from the newest checkpoint.

Runs in one process or, unchanged, on every rank of `torchrun` / `accelerate launch`
(`python -m fusechat.train.sft RECIPE`; see `fusechat.train.launch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fusechat import templates
from fusechat.recipe import RecipeError
from fusechat.run import Manifest
from fusechat.train import attention, common

if TYPE_CHECKING:
    from fusechat.recipe import Recipe


def training_template(recipe: Recipe, tokenizer, model_ref: str):
    """The template assistant-only loss trains with (`fusechat.templates.training_template`), or
    None when the whole conversation is trained."""
    if not recipe.sft.assistant_only_loss:
        return None
    try:
        return templates.training_template(tokenizer, model_ref, recipe.target.family)
    except templates.TemplateError as e:
        raise RecipeError(f"sft.assistant_only_loss: {e}") from None


def _lengths(ds, tokenizer, variables) -> tuple[list[int], list[int]]:
    full, prompt = [], []
    for messages in ds["messages"]:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        full.append(common.token_length(tokenizer, messages, **variables))
        prompt.append(common.token_length(tokenizer, messages[:first], add_generation_prompt=True, **variables))
    return full, prompt


def build_trainer(
    recipe: Recipe, out: Path, manifest: Manifest | None = None, attn_implementation: str | None = None,
    **overrides,
):
    """The SFTTrainer for this recipe, with its data read, checked and length-filtered.

    `overrides` replace SFTConfig fields (benchmarks compare packing against padding this way)."""
    from trl import SFTConfig, SFTTrainer

    cfg = recipe.sft
    base = recipe.resolve(recipe.target.model)
    # settings first: a bad batch size or device choice fails before any data is read
    kwargs = common.config_kwargs(cfg, out, "sft")
    if recipe.target.revision:
        kwargs["model_init_kwargs"]["revision"] = recipe.target.revision
    # the attention kernel (fusechat.train.attention): packed rows cost per real token where one is installed
    kwargs["model_init_kwargs"]["attn_implementation"] = attn_implementation or attention.choose()
    peft = common.peft_config(cfg, "sft", kwargs["model_init_kwargs"])
    tokenizer = common.load_tokenizer(base, recipe.target.revision)
    template = training_template(recipe, tokenizer, base)
    if template is not None:
        # TRL masks with the tokenizer's template once it has generation markers; the final model
        # folder gets the base's own template back (run_sft)
        tokenizer.chat_template = template.text
        if manifest is not None:
            manifest.extra["chat_template"] = template.source
    variables = templates.template_kwargs(recipe.template_date)

    data_dir = recipe.run_path() / "datasets" / "sft"
    cache = out / "cache"
    splits, counts = {}, {}
    for split in ("train", "test"):
        path = data_dir / f"{split}.parquet"
        if split == "test" and not common.has_rows(path):
            continue
        ds = common.load_split(path, ("messages",), common.check_sft_row, cache)
        ds = common.for_template(ds, ("messages",), recipe.target.family, variables)
        full, prompt = _lengths(ds, tokenizer, variables)
        splits[split], counts[split] = common.apply_length_policy(
            ds, full, prompt, cfg, manifest if split == "train" else None
        )
        counts[split]["rows"] = len(ds)

    kwargs.update(
        packing=cfg.packing,
        packing_strategy="bfd",
        assistant_only_loss=cfg.assistant_only_loss,
        eval_strategy="no",
    )
    kwargs.update(overrides)
    trainer = SFTTrainer(
        model=base,
        args=SFTConfig(**kwargs),
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
        peft_config=peft,
    )
    paths = {s: data_dir / f"{s}.parquet" for s in splits}
    return trainer, paths, counts


def run_sft(recipe: Recipe) -> Manifest:
    recipe.require("sft", "target", "sft")
    manifest = Manifest.start(recipe, "sft")
    out = common.model_dir(recipe, "sft")
    base = recipe.resolve(recipe.target.model)
    manifest.models[base] = recipe.target.revision or "local"
    trainer, paths, counts = build_trainer(recipe, out, manifest)
    common.log(f"sft: {len(trainer.train_dataset)} training sequences from {manifest.rows_out} rows")

    key = common.run_key(recipe.sft, str(base), paths)
    result, resumed = common.train_resuming(trainer, key)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    metrics.update(
        world_size=trainer.args.world_size,
        ranks=common.gather_ranks(trainer),
        resumed_from_step=resumed,
        global_step=trainer.state.global_step,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        # TRL logs its count of real (non-padding) training tokens as `num_tokens`
        train_tokens=next((e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e), 0),
    )
    metrics["attn_implementation"] = attention.used_by(trainer)
    common.log(f"sft: done, {trainer.state.global_step} steps")
    # the model is published with the template its base ships (the training one only adds markers)
    trainer.processing_class.chat_template = common.load_tokenizer(base, recipe.target.revision).chat_template
    common.save_final(trainer, out, base, trainer.args.model_init_kwargs["dtype"])
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(str(out))
        manifest.outputs = {"models/sft": manifest.rows_out}
        manifest.extra.update(length_policy=counts, resumed_from_step=resumed, world_size=trainer.args.world_size)
        manifest.extra["attn_implementation"] = metrics["attn_implementation"]
        common.write_outputs(
            out, recipe, manifest, stage="sft", base_model=base, data=paths,
            rows={s: c["rows"] for s, c in counts.items()}, cfg=recipe.sft, metrics=metrics,
        )
    return manifest


if __name__ == "__main__":
    common.module_main("sft", run_sft)
