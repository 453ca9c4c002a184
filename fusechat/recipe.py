"""The recipe: one typed, validated YAML file that drives every stage.

A recipe is data (alignment-handbook's rule): stages read it, never extend it. Relative paths in a
recipe resolve against the recipe file's own folder, so a recipe and the files it names move
together. `load_recipe` turns every problem into a `RecipeError` that names the file and the
field path (`sources[1].sampling.top_p`), so a user can fix the YAML without reading code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from fusechat.errors import FusechatError
from fusechat.tables import DOMAINS

Domain = Literal[DOMAINS]
Family = Literal["llama3", "qwen2", "gemma2", "mistral"]


class RecipeError(FusechatError, ValueError):
    """A recipe that cannot be used; the message names the file and the field path."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `temprature:` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def is_local_path(ref: str) -> bool:
    """A model/data reference is a local path unless it looks like a hub id (`org/name`)."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") != 1 or Path(ref).exists()


class Sampling(_Strict):
    """Per-source sampling settings (RECIPE_FACTS "Sampling")."""

    temperature: float = Field(0.8, ge=0.0, le=5.0, description="sampling temperature; published: 0.8 (Gemma, Mistral, Llama sources), 0.7 (Qwen); 0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass; published: 0.95, 0.8 for Qwen")
    top_k: int = Field(-1, ge=-1, description="keep the k most likely tokens; -1 = no cut")
    repetition_penalty: float = Field(1.0, gt=0.0, description="published: 1.05 for Qwen, 1.0 (none) for the others")
    # The recipe leaves max_tokens open; the pipeline it descends from used 4096.
    max_tokens: int = Field(4096, ge=1, description="most tokens per response (open in the paper; its ancestor pipeline used 4096); "
                            "a longer response is kept with finish reason `length`")


class Source(_Strict):
    """One source model: where it lives, how to prompt it, how to sample it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$",
                      description="the source's name in every table (`source` column); letters, digits, . _ -")
    model: str = Field(min_length=1, description="hub id (org/name) or local folder; for the openai engine, the served model")
    revision: str | None = Field(None, description="hub revision; recorded in every artifact")
    family: Family = Field(description="chat-template family of the model: llama3, qwen2, gemma2 or mistral")
    engine: Literal["vllm", "openai", "transformers"] = Field(
        "vllm", description="vllm (offline LLM), openai (any OpenAI-compatible server) or transformers (model.generate)")
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to the engine and checked against what it accepts when the recipe is loaded: for vllm "
        "the arguments of vLLM's `LLM` (tensor_parallel_size, max_model_len, dtype, enforce_eager, "
        "kv_cache_memory_bytes, ...; on a CPU machine the KV cache defaults to a quarter of the free memory, at least "
        "1 GiB, unless kv_cache_memory_bytes, gpu_memory_utilization or VLLM_CPU_KVCACHE_SPACE size it); for openai "
        "base_url (required), api_key_env, served_model, concurrency, max_model_len, timeout; for transformers dtype, "
        "device, batch_size, max_model_len; for every engine `tokenizer`, the tokenizer that renders the prompts",
    )
    sampling: Sampling = Field(default_factory=Sampling, description="how this source samples")
    responses: dict[Domain, int] = Field(
        default_factory=dict, description="responses per prompt for each domain; absent = 0"
    )
    shard_size: int = Field(
        256, ge=1, description="prompts per resumable sampling shard (the unit a rerun skips)"
    )

    @field_validator("responses")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        for domain, n in v.items():
            if n < 0:
                raise ValueError(f"responses for {domain} must be >= 0, got {n}")
        return v


