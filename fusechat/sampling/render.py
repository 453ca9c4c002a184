"""A source's own chat template, applied once, straight to token ids.

The ancestor scripts rendered the chat to a string and let the engine tokenize it again, which adds
a second BOS for every family whose template already writes one (Llama-3, Gemma-2, Mistral). Here
the template is applied exactly once with `tokenize=True` and the engines receive the ids, never
text, so nothing downstream can add another.

Gemma-2's template has no system role (it raises on one): a system message is folded into the first
user turn, separated by a blank line, which is what Google's own examples do.
"""

from __future__ import annotations

from typing import Any

EMPTY = "empty_prompt"


def template_messages(messages: list[dict[str, Any]], family: str) -> list[dict[str, str]]:
    msgs = [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in messages]
    if family == "gemma2" and msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        if msgs and msgs[0]["role"] == "user":
            msgs[0] = {"role": "user", "content": f"{system}\n\n{msgs[0]['content']}"}
        else:
            msgs.insert(0, {"role": "user", "content": system})
    return msgs


def is_empty(messages: list[dict[str, Any]] | None) -> bool:
    """No user turn with any text: nothing for a model to answer."""
    return not any(m["role"] == "user" and str(m["content"] or "").strip() for m in messages or [])


def render_ids(tokenizer, messages: list[dict[str, Any]], family: str) -> list[int]:
    """Token ids of the chat with the generation prompt; exactly one BOS when the family has one."""
    ids = list(
        tokenizer.apply_chat_template(
            template_messages(messages, family),
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
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
