"""The `otmel` console script. Every subcommand is parsed in this package and calls the library; nothing else
in `otmel/` parses arguments.

Each subcommand has one `_cmd_NAME(sub)` function (in `data.py`, `train.py`, `link.py`, `serve.py`, `analysis.py`)
that adds its parser and sets `func` to its handler; `main` is the entry point (`otmel = "otmel.cli:main"`,
`python -m otmel.cli`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import yaml

from otmel.cli import analysis, data, link, plan, serve, train
from otmel.cli.common import fail
from otmel.errors import UserError
from otmel.version import __version__

# What a user can fix: our own errors, and the built-in ones that carry a file or value problem.
USER_ERRORS = (UserError, OSError, json.JSONDecodeError, yaml.YAMLError, ValueError, KeyError)

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [*data.COMMANDS, *train.COMMANDS, *link.COMMANDS,
                                                                    *serve.COMMANDS, *analysis.COMMANDS,
                                                                    *plan.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otmel",
        description="OT-MEL multimodal entity linking: pack data, train on Ray, evaluate, link.",
    )
    parser.add_argument("--version", action="version", version=f"otmel {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also OTMEL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("OTMEL_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (`otmel.errors.UserError`, a bad value, a missing / unreadable / malformed
    file) is one line `otmel CMD: error: ...` on stderr and exit status 2; anything else is reported as an internal
    error (exit 1). `--debug` or OTMEL_DEBUG=1 re-raises instead, with the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    cmd = args.command
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"otmel {cmd}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if _debug(args):
            raise
        return fail(cmd, exc)
    except Exception as exc:
        if _debug(args):
            raise
        print(f"otmel {cmd}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]} "
              "(run with --debug or OTMEL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
