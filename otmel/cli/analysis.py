"""`otmel plans`: analyses of finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from otmel.cli.common import fail


def _cmd_plans(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plans",
        help="the OT plans of trained runs per module: cost range / reg, entropy, distance to attention",
        description="Score the first dev mentions against the first KG entities with each run's best weights, "
        "capture every OT plan (dense and factored paths) and print, per module, the distribution of the cost "
        "range over reg, the normalised plan entropy and the TV distance to attention of the same scores, plus "
        "the entropy of the same costs re-solved with 200 iterations or other regs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders with results.json")
    p.add_argument("--out", default=None, help="PNG of the histograms")
    p.add_argument("--mentions", type=int, default=16)
    p.add_argument("--entities", type=int, default=32)

    def run(args: argparse.Namespace) -> int:
        from otmel.analysis.plan_report import report

        try:
            text = report([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.mentions,
                          args.entities)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            return fail("plans", exc)
        print(text)
        return 0

    p.set_defaults(func=run)


COMMANDS = [_cmd_plans]
