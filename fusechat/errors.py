"""The errors a user can act on.

The CLI prints these as their message alone (no traceback) and exits 2; anything else is a bug and
keeps its traceback. Three kinds:

- `InputError`: a file, table or folder a stage cannot use. The message starts with the file, then
  the row and the field where there is one: `scores/scores.parquet: row 4: field reward: is
  infinite`. A table an earlier stage should have written says which command writes it.
- `RecipeError` (fusechat.recipe): a recipe that cannot be used; names the recipe file and field path.
- `IncompleteError`: a stage that could not compute everything; what it finished is on disk and a
  rerun computes only the rest.
"""

from __future__ import annotations


class FusechatError(Exception):
    """Bad input or configuration; the message names the file, row and field to fix."""


class InputError(FusechatError, ValueError):
    """A file a stage cannot use: `InputError(path, why, row=..., field=...)` or one preformatted message."""

    def __init__(self, where: object, why: str | None = None, *, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field = where, row, field
        if why is None:
            super().__init__(str(where))
            return
        parts = [str(where)]
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field}")
        super().__init__(": ".join([*parts, why]))


class IncompleteError(FusechatError, RuntimeError):
    """Some work could not be computed; the message names what and why, finished work is kept."""
