"""Errors that cross component boundaries.

`UserError` is anything the person at the keyboard can fix (a missing file, a bad flag, an
unsupported model); command-line entry points print its message on one line and exit 2,
never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input, explained in one line."""
