"""What every command module shares: the one way a command reports a failure."""

from __future__ import annotations

import sys


def fail(cmd: str, problem: BaseException | str) -> int:
    """Print `otmel CMD: problem` to stderr and return exit status 2 (a KeyError shows its bare key)."""
    msg = problem.args[0] if isinstance(problem, KeyError) and problem.args else problem
    print(f"otmel {cmd}: {msg}", file=sys.stderr)
    return 2
