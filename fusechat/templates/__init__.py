"""Chat templates as the hub ships them, and the training templates that assistant-only loss needs.

A chat template is identified by its exact text, never by the model's name: a fine-tune that keeps
Llama-3.1's template is trained like Llama-3.1, and a changed template is never mistaken for a
known one. For SFT with `assistant_only_loss`, the template needs `{% generation %}` markers around
what the assistant writes; no published target's template has them. The training template is:

1. the model's own, when it already has the markers;
2. one shipped here, for the real templates TRL does not patch (Llama-3.1, Llama-3.2, Mistral v3):
   each is the hub template with one change, markers around an assistant message's content and
   its end-of-turn token, so every conversation renders to exactly the same string and ids;
3. TRL's patched copy (`trl.chat_template_utils.get_training_chat_template`) for the families it
   knows (Llama-3, Qwen-2.5, Gemma/Gemma-2, ...).

Templates that print a date (Llama-3.1 and 3.2: "Today Date: ...") get it from the recipe's
`template_date` through `template_kwargs`; Llama-3.2's own default is the day of the run, which
would make a run's prompt tokens, and every id hashed from them, change from day to day.

This module is at the bottom of the layers (sampling, scoring, training and `fusechat doctor` use
it) and imports neither torch nor TRL at import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fusechat.errors import FusechatError

HERE = Path(__file__).resolve().parent
DEFAULT_DATE = "26 Jul 2024"  # the fallback date the Llama-3.1/3.2 templates themselves carry


class TemplateError(FusechatError, ValueError):
    """A chat template fusechat cannot use as asked; the message names the model and the fix."""


@dataclass(frozen=True)
class KnownTemplate:
    name: str  # the file stem: TRL's name where TRL ships the original
    family: str  # the recipe's `family` of models that ship it
    models: str  # who ships it, for messages
    original: str  # "trl:<file>" or "fusechat:<file>"
    training: str  # "trl:<file>" or "fusechat:<file>"
    end_of_turn: str  # the token that ends an assistant turn (trained, so the model learns to stop)


KNOWN: tuple[KnownTemplate, ...] = (
    KnownTemplate("llama3", "llama3", "meta-llama/Meta-Llama-3-*-Instruct", "trl:llama3.jinja",
                  "trl:llama3_training.jinja", "<|eot_id|>"),
    KnownTemplate("llama3_1", "llama3", "meta-llama/Llama-3.1-*-Instruct", "trl:llama3_1.jinja",
                  "fusechat:llama3_1_training.jinja", "<|eot_id|>"),
    KnownTemplate("llama3_2", "llama3", "meta-llama/Llama-3.2-*-Instruct", "trl:llama3_2.jinja",
                  "fusechat:llama3_2_training.jinja", "<|eot_id|>"),
    KnownTemplate("qwen2_5", "qwen2", "Qwen/Qwen2.5-*-Instruct", "trl:qwen2_5.jinja",
                  "trl:qwen2_5_training.jinja", "<|im_end|>"),
    KnownTemplate("gemma", "gemma2", "google/gemma-2-*-it (and Gemma 1)", "trl:gemma.jinja",
                  "trl:gemma_training.jinja", "<end_of_turn>"),
    # TRL ships no Mistral template; this is the v3 template of mistralai/Mistral-Large-Instruct-2407
    # (also Mistral-7B-Instruct-v0.3 and Mixtral-8x22B-Instruct), kept byte-exact.
    KnownTemplate("mistral_v3", "mistral", "mistralai/Mistral-Large-Instruct-2407, Mistral-7B-Instruct-v0.3",
                  "fusechat:mistral_v3.jinja", "fusechat:mistral_v3_training.jinja", "</s>"),
)


def trl_template_dir() -> Path | None:
    """TRL's folder of byte-exact hub templates, found without importing TRL (slow)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "chat_templates"


@cache
def read(ref: str) -> str:
    """The text of "trl:<file>" or "fusechat:<file>"."""
    where, name = ref.split(":", 1)
    folder = HERE if where == "fusechat" else trl_template_dir()
    if folder is None:
        raise TemplateError(f"{ref}: TRL is not installed, and its chat templates with it")
    return (folder / name).read_text(encoding="utf-8")


def template_text(tokenizer) -> str | None:
    """The tokenizer's default chat template (named variants load as a dict)."""
    t = tokenizer.chat_template
    return t.get("default") if isinstance(t, dict) else t


def has_generation_markers(template: str) -> bool:
    import re

    # the same test TRL applies (trl.chat_template_utils.has_generation_markers), without importing TRL
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def identify(template: str | None) -> KnownTemplate | None:
    """The known template this text is, exactly (the original or its training variant), or None."""
    if not template:
        return None
    for known in KNOWN:
        try:
            if template in (read(known.original), read(known.training)):
                return known
        except (OSError, TemplateError):
            continue
    return None


def template_kwargs(date: str = DEFAULT_DATE) -> dict[str, Any]:
    """Extra variables every render passes: the date of templates that print one. Templates that
    print none ignore it."""
    return {"date_string": date}


def template_messages(messages: list[dict[str, Any]], family: str) -> list[dict[str, str]]:
    """Plain {role, content} messages the family's template accepts.

    Gemma-2's template has no system role (it raises on one): a system message is folded into the
    first user turn, separated by a blank line, which is what Google's own examples do.
    """
    msgs = [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in messages]
    if family == "gemma2" and msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        if msgs and msgs[0]["role"] == "user":
            msgs[0] = {"role": "user", "content": f"{system}\n\n{msgs[0]['content']}"}
        else:
            msgs.insert(0, {"role": "user", "content": system})
    return msgs


@dataclass(frozen=True)
class TrainingTemplate:
    text: str
    source: str  # where it came from, for manifests and `fusechat doctor`
    known: KnownTemplate | None


def training_template(tokenizer, model_ref: str, family: str) -> TrainingTemplate:
    """The template assistant-only SFT trains with (see the module docs for the order tried).

    Raises TemplateError naming the model, the family, what was tried and the fix."""
    text = template_text(tokenizer)
    if not text:
        raise TemplateError(
            f"{model_ref}: the tokenizer has no chat template; add the model's template to its "
            "tokenizer_config.json (or chat_template.jinja), or set sft.assistant_only_loss: false"
        )
    known = identify(text)
    if has_generation_markers(text):
        return TrainingTemplate(text, "the model's own ({% generation %} markers)", known)
    if known is not None and known.training.startswith("fusechat:"):
        return TrainingTemplate(read(known.training), f"{known.training} (for {known.name})", known)

    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        name = known.training if known else "TRL's patched template"
        return TrainingTemplate(patched, name, known)
    raise TemplateError(
        f"{model_ref} (family {family}): its chat template has no {{% generation %}} markers and is not one "
        f"fusechat or TRL can patch. Tried: the template's own markers; an exact match with the known "
        f"templates ({'; '.join(f'{k.name} ({k.models})' for k in KNOWN)}); TRL's get_training_chat_template. Fix: put {{% generation %}} ... "
        "{% endgeneration %} around each assistant message's content and its end-of-turn token in the "
        "template, or set sft.assistant_only_loss: false to train on whole conversations"
    )