class PromptDataset(_Strict):
    """One prompt source data set, read by a named adapter."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$",
                      description="the data set's name in every table (`dataset` column); letters, digits, . _ -")
    path: str = Field(min_length=1, description="hub id or local parquet/jsonl/json file or folder")
    revision: str | None = Field(None, description="hub revision of the data set; recorded in the prompts manifest")
    adapter: str = Field(min_length=1, description="the reader that turns its rows into prompts, e.g. ultrafeedback, "
                         "helpsteer2, openmathinstruct2 (docs/prompts.md lists them)")
    domain: Domain = Field(description="instruction, math, code or chinese: decides the checks and the selection rules")
    split: str = Field("train", description="the data set split to read")
    limit: int | None = Field(None, ge=1, description="keep at most this many prompts (after filters)")


class Filters(_Strict):
    """Prompt filters (RECIPE_FACTS "Prompts"; how they were done upstream is open)."""

    drop_code_math_from_instruction: bool = Field(
        True, description="drop prompts that look like code or math from the instruction and Chinese sets (published)")
    require_code_tests: bool = Field(True, description="keep only code prompts that come with test cases (published)")
    exact_dedup: bool = Field(True, description="drop prompts whose normalized text was seen before, across all data sets")
    near_dedup_threshold: float | None = Field(
        0.9, gt=0.0, le=1.0, description="drop prompts whose MinHash Jaccard similarity to a kept one reaches this; null = off")
    decontaminate: list[str] = Field(
        default_factory=list, description="local evaluation files: prompts sharing an n-gram with one of their questions are dropped")
    ngram: int = Field(13, ge=1, description="words per n-gram of the decontamination check")
    max_prompt_chars: int = Field(16000, ge=1, description="drop prompts longer than this many characters (all messages together)")


class RewardModel(_Strict):
    """The reward model that scores every response (RECIPE_FACTS "Scoring": ArmoRM for every domain)."""

    model: str = Field(description="hub id or local folder; published: RLHFlow/ArmoRM-Llama3-8B-v0.1")
    revision: str | None = Field(None, description="hub revision; recorded in the scores manifest")
    kind: Literal["armorm", "sequence_classification"] = Field(
        "armorm", description="armorm: ArmoRM's gated 19-objective head, loaded without remote code; "
        "sequence_classification: any transformers reward model with one output")
    max_length: int = Field(4096, ge=8, description="most tokens of one scored conversation (prompt + response)")
    batch_tokens: int | None = Field(
        None, ge=1, description="token budget of one scoring batch; none: 32768 on GPUs, 2048 on CPU"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on CUDA devices, float32 on CPU")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="input over max_length: keep its head + final token, or leave unscored"
    )


class MathCheck(_Strict):
    """The math answer check: the final answer against the gold one, compared symbolically."""

    timeout_s: float = Field(5.0, gt=0, description="seconds one comparison may take before it counts as a timeout")
    workers: int = Field(2, ge=1, description="processes that check in parallel")


class CodeCheck(_Strict):
    """The code check: static analysis, then the prompt's tests in a sandbox."""

    timeout_s: float = Field(10.0, gt=0, description="seconds one program and its tests may run")
    memory_mb: int = Field(1024, ge=16, description="memory limit of one sandboxed program")
    workers: int = Field(2, ge=1, description="programs run in parallel")
    isolation: Literal["auto", "uid", "userns", "none"] = Field(
        "auto", description="sandbox mode: auto = the strongest this machine allows (a warning when that is "
        "none); uid (root), userns or none insist on that mode, and the stage stops if it is refused"
    )


class Scoring(_Strict):
    """How responses are scored: a reward for every one, correctness for math and code."""

    reward_model: RewardModel = Field(description="the reward model")
    math: MathCheck = Field(default_factory=MathCheck, description="the math answer check")
    code: CodeCheck = Field(default_factory=CodeCheck, description="the code test check")
    shard_size: int = Field(2048, ge=1, description="responses per resumable scoring shard")


class Band(_Strict):
    """The reward margin a DPO pair must have: low <= score(chosen) - score(rejected) <= high."""

    low: float = Field(0.01, description="smallest margin kept (published: 0.01)")
    high: float = Field(0.1, description="largest margin kept (published: 0.1)")

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.low > self.high:
            raise ValueError(f"band low ({self.low}) must not exceed band high ({self.high})")
        return self


