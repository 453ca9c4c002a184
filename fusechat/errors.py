"""The one base class for errors a user can act on.

The CLI prints these as their message alone (no traceback) and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class FusechatError(Exception):
    """Bad input or configuration; the message names the file, row and field to fix."""
