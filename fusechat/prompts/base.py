"""What every prompt adapter builds on: the canonical prompt, the adapter record, the bad-value error.

A module of its own so that adapters kept in other modules (`fusechat.prompts.demo`) and the
registry that lists them all (`fusechat.prompts.adapters.ADAPTERS`) import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fusechat.errors import FusechatError


class BadValue(FusechatError, ValueError):
    """One row's value cannot be used; `column` names the field."""

    def __init__(self, column: str, why: str):
        super().__init__(why)
        self.column = column


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    gold_answer: str | None = None
    tests: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    name: str
    # "a|b" means: column a, or column b when a is absent
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Prompt]

    def columns(self, available: list[str]) -> tuple[list[str], list[str]]:
        """(columns to read, required columns missing from `available`)."""
        have, missing = [], []
        for spec in self.required:
            present = [c for c in spec.split("|") if c in available]
            if present:
                have.append(present[0])
            else:
                missing.append(" or ".join(repr(c) for c in spec.split("|")))
        have += [c for c in self.optional if c in available and c not in have]
        return have, missing


def text_field(row: dict[str, Any], column: str, optional: bool = False) -> str:
    value = row.get(column)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadValue(column, f"expected a string, got {type(value).__name__}")
    return value


def user_turn(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content.strip()}]