class Build(_Strict):
    """Selection rules (RECIPE_FACTS "Building SFT and DPO data"); the open choices are options."""

    band: Band = Field(default_factory=Band, description="the margin band of DPO pairs")
    sft_fraction: dict[Domain, float] = Field(
        default_factory=lambda: {"instruction": 0.4},
        description="share of a domain's prompts that go to SFT (the rest to DPO); 4:6 published",
    )
    pair_policy: Literal["largest_margin", "smallest_margin", "best_chosen", "source_order"] = Field(
        "best_chosen", description="which source's pair a prompt keeps when several are in the band (open): the "
        "highest-scoring chosen, the largest or smallest margin, or the first source in recipe order",
    )
    band_before_split: bool = Field(
        False, description="fill the DPO share with prompts that have an in-band pair before splitting (open)")
    drop_truncated: bool = Field(True, description="responses cut at max_tokens take no part in selection")
    test_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="share of prompts held out as the test splits")
    seed: int = Field(42, description="seed of the SFT/DPO and train/test splits")
    hub_repo_prefix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$",
        description="publish to <prefix>-sft and <prefix>-dpo (e.g. my-org/fusechat-3.0); unset = dry run",
    )
    hub_private: bool = Field(True, description="create the published data set repositories as private")

    @field_validator("sft_fraction")
    @classmethod
    def _fraction(cls, v: dict[str, float]) -> dict[str, float]:
        for domain, f in v.items():
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"sft_fraction for {domain} must be within [0, 1], got {f}")
        return v


