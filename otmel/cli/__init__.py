"""The `otmel` console script. Every subcommand is parsed in this package and calls the library; nothing else
in `otmel/` parses arguments.

Each subcommand has one `_cmd_NAME(sub)` function (in `data.py`, `train.py`, `link.py` or `analysis.py`) that adds
its parser and sets `func` to its handler; `main` is the entry point (`otmel = "otmel.cli:main"`,
`python -m otmel.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from otmel import __version__
from otmel.cli import analysis, data, link, train

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [*data.COMMANDS, *train.COMMANDS, *link.COMMANDS,
                                                                    *analysis.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otmel",
        description="OT-MEL multimodal entity linking: pack data, train on Ray, evaluate, link.",
    )
    parser.add_argument("--version", action="version", version=f"otmel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)
