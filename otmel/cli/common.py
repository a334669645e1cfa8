"""What every command module shares: the one way a command reports a failure."""

from __future__ import annotations

import argparse
import os
import sys

from otmel.errors import WorkerError, one_line


def fail(cmd: str, problem: BaseException | str) -> int:
    """Print `otmel CMD: error: problem` (one line) to stderr and return exit status 2 (a KeyError shows its bare
    message)."""
    print(f"otmel {cmd}: error: {one_line(problem)}", file=sys.stderr)
    return 2


def debug_wanted(args: argparse.Namespace) -> bool:
    """`--debug` or OTMEL_DEBUG=1: re-raise, with the traceback, instead of the one-line report."""
    return bool(getattr(args, "debug", False)) or os.environ.get("OTMEL_DEBUG", "") not in ("", "0")


def worker_failed(cmd: str, exc: WorkerError) -> int:
    """Report a failed training run (`otmel.train.driver.failures`) in one line on stderr; returns the exit status.

    - the worker raised an error the user can fix (`WorkerUserError`): `otmel CMD: error: MESSAGE (worker log: PATH)`,
      the line the driver prints for that error, and 2;
    - any other exception of the training code: `otmel CMD: internal error: TYPE: MESSAGE (worker log: PATH)` (the
      log holds the worker's traceback), and 1;
    - Ray's own failure (a worker process or node died ...): `otmel CMD: Ray error: CAUSE (worker log: PATH)`, and 1.
    """
    if exc.kind == "user":
        return fail(cmd, exc)
    label = "Ray error" if exc.kind == "ray" else "internal error"
    print(f"otmel {cmd}: {label}: {one_line(exc)}", file=sys.stderr)
    return 1
