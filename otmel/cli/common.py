"""What every command module shares: the one way a command reports a failure."""

from __future__ import annotations

import sys


def fail(cmd: str, problem: BaseException | str) -> int:
    """Print `otmel CMD: error: problem` (one line) to stderr and return exit status 2 (a KeyError shows its bare
    message)."""
    msg = problem.args[0] if isinstance(problem, KeyError) and problem.args else problem
    text = " ".join(str(msg).split()) if not isinstance(msg, str) or "\n" not in msg else str(msg).splitlines()[0]
    print(f"otmel {cmd}: error: {text}", file=sys.stderr)
    return 2