class Lora(_Strict):
    """LoRA adapters instead of full training; merged into the base for the final model folder."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter inputs")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters, or all-linear")
    load_in_4bit: bool = Field(False, description="QLoRA: a 4-bit NF4 base (CUDA and bitsandbytes only)")


class Training(_Strict):
    """Hyperparameters shared by SFT and DPO."""

    learning_rate: float = Field(gt=0.0, description="peak learning rate (published per target: RECIPE_FACTS \"Training\")")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training split")
    global_batch_size: int = Field(128, ge=1, description="rows per optimizer step over all processes (published: 128); "
                                   "gradient accumulation makes up the rest")
    per_device_batch_size: int = Field(1, ge=1, description="rows per process per forward pass")
    max_length: int = Field(2048, ge=8, description="most tokens of one training row (published: 2048)")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (published: cosine)")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of the steps spent warming up (published: 0.1)")
    max_steps: int = Field(-1, ge=-1, description="stop after this many steps; -1 = run the epochs")
    save_steps: int = Field(100, ge=1, description="a checkpoint every this many steps (a rerun resumes from the last)")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision; auto = where the CUDA device has it")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations to save memory; auto = on CUDA devices, off on CPU")
    lora: Lora | None = Field(None, description="LoRA/QLoRA settings; absent = full training")
    report_to: list[str] = Field(default_factory=list, description="trackers: tensorboard, wandb, trackio; empty = none")
    seed: int = Field(42, description="seed of the trainer (data order, dropout, initialization of adapters)")
    # The published recipe does not say what happens to rows longer than max_length (open): drop
    # them (default; a cut response teaches the model to stop mid-answer) or let TRL truncate them.
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="rows longer than max_length: drop them (counted in the manifest) or let TRL truncate them (open)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk (DPO keeps at least keep_best_of_last)")
    trl_args: dict[str, Any] = Field(
        default_factory=dict,
        description="TRL's own SFTConfig/DPOConfig arguments the recipe has no field for (weight_decay, optim, "
        "max_grad_norm, adam_beta2, logging_steps, ...), passed unchanged; names and types are checked against TRL's "
        "config when the recipe is loaded, and an argument the recipe sets from one of its own fields is refused "
        "with that field's name",
    )

    @model_validator(mode="after")
    def _batch(self) -> Training:
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"per_device_batch_size ({self.per_device_batch_size})"
            )
        return self


class SFT(Training):
    """Supervised fine-tuning of the target on the SFT set."""

    packing: bool = Field(True, description="pack rows into max_length sequences without padding (TRL's bfd strategy)")
    assistant_only_loss: bool = Field(True, description="train only on the assistant tokens and each turn's end token")
    epochs: float = Field(3.0, gt=0.0, description="passes over the training split (published: 3)")


class DPO(Training):
    """DPO of the SFT model (also the reference) on the DPO set."""

    beta: float = Field(gt=0.0, description="DPO beta (published: 10 for the Llama targets, 0.01 for Qwen and Gemma)")
    loss_type: Literal["sigmoid", "sigmoid_norm", "ipo"] = Field(
        "sigmoid", description="sigmoid: standard DPO; sigmoid_norm: length-normalized DPO (the Llama targets); ipo")
    precompute_ref_log_probs: bool = Field(
        False, description="compute the reference model's log-probabilities once before training, then free it")
    keep_best_of_last: int = Field(
        2, ge=1, description="the final model is the better of the last this many checkpoints (published: 2)")
    # Which held-out metric decides "the better" checkpoint is open; eval loss is the least noisy.
    select_by: Literal["loss", "rewards/accuracies", "rewards/margins"] = Field(
        "loss", description="the held-out metric that picks the better checkpoint (open; eval loss is the least noisy)")


class Target(_Strict):
    """The small model the sources are fused into."""

    model: str = Field(description="hub id or local folder of the target (the base SFT starts from)")
    revision: str | None = Field(None, description="hub revision of the target")
    family: Family = Field(description="chat-template family of the target: llama3, qwen2, gemma2 or mistral")


class Eval(_Strict):
    """Evaluation of the sources, the target and its SFT and DPO models."""

    benchmarks: list[str] = Field(default_factory=list, description="evaluation sets by name (docs/evaluation.md lists them)")
    files: dict[str, str] = Field(default_factory=dict, description="benchmark -> local file or folder")
    max_tokens: int = Field(1024, ge=1, description="most tokens per evaluation answer")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature of every evaluated model; 0 = greedy")
    sources: bool = Field(
        True, description="evaluate the source models too (their rows of the table); false: the target models only"
    )
    # Sources generate through their own engine and options; the target models (base, SFT, DPO) here.
    engine: Literal["vllm", "transformers"] = Field("vllm", description="engine of the target models")
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="engine options of the target models, e.g. max_model_len, dtype; checked "
        "like a source's engine_options"
    )


class Recipe(_Strict):
    """The whole recipe. The field docs are the user reference (`fusechat recipe docs`, docs/recipe.md).

    A recipe without `target`, `sft` and `dpo` is a data recipe: the data stages (prompts, sample,
    score, build, publish) run on it, and the training stages say which section they need.
    """

    # load_recipe fills a missing name with the file's stem: the name a user already calls the recipe by
    name: str = Field(min_length=1, description="the recipe's name: models/<name>/ and the data set cards carry it",
                      json_schema_extra={"default_doc": "the file's name without .yaml"})
    run_dir: str = Field(description="folder of the run's outputs, relative to the recipe file; recipes that share it "
                         "share their sampled, scored and built data")
    seed: int = Field(0, description="seed of the engines, of which prompts a data set's `limit` keeps, and of the "
                      "response ids")
    template_date: str = Field(
        "26 Jul 2024", min_length=1,
        description="the date chat templates that print one show (Llama-3.1/3.2's \"Today Date\"; Llama-3.2's "
        "own default is the day of the run); fixed so a run renders the same prompts on any day. Default: "
        "the date those templates carry themselves",
    )
    sources: list[Source] = Field(min_length=1, description="the source models, sampled in this order")
    datasets: list[PromptDataset] = Field(min_length=1, description="the prompt data sets")
    filters: Filters = Field(default_factory=Filters, description="the prompt filters")
    scoring: Scoring = Field(description="reward model and checks")
    build: Build = Field(default_factory=Build, description="the rules that build the SFT and DPO sets")
    target: Target | None = Field(None, description="the target model; needed by sft, dpo and eval")
    sft: SFT | None = Field(None, description="supervised fine-tuning; needed by sft")
    dpo: DPO | None = Field(None, description="preference optimization; needed by dpo")
    eval: Eval = Field(default_factory=Eval, description="the evaluation")
    # Filled by load_recipe, never read from YAML: where relative paths resolve from.
    base_dir: str = Field(".", exclude=True)
    # What load_recipe could not check (e.g. vLLM options where vLLM is not installed); `recipe validate` says so.
    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        for kind, items in (("sources", self.sources), ("datasets", self.datasets)):
            seen: set[str] = set()
            for i, item in enumerate(items):
                if item.name in seen:
                    raise ValueError(f"{kind}[{i}].name {item.name!r} is used twice")
                seen.add(item.name)
        return self

    # -- helpers the stages share -------------------------------------------------------------
    def require(self, stage: str, *sections: str) -> None:
        """Stop a stage that needs sections this (data) recipe does not have, naming them."""
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise RecipeError(
                f"recipe {self.name!r}: fusechat {stage} needs the {' and '.join(f'`{m}`' for m in missing)} "
                f"section{'s' if len(missing) > 1 else ''}, which this recipe does not have (a data recipe runs the "
                "data stages: prompts, sample, score, build, publish)"
            )

    def resolve(self, ref: str) -> str:
        """A local path made absolute against the recipe's folder; a hub id unchanged."""
        if not is_local_path(ref) and not (Path(self.base_dir) / ref).exists():
            return ref
        p = Path(ref).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())

    def run_path(self) -> Path:
        p = Path(self.run_dir).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved recipe (the provenance key of artifacts)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# TRL arguments that fusechat sets itself (fusechat.train.common.config_kwargs and the two trainers):
