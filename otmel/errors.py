"""Errors a user can fix (a config key, a value, a file): the CLI prints them as one line and exits 2.

Each keeps the built-in type callers already catch (`ValueError`, `KeyError`, `FileNotFoundError`), so library
users can handle them either way; `UserError` is the common base the console script looks for.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Base of the errors whose message tells the user what to change."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A config value out of its range, of the wrong type, or an impossible combination (the key is named)."""


class UnknownKeyError(UserError, KeyError):
    """A config key (or variant, or search-space key) that does not exist; the message suggests near names."""


class InputFileError(UserError, ValueError):
    """A file the user named is missing, unreadable or malformed (the path, and line where known, are named)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest known names, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


__all__ = ["ConfigError", "InputFileError", "UnknownKeyError", "UserError", "did_you_mean"]
