"""What each sampling engine accepts in `engine_options`, declared once.

The engines read their options through these declarations, and `load_recipe` checks every
source's (and the evaluation's) options against them, so a typo (`tensor_paralel_size`) or a wrong
type (`max_model_len: "4k"`) fails at `fusechat recipe validate` with its field path, not when that
source's engine starts after the other sources have sampled.

vLLM's options are vLLM's own: the fields of its `EngineArgs` dataclass plus the parameters of
`LLM.__init__` (what `LLM(**options)` accepts), read from vLLM's source files without importing
vLLM (`fusechat.source_fields` says why). A field that vLLM types with one of its own classes or
aliases is accepted as given and left to vLLM to check.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusechat.source_fields import Unreadable, options_model, problems, read_fields, read_init_params

ENGINES = ("vllm", "openai", "transformers")

# Set by fusechat itself for every engine start, so a recipe cannot set them here: where each comes from.
OWNED = {"model": "the source's `model`", "revision": "the source's `revision`", "seed": "the recipe's `seed`"}


class _Options(BaseModel):
    # strict: YAML already gives numbers and booleans their types; "4k" or "8" for an int is a mistake
    model_config = ConfigDict(extra="forbid", strict=True)

    tokenizer: str | None = Field(
        None, description="tokenizer that renders the prompts (local folder or hub id); default: the model's own"
    )


class OpenAIOptions(_Options):
    """Options of the `openai` engine: any OpenAI-compatible server (a vLLM server, a hosted endpoint)."""

    base_url: str = Field(description="the server's API root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the variable that holds the API key")
    served_model: str | None = Field(None, description="the model name the server knows; default: the source's model")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    max_model_len: int | None = Field(None, ge=1, description="context length; default: what the server reports")
    timeout: float = Field(600.0, gt=0, description="seconds per request")


class TransformersOptions(_Options):
    """Options of the `transformers` engine (`model.generate`, where vLLM does not run)."""

    dtype: str = Field("auto", description="weights dtype: auto, float32, bfloat16, float16")
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    max_model_len: int | None = Field(None, ge=1, description="context length; default the model's positions")


DECLARED: dict[str, type[_Options]] = {"openai": OpenAIOptions, "transformers": TransformersOptions}


def check_engine_options(engine: str, options: dict[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    """Problems with one engine's options as (key path, message) pairs, e.g. (".max_model_len",
    "Input should be a valid integer, got '4k'"), and a note when they could not be checked."""
    found = [(f".{k}", f"set by fusechat from {OWNED[k]}; remove it here") for k in options if k in OWNED]
    rest = {k: v for k, v in options.items() if k not in OWNED}
    if engine in DECLARED:
        return found + problems(DECLARED[engine], rest, f"{engine} engine option"), None
    try:
        model = vllm_options_model()
    except Unreadable as e:
        return found, f"not checked: {e}"
    return found + problems(model, rest, "vllm engine option"), None


@functools.lru_cache(maxsize=1)
def vllm_option_types() -> dict[str, Any]:
    """Name -> Python type of every option `LLM(**options)` accepts in the installed vLLM: the fields
    of `EngineArgs` and the parameters `LLM.__init__` names itself."""
    types = read_fields([("vllm", "engine/arg_utils.py", "EngineArgs")])
    types.update(read_init_params("vllm", "entrypoints/llm.py", "LLM"))
    return types


@functools.lru_cache(maxsize=1)
def vllm_options_model() -> type[BaseModel]:
    # `tokenizer` stays fusechat's (the tokenizer that renders the prompts; never passed to LLM)
    types = {k: t for k, t in vllm_option_types().items() if k not in OWNED and k != "tokenizer"}
    return options_model("VllmOptions", types, base=_Options)