# `trl_args` may not set them. A string names the recipe field (of the same section) to use instead.
_TRL_OWNED = {
    "learning_rate": "learning_rate", "num_train_epochs": "epochs", "max_steps": "max_steps",
    "per_device_train_batch_size": "per_device_batch_size", "per_device_eval_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "global_batch_size", "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio", "max_length": "max_length",
    "save_steps": "save_steps", "save_total_limit": "save_total_limit", "report_to": "report_to", "seed": "seed",
    "bf16": "bf16", "fp16": "bf16", "gradient_checkpointing": "gradient_checkpointing",
    "output_dir": None, "save_strategy": None, "use_cpu": None, "model_init_kwargs": None, "eval_strategy": None,
}
TRL_OWNED = {
    "sft": {**_TRL_OWNED, "packing": "packing", "packing_strategy": "packing", "assistant_only_loss": "assistant_only_loss"},
    "dpo": {**_TRL_OWNED, "beta": "beta", "loss_type": "loss_type", "precompute_ref_log_probs": "precompute_ref_log_probs",
            "eval_steps": "save_steps"},
}
# where TRL's config dataclasses live, base first (fusechat.source_fields reads them without importing TRL)
TRL_CONFIGS = {
    stage: [("transformers", "training_args.py", "TrainingArguments"), ("trl", "trainer/base_config.py", "_BaseConfig"),
            ("trl", f"trainer/{stage}_config.py", f"{stage.upper()}Config")]
    for stage in ("sft", "dpo")
}


