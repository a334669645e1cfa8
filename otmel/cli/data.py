"""`otmel synth`, `otmel pack`, `otmel verify`: the data commands."""

from __future__ import annotations

import argparse
import sys
from typing import cast

from otmel.cli.common import fail


def _cmd_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the synthetic multimodal benchmark (cleaned MEL layout)")
    p.add_argument("--out", required=True, help="output folder (created; re-running over it is safe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="1.0 = ~2,000 entities / 3,000 mentions")
    p.add_argument("--mentions", type=int, default=None,
                   help="mentions to draw (default 3,000 x scale): a large KG with few mentions, e.g. --scale 500 "
                   "--mentions 3000 for a 1M-entity KG")
    p.add_argument("--image-size", type=int, default=64, help="picture side in pixels")
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: all CPUs)")
    p.add_argument("--mode", choices=["standard", "sets"], default="standard",
                   help="standard: names + distinguishing objects; sets: each entity is singled out only by the "
                   "set of its objects (name groups of 4 sharing a salient object and all but one other; "
                   "otmel/data/synth_sets.py)")

    def run(args: argparse.Namespace) -> int:
        import json

        from otmel.data.synth import generate

        stats = generate(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size,
                         workers=args.workers, mode=args.mode, mentions=args.mentions)
        print(json.dumps(stats, indent=1))
        return 0

    p.set_defaults(func=run)


def _cmd_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a dataset into WebDataset shards + manifest.json",
        description="Read SRC (cleaned MEL layout folder, MELBench JSON, or JSONL folder; see "
        "docs/data.md) and write train/dev/test mention shards, KG shards and manifest.json into --out.",
    )
    p.add_argument("src", help="dataset folder (cleaned, jsonl) or MELBench .json file")
    p.add_argument("--format", required=True, choices=["cleaned", "melbench", "jsonl"], dest="fmt")
    p.add_argument("--out", required=True, help="shard folder, e.g. shards/NAME (created)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the melbench train/dev/test split")
    p.add_argument("--split-ratios", default="0.7,0.1,0.2", help="melbench train,dev,test ratios")
    p.add_argument("--workers", type=int, default=None, help="image processes (default: CPUs, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        import os

        from otmel.data.pack import pack
        from otmel.data.readers import BadRecordsError

        # three of them: the MELBench reader checks (ValueError, reported below)
        ratios = cast("tuple[float, float, float]", tuple(float(x) for x in args.split_ratios.split(",")))
        workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
        try:
            manifest = pack(args.src, args.fmt, args.out, shard_size=args.shard_size, skip_bad=args.skip_bad,
                            split_seed=args.split_seed, split_ratios=ratios, num_workers=workers,
                            progress=not args.no_progress)
        except (BadRecordsError, FileNotFoundError, ValueError) as exc:
            return fail("pack", exc)
        nshards = sum(len(s) for s in manifest["shards"].values())
        print(f"packed {manifest['counts']} into {nshards} shards in {args.out}; "
              f"masked images {manifest['masked_images']}; skipped {manifest['skipped']}")
        return 0

    p.set_defaults(func=run)


def _cmd_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-check the shards of a packed folder against its manifest")
    p.add_argument("shard_dir", help="folder written by `otmel pack`")
    p.add_argument("--quick", action="store_true", help="sizes and sha256 only, no tar read-back")

    def run(args: argparse.Namespace) -> int:
        from otmel.data.manifest import verify

        report = verify(args.shard_dir, deep=not args.quick)
        if report.ok:
            print(f"ok: {report.checked} shards in {args.shard_dir} match the manifest")
            return 0
        for problem in report.problems:
            print(f"BAD {problem}", file=sys.stderr)
        what = f"{len(report.bad_shards)} bad shard(s): {', '.join(report.bad_shards)}" if report.bad_shards else ""
        print(f"otmel verify: {args.shard_dir} FAILED {what}".rstrip(), file=sys.stderr)
        return 1

    p.set_defaults(func=run)


COMMANDS = [_cmd_synth, _cmd_pack, _cmd_verify]
