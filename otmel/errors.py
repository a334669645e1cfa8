"""Errors a user can fix (a config key, a value, a file): the CLI prints them as one line and exits 2.

Each keeps the built-in type callers already catch (`ValueError`, `KeyError`, `FileNotFoundError`), so library
users can handle them either way; `UserError` is the common base the console script looks for.

A training worker's failure reaches the driver as a `WorkerError` (`otmel.train.driver.failures` builds it from
Ray Train's `TrainingFailedError`): `WorkerUserError` when the worker's own exception was the user's to fix (see
`USER_ERROR_TYPES`), else `WorkerError` with `kind` "internal" (a bug) or "ray" (Ray's own failure: a worker
process or node died, the cluster lacks resources).

Every `UserError` and `WorkerError` pickles back to an equal error (same type, message and attributes) whatever its
constructor takes: Ray sends a worker's exception to the driver pickled, possibly more than once.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Iterable
from typing import Any, Literal


def rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Unpickle an exception without calling its `__init__` (whose signature may differ from its `args`)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class UserError(Exception):
    """Base of the errors whose message tells the user what to change."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_exception, (type(self), self.args, dict(self.__dict__)))


class ConfigError(UserError, ValueError):
    """A config value out of its range, of the wrong type, or an impossible combination (the key is named)."""


class UnknownKeyError(UserError, KeyError):
    """A config key (or variant, or search-space key) that does not exist; the message suggests near names."""


class InputFileError(UserError, ValueError):
    """A file the user named is missing, unreadable or malformed (the path, and line where known, are named)."""


# What the user can fix when a command raises it: otmel's own errors and the built-in ones that carry a file or value
# problem (a JSON decoding error is a ValueError). The console script's rule (`otmel.cli.USER_ERRORS`, which adds
# YAML errors), applied to the exception a training worker raised: exit status 2.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, OSError, ValueError, KeyError)

WorkerErrorKind = Literal["user", "internal", "ray"]


class WorkerError(Exception):
    """A Ray Train worker failed; the message is one line ending with where the worker's log is.

    `kind`: "user" (the worker raised an error the user can fix: `WorkerUserError`), "internal" (any other exception
    of the training code: a bug) or "ray" (Ray's own failure: a worker process or its node died, a health check
    timed out, the cluster cannot hold the workers). `cause`: the worker's exception (its message freed of the
    DataLoader's "Caught ... in DataLoader worker process N" wrapping), or Ray's; `cause_type` its class name;
    `rank` the failed worker (None: a failure of the run as a whole); `log` its log file, or the driver's when `rank` is
    None (None when the output went to the console, `otmel train --verbose`)."""

    kind: WorkerErrorKind = "internal"

    def __init__(self, message: str, *, cause: BaseException | None = None, cause_type: str = "",
                 rank: int | None = None, log: str | None = None, kind: WorkerErrorKind | None = None) -> None:
        super().__init__(message)
        self.cause, self.rank, self.log = cause, rank, log
        self.cause_type = cause_type or (type(cause).__name__ if cause is not None else "")
        if kind is not None:
            self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        try:  # the cause is a convenience: an exception that does not pickle is dropped, its text is in the message
            pickle.loads(pickle.dumps(state.get("cause")))
        except Exception:
            state["cause"] = None
        return (rebuild_exception, (type(self), self.args, state))


class WorkerUserError(WorkerError, UserError):
    """A worker raised an error the user can fix (a corrupt shard, a full disk, a diverged run ...): the console
    script prints it as one line `otmel CMD: error: MESSAGE (worker log: PATH)`, exit status 2."""

    kind: WorkerErrorKind = "user"


def one_line(problem: BaseException | str) -> str:
    """The text of the one-line report of `problem`: an exception's message with its whitespace (newlines included)
    collapsed (a KeyError's bare message, not its repr); a string's first line."""
    msg = problem.args[0] if isinstance(problem, KeyError) and problem.args else problem
    if isinstance(msg, str) and "\n" in msg:
        return msg.splitlines()[0]
    return " ".join(str(msg).split())


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest known names, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


__all__ = ["USER_ERROR_TYPES", "ConfigError", "InputFileError", "UnknownKeyError", "UserError", "WorkerError",
           "WorkerUserError", "did_you_mean", "one_line", "rebuild_exception"]