def _pass_through_problems(recipe: Recipe) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What `engine_options` and `trl_args` get wrong, as (field path, message), and what could not
    be checked here, as (field path, note). These go to vLLM and TRL unchanged, so the check is
    against those libraries' own argument lists, read only when a section uses them."""
    from fusechat.engine_options import check_engine_options

    bad: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    blocks = [(f"sources[{i}].engine_options", s.engine, s.engine_options) for i, s in enumerate(recipe.sources)]
    blocks.append(("eval.engine_options", recipe.eval.engine, recipe.eval.engine_options))
    for field, engine, options in blocks:
        if options:
            found, note = check_engine_options(engine, options)
            bad += [(field + key, msg) for key, msg in found]
            notes += [(field, note)] if note else []
    for stage in ("sft", "dpo"):
        section = getattr(recipe, stage)
        if section is not None and section.trl_args:
            found, note = _trl_problems(stage, section.trl_args)
            bad += [(f"{stage}.trl_args{key}", msg) for key, msg in found]
            notes += [(f"{stage}.trl_args", note)] if note else []
    return bad, notes


def _trl_problems(stage: str, args: dict[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    from fusechat.source_fields import Unreadable, options_model, problems, read_fields

    owned = TRL_OWNED[stage]
    found = [(f".{k}", f"set from {stage}.{owned[k]}; set it there" if owned[k] else "set by fusechat itself")
             for k in args if k in owned]
    rest = {k: v for k, v in args.items() if k not in owned}
    try:
        types = read_fields(TRL_CONFIGS[stage])
    except Unreadable as e:
        return found, f"not checked: {e}"
    return found + problems(options_model(f"{stage.upper()}Config", types), rest, f"{stage.upper()}Config argument"), None


def reference_markdown() -> str:
    """The recipe reference (docs/recipe.md, `fusechat recipe docs`), made from the schema itself:
    every section, field, type, default and description, so the reference cannot drift from the code."""
    lines = [
        "# Recipe reference",
        "",
        "<!-- generated by `fusechat recipe docs > docs/recipe.md` from fusechat/recipe.py; do not edit -->",
        "",
        "A recipe is one YAML file (`fusechat recipe validate FILE` checks it, `fusechat recipe show FILE` prints it",
        "with every default filled in). Relative paths resolve against the recipe's own folder; `extends: other.yaml`",
        "merges another recipe under this one (mappings merge, lists replace). Unknown keys are errors.",
        "`engine_options` and `trl_args` pass through to vLLM/TRL and are checked against those libraries'",
        "own arguments when the recipe is loaded.",
        "",
    ]
    seen: dict[type, str] = {}

    def section(model: type[BaseModel], path: str) -> None:
        seen[model] = path
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.extend([f"## `{path}`" if path else "## top level", ""])
        if doc:
            lines.extend([doc, ""])
        lines.extend(["| field | type | default | description |", "|---|---|---|---|"])
        nested: list[tuple[type[BaseModel], str]] = []
        for name, info in model.model_fields.items():
            if info.exclude:
                continue
            sub = _model_in(info.annotation)
            where = f"{path}.{name}" if path else name
            if sub is not None and _is_list(info.annotation):
                where += "[]"
            desc = (info.description or "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            if sub is not None:
                desc += f" (see `{seen.get(sub, where)}`)"
                if sub not in seen and all(sub is not m for m, _ in nested):
                    nested.append((sub, where))
            lines.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {desc} |")
        lines.append("")
        for sub, where in nested:
            if sub not in seen:
                section(sub, where)

    section(Recipe, "")
    return "\n".join(lines).rstrip() + "\n"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    import typing

    return typing.get_origin(annotation) is list


def _type_name(annotation: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _default(info: Any) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "default_doc" in extra:
        return str(extra["default_doc"])
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{json.dumps(value)}`"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_recipe(path: str | Path, run_dir: str | None = None, check_paths: bool = True) -> Recipe:
    """Read, validate and resolve a recipe; every failure is a RecipeError naming file and field."""
    import yaml  # local: keeps `fusechat --help` free of anything it does not need

    path = Path(path)
    data = _read_yaml(path, yaml, chain=())
    if "base_dir" in data:
        raise RecipeError(f"{path}: base_dir: not a recipe field (it is set from the file location)")
    data.setdefault("name", path.stem)
    if run_dir is not None:
        data["run_dir"] = str(Path(run_dir).resolve())
    data["base_dir"] = str(path.resolve().parent)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: invalid recipe ({e.error_count()} error(s))"]
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_loc(err['loc'])}: {msg}")
        raise RecipeError("\n".join(lines)) from None
    bad, notes = _pass_through_problems(recipe)
    if bad:
        lines = [f"{path}: invalid recipe ({len(bad)} error(s))"] + [f"  {field}: {msg}" for field, msg in bad]
        raise RecipeError("\n".join(lines))
    recipe._notes = [f"{field}: {note}" for field, note in notes]
    if check_paths:
        missing = list(_missing_local_paths(recipe))
        if missing:
            lines = [f"{path}: {len(missing)} local path(s) do not exist"]
            lines += [f"  {field}: {ref} (resolved to {resolved})" for field, ref, resolved in missing]
            raise RecipeError("\n".join(lines))
    return recipe


def _read_yaml(path: Path, yaml, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Read one recipe file, following `extends: other.yaml` (mappings merge, lists replace).

    The published targets share everything up to the data sets; `extends` keeps that part in one
    file instead of five copies that drift apart.
    """
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path.resolve() in chain:
        raise RecipeError(f"{path}: extends: cycle through {' -> '.join(map(str, chain))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: must be a file path, got {type(parent).__name__}")
    parent_path = path.parent / parent
    base = _read_yaml(parent_path, yaml, chain + (path.resolve(),))
    if parent_path.resolve().parent != path.resolve().parent:
        _anchor_paths(base, parent_path.resolve().parent)
    return _merge(base, data)


def _anchor_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative local paths of an extended recipe absolute against its own folder, so
    that `extends: ../recipes/demo.yaml` from elsewhere still finds the demo's models and data.
    Raw YAML, before validation: anything not shaped as expected is left for validation to report."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            if is_local_path(value) or (folder / value).exists():
                return str((folder / value).resolve())
        return value

    def items(key: str) -> list[dict[str, Any]]:
        value = data.get(key)
        return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []

    if "run_dir" in data:
        data["run_dir"] = fix(data["run_dir"])
    for source in items("sources"):
        if "model" in source and source.get("engine") != "openai":
            source["model"] = fix(source["model"])
    for dataset in items("datasets"):
        if "path" in dataset:
            dataset["path"] = fix(dataset["path"])
    for section, key in (("scoring", "reward_model"), (None, "target")):
        holder = data.get(section) if section else data
        block = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(block, dict) and "model" in block:
            block["model"] = fix(block["model"])
    filters = data.get("filters")
    if isinstance(filters, dict) and isinstance(filters.get("decontaminate"), list):
        filters["decontaminate"] = [fix(f) for f in filters["decontaminate"]]
    files = data.get("eval", {}).get("files") if isinstance(data.get("eval"), dict) else None
    if isinstance(files, dict):
        for k in files:
            files[k] = fix(files[k])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _missing_local_paths(recipe: Recipe):
    refs: list[tuple[str, str]] = []
    refs += [(f"sources[{i}].model", s.model) for i, s in enumerate(recipe.sources)]
    refs += [(f"datasets[{i}].path", d.path) for i, d in enumerate(recipe.datasets)]
    refs += [("scoring.reward_model.model", recipe.scoring.reward_model.model)]
    refs += [("target.model", recipe.target.model)] if recipe.target else []
    refs += [(f"filters.decontaminate[{i}]", f) for i, f in enumerate(recipe.filters.decontaminate)]
    refs += [(f"eval.files.{k}", f) for k, f in recipe.eval.files.items()]
    for field, ref in refs:
        # openai-engine sources name a served model, not a path
        if field.startswith("sources[") and recipe.sources[int(field[8:].split("]")[0])].engine == "openai":
            continue
        if is_local_path(ref):
            resolved = recipe.resolve(ref)
            if not Path(resolved).exists():
                yield field, ref, resolved
