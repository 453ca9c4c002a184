"""A source's own chat template, applied once, straight to token ids.

The ancestor scripts rendered the chat to a string and let the engine tokenize it again, which adds
a second BOS for every family whose template already writes one (Llama-3, Gemma-2, Mistral). Here
the template is applied exactly once with `tokenize=True` and the engines receive the ids, never
text, so nothing downstream can add another.

Messages go through `fusechat.templates.template_messages` (Gemma-2's system fold) and every render
gets the recipe's template variables (`fusechat.templates.template_kwargs`: the date Llama-3.x
templates print), so the same prompt renders to the same ids on any day.
"""

from __future__ import annotations

from typing import Any

from fusechat.templates import template_kwargs, template_messages

EMPTY = "empty_prompt"


def is_empty(messages: list[dict[str, Any]] | None) -> bool:
    """No user turn with any text: nothing for a model to answer."""
    return not any(m["role"] == "user" and str(m["content"] or "").strip() for m in messages or [])


def render_ids(
    tokenizer, messages: list[dict[str, Any]], family: str, variables: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of the chat with the generation prompt; exactly one BOS when the family has one.
    `variables`: the template variables (default: `template_kwargs()`, the template's own date)."""
    ids = list(
        tokenizer.apply_chat_template(
            template_messages(messages, family),
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
            **(template_kwargs() if variables is None else variables),
        )
    )
    bos = tokenizer.bos_token_id
    if bos is not None:
        # A template that writes BOS plus a tokenizer that prepends one yields two; keep one.
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids.pop(0)
        if not ids or ids[0] != bos:
            ids.insert(0, bos)
    return ids
