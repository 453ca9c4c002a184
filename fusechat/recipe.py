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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusechat.errors import FusechatError

DOMAINS = ("instruction", "math", "code", "chinese")
Domain = Literal["instruction", "math", "code", "chinese"]
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

    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # The recipe leaves max_tokens open; the pipeline it descends from used 4096.
    max_tokens: int = Field(4096, ge=1)


class Source(_Strict):
    """One source model: where it lives, how to prompt it, how to sample it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = Field(min_length=1, description="hub id (org/name) or local folder")
    revision: str | None = Field(None, description="hub revision; recorded in every artifact")
    family: Family
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to the engine, e.g. tensor_parallel_size, max_model_len, base_url",
    )
    sampling: Sampling = Field(default_factory=Sampling)
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

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1, description="hub id or local parquet/jsonl/json file or folder")
    revision: str | None = None
    adapter: str = Field(min_length=1, description="e.g. ultrafeedback, helpsteer2, openmathinstruct2")
    domain: Domain
    split: str = "train"
    limit: int | None = Field(None, ge=1, description="keep at most this many prompts (after filters)")


class Filters(_Strict):
    """Prompt filters (RECIPE_FACTS "Prompts"; how they were done upstream is open)."""

    drop_code_math_from_instruction: bool = True
    require_code_tests: bool = True
    exact_dedup: bool = True
    near_dedup_threshold: float | None = Field(0.9, gt=0.0, le=1.0, description="MinHash Jaccard")
    decontaminate: list[str] = Field(default_factory=list, description="evaluation files (local)")
    ngram: int = Field(13, ge=1)
    max_prompt_chars: int = Field(16000, ge=1)


class RewardModel(_Strict):
    model: str
    revision: str | None = None
    kind: Literal["armorm", "sequence_classification"] = "armorm"
    max_length: int = Field(4096, ge=8)
    batch_tokens: int | None = Field(
        None, ge=1, description="token budget of one scoring batch; none: 16384 on GPUs, 2048 on CPU"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="input over max_length: keep its head + final token, or leave unscored"
    )


class MathCheck(_Strict):
    timeout_s: float = Field(5.0, gt=0)
    workers: int = Field(2, ge=1)


class CodeCheck(_Strict):
    timeout_s: float = Field(10.0, gt=0)
    memory_mb: int = Field(1024, ge=16)
    workers: int = Field(2, ge=1)
    isolation: Literal["auto", "uid", "userns", "none"] = Field(
        "auto", description="sandbox mode: auto = the strongest this machine allows (a warning when that is "
        "none); uid (root), userns or none insist on that mode, and the stage stops if it is refused"
    )


class Scoring(_Strict):
    reward_model: RewardModel
    math: MathCheck = Field(default_factory=MathCheck)
    code: CodeCheck = Field(default_factory=CodeCheck)
    shard_size: int = Field(2048, ge=1, description="responses per resumable scoring shard")


class Band(_Strict):
    low: float = 0.01
    high: float = 0.1

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.low > self.high:
            raise ValueError(f"band low ({self.low}) must not exceed band high ({self.high})")
        return self


class Build(_Strict):
    """Selection rules (RECIPE_FACTS "Building SFT and DPO data"); the open choices are options."""

    band: Band = Field(default_factory=Band)
    sft_fraction: dict[Domain, float] = Field(
        default_factory=lambda: {"instruction": 0.4},
        description="share of a domain's prompts that go to SFT (the rest to DPO); 4:6 published",
    )
    pair_policy: Literal["largest_margin", "smallest_margin", "best_chosen", "source_order"] = (
        "best_chosen"
    )
    band_before_split: bool = False
    drop_truncated: bool = True
    test_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    seed: int = 42
    hub_repo_prefix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$",
        description="publish to <prefix>-sft and <prefix>-dpo (e.g. my-org/fusechat-3.0); unset = dry run",
    )
    hub_private: bool = True

    @field_validator("sft_fraction")
    @classmethod
    def _fraction(cls, v: dict[str, float]) -> dict[str, float]:
        for domain, f in v.items():
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"sft_fraction for {domain} must be within [0, 1], got {f}")
        return v


class Lora(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    load_in_4bit: bool = False


class Training(_Strict):
    """Hyperparameters shared by SFT and DPO."""

    learning_rate: float = Field(gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    global_batch_size: int = Field(128, ge=1)
    per_device_batch_size: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=8)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_steps: int = Field(-1, ge=-1, description="-1 = run the epochs")
    save_steps: int = Field(100, ge=1)
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    lora: Lora | None = None
    report_to: list[str] = Field(default_factory=list)
    seed: int = 42
    # The published recipe does not say what happens to rows longer than max_length (open): drop
    # them (default; a cut response teaches the model to stop mid-answer) or let TRL truncate them.
    overlong: Literal["drop", "truncate"] = "drop"
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk (DPO keeps at least keep_best_of_last)")

    @model_validator(mode="after")
    def _batch(self) -> Training:
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"per_device_batch_size ({self.per_device_batch_size})"
            )
        return self


class SFT(Training):
    packing: bool = True
    assistant_only_loss: bool = True
    epochs: float = Field(3.0, gt=0.0)


class DPO(Training):
    beta: float = Field(gt=0.0)
    loss_type: Literal["sigmoid", "sigmoid_norm", "ipo"] = "sigmoid"
    precompute_ref_log_probs: bool = False
    keep_best_of_last: int = Field(2, ge=1)
    # Which held-out metric decides "the better" checkpoint is open; eval loss is the least noisy.
    select_by: Literal["loss", "rewards/accuracies", "rewards/margins"] = "loss"


class Target(_Strict):
    model: str
    revision: str | None = None
    family: Family


class Eval(_Strict):
    benchmarks: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict, description="benchmark -> local file")
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    sources: bool = Field(
        True, description="evaluate the source models too (their rows of the table); false: the target models only"
    )
    # Sources generate through their own engine and options; the target models (base, SFT, DPO) here.
    engine: Literal["vllm", "transformers"] = "vllm"
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="engine options of the target models, e.g. max_model_len, dtype"
    )


class Recipe(_Strict):
    """The whole recipe. Field docs double as the user reference (`fusechat recipe show`)."""

    name: str = Field(min_length=1)
    run_dir: str
    seed: int = 0
    sources: list[Source] = Field(min_length=1)
    datasets: list[PromptDataset] = Field(min_length=1)
    filters: Filters = Field(default_factory=Filters)
    scoring: Scoring
    build: Build = Field(default_factory=Build)
    target: Target
    sft: SFT
    dpo: DPO
    eval: Eval = Field(default_factory=Eval)
    # Filled by load_recipe, never read from YAML: where relative paths resolve from.
    base_dir: str = Field(".", exclude=True)

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
    refs += [("target.model", recipe.target.model)]
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
