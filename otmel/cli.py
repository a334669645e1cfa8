"""The `otmel` console script. Every subcommand is parsed here and calls the library; nothing else in
`otmel/` parses arguments.

Each subcommand has one `_cmd_NAME(sub)` function that adds its parser and sets `func` to its handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from otmel import __version__

# ---------------------------------------------------------------------------------------------- data


def _cmd_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the synthetic multimodal benchmark (cleaned MEL layout)")
    p.add_argument("--out", required=True, help="output folder (created; re-running over it is safe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="1.0 = ~2,000 entities / 3,000 mentions")
    p.add_argument("--image-size", type=int, default=64, help="picture side in pixels")
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: all CPUs)")

    def run(args: argparse.Namespace) -> int:
        import json

        from otmel.data.synth import generate

        stats = generate(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size,
                         workers=args.workers)
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

        ratios = tuple(float(x) for x in args.split_ratios.split(","))
        workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
        try:
            manifest = pack(args.src, args.fmt, args.out, shard_size=args.shard_size, skip_bad=args.skip_bad,
                            split_seed=args.split_seed, split_ratios=ratios, num_workers=workers,
                            progress=not args.no_progress)
        except BadRecordsError as exc:
            print(f"otmel pack: {exc}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as exc:
            print(f"otmel pack: {exc}", file=sys.stderr)
            return 2
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


# ------------------------------------------------------------------------------------------- model


def _cmd_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train OT-MEL on Ray Train (+ DeepSpeed); no arguments: the embedded synthetic default",
        description="Train OT-MEL with Ray Train. With no arguments: start a local Ray, generate and pack the "
        "synthetic benchmark if absent, train the tiny model on 2 CPU workers, evaluate, print the table.",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.epochs=2")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.launch import main as train_main

        train_main(args.config, args.overrides, args.resume)
        return 0

    p.set_defaults(func=run)


def _cmd_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="string-match and CLS-only baselines (default: the synthetic data)")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for the CLS-only run")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.launch import baselines

        baselines(args.config, args.overrides, args.split)
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ sweeps and ablations


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cmd_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hyper-parameter sweep with Ray Tune + ASHA; every trial a Ray Train run",
        description="Sweep the run config over the search space of a sweep file (configs/search/*.yaml). "
        "Writes RUN.storage/sweeps/NAME/{ranked.md,ranked.csv,rows.json,best.yaml}.",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--search", required=True, help="sweep file, e.g. configs/search/ot.yaml")
    p.add_argument("--name", default=None, help="sweep name (default: the sweep file's name + a timestamp)")
    p.add_argument("--resume", action="store_true", help="restore the interrupted sweep --name and finish it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for every trial")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.tune import run_sweep

        if args.resume and not args.name:
            print("otmel tune: --resume needs --name", file=sys.stderr)
            return 2
        run_sweep(args.config, args.search, args.overrides, name=args.name, resume=args.resume)
        return 0

    p.set_defaults(func=run)


def _cmd_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="the Table-2 ablation: variants x seeds as Tune trials, summarised as a table",
        description="Train every Table-2 variant with every seed (each a Ray Train run, scheduled by Tune) "
        "and write RUN.storage/sweeps/NAME/{ablation.md,ablation.csv,rows.json}.",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--variants", default=None, help="comma-separated (default: OT,F1,F2,M1,M2,A1,O1,O2,KD,K1,K2)")
    p.add_argument("--seeds", default="0,1", help="comma-separated train.seed values (default 0,1)")
    p.add_argument("--concurrent", type=int, default=1, help="trials at a time (default 1)")
    p.add_argument("--name", default=None, help="experiment name (default: ablation + a timestamp)")
    p.add_argument("--resume", action="store_true", help="restore the interrupted ablation --name and finish it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. train.epochs=3")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.ablate import run_ablation

        if args.resume and not args.name:
            print("otmel ablate: --resume needs --name", file=sys.stderr)
            return 2
        run_ablation(args.config, args.overrides, variants=_csv_list(args.variants) if args.variants else None,
                     seeds=[int(s) for s in _csv_list(args.seeds)], name=args.name, resume=args.resume,
                     concurrent=args.concurrent)
        return 0

    p.set_defaults(func=run)


def _cmd_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="figures from finished experiments (e.g. `otmel plot sweep RUN`)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    s = kinds.add_parser("sweep", help="H@1 and MRR against model.reg (and the plan entropy), as in Fig. 3")
    s.add_argument("run", metavar="RUN", help="sweep directory (runs/sweeps/NAME) or its NAME under runs/sweeps")
    s.add_argument("--out", default=None, help="PNG path (default: RUN/reg.png)")
    s.add_argument("--x", default="model.reg", help="swept key on the x axis (default model.reg)")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.plots import plot_sweep, resolve_sweep

        try:
            out = plot_sweep(resolve_sweep(args.run), args.out, x_key=args.x)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            print(f"otmel plot: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0

    s.set_defaults(func=run)


# ------------------------------------------------------------------------------------ linking (inference)


def _link_errors() -> tuple[type[BaseException], ...]:
    from otmel.data.manifest import ManifestError
    from otmel.link import CheckpointError, EntityIndexError, LinkInputError

    return CheckpointError, EntityIndexError, LinkInputError, ManifestError, KeyError


def _fail(cmd: str, exc: BaseException) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"otmel {cmd}: {msg}", file=sys.stderr)
    return 2


def _cmd_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="encode a KG once with a checkpoint: cached entity features + retrieval index",
        description="Compute every entity-only feature of the packed KG with CHECKPOINT (parallel Ray tasks over "
        "the KG shards) and write an index folder (entities.safetensors + index.json, with the checkpoint's "
        "sha256) for `otmel link` / `otmel eval --index`.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--kg", required=True, help="packed shard folder whose KG to encode, e.g. shards/NAME")
    p.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, one KG shard per task (0: in this process)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from otmel.link import build_index

        try:
            index = build_index(args.checkpoint, args.kg, args.out, workers=args.workers, batch_size=args.batch_size,
                                progress=not args.no_progress)
        except _link_errors() as exc:
            return _fail("index", exc)
        print(f"indexed {len(index)} entities ({index.meta['counts']['with_image']} with an image) of {args.kg} "
              f"in {index.meta['build']['seconds']:.1f} s -> {args.out} (checkpoint sha256 "
              f"{index.checkpoint_sha256[:16]}...)")
        return 0

    p.set_defaults(func=run)


def _cmd_link(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("link", help="link a mention in a text (+ image) to the top-k entities of an index")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--index", required=True, help="index folder written by `otmel index` with this checkpoint")
    p.add_argument("--text", required=True, help="the sentence the mention occurs in")
    p.add_argument("--mention", required=True, help="the mention's surface form")
    p.add_argument("--image", default=None, help="the mention's image file (optional)")
    p.add_argument("-k", type=int, default=10, help="entities to return (default 10)")
    p.add_argument("--mode", choices=["two-stage", "exhaustive"], default="two-stage")
    p.add_argument("--candidates", type=int, default=128, help="two-stage: K entities re-ranked by the full model")
    p.add_argument("--first-stage", choices=["summary", "cls", "fusion"], default="summary",
                   help="two-stage retrieval score (see docs/linking.md)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args: argparse.Namespace) -> int:
        import json
        import time
        import warnings

        from otmel.link import Linker, MentionNotInTextWarning

        try:
            t0 = time.perf_counter()
            linker = Linker.from_checkpoint(args.checkpoint, args.index, mode=args.mode, candidates=args.candidates,
                                            first_stage=args.first_stage)
            t1 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MentionNotInTextWarning)
                hits = linker.link(args.text, args.mention, args.image, k=args.k)
            t2 = time.perf_counter()
        except _link_errors() as exc:
            return _fail("link", exc)
        for w in caught:
            print(f"otmel link: warning: {w.message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"mention": args.mention, "mode": args.mode, "candidates": args.candidates,
                              "seconds": {"load": t1 - t0, "link": t2 - t1},
                              "results": [h.to_dict() for h in hits]}, indent=1, ensure_ascii=False))
            return 0
        print(f"{'rank':>4}  {'qid':<12} {'S_O':>7} {'S_F':>7} {'S_T':>7} {'S_V':>7}  name")
        fmt = lambda x: f"{x:7.4f}" if x is not None else f"{'-':>7}"  # noqa: E731
        for h in hits:
            print(f"{h.rank:>4}  {h.qid:<12} {fmt(h.S_O)} {fmt(h.S_F)} {fmt(h.S_T)} {fmt(h.S_V)}  {h.name}")
        print(f"({args.mode}, {len(linker.index)} entities, {1e3 * (t2 - t1):.0f} ms)", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def _cmd_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="metrics and wall time of exhaustive vs two-stage linking on a packed split")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--shards", required=True, help="packed shard folder (its KG is the candidate set)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--mode", default="both", choices=["both", "exhaustive", "two-stage"])
    p.add_argument("--candidates", type=int, default=128, help="two-stage: K entities re-ranked")
    p.add_argument("--first-stage", choices=["summary", "cls", "fusion"], default="summary")
    p.add_argument("--index", default=None, help="reuse an index of this checkpoint and KG (else encode the KG)")
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of N mentions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="Ray actors encoding the KG (0: in this process)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result (per mention) here")

    def run(args: argparse.Namespace) -> int:
        import json

        from otmel.link.evaluate import evaluate, format_eval

        modes = ["exhaustive", "two-stage"] if args.mode == "both" else [args.mode]
        try:
            res = evaluate(args.checkpoint, args.shards, args.split, modes=modes, candidates=args.candidates,
                           first_stage=args.first_stage, index=args.index, limit=args.limit, seed=args.seed,
                           workers=args.workers, progress=True)
        except (*_link_errors(), ValueError) as exc:
            return _fail("eval", exc)
        print(format_eval(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    p.set_defaults(func=run)


def _cmd_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="PNG of the attention map vs the OT plan of a link (cf. the paper's Fig. 4)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--index", required=True, help="index folder of this checkpoint (the KG to link against)")
    p.add_argument("--text", required=True)
    p.add_argument("--mention", required=True)
    p.add_argument("--image", default=None, help="the mention's image (the fusion panels need one)")
    p.add_argument("--entity", default=None, help="explain the match with this entity id (default: the top-1)")
    p.add_argument("--out", required=True, help="PNG to write")

    def run(args: argparse.Namespace) -> int:
        from otmel.link import Linker
        from otmel.link.explain import explain

        try:
            linker = Linker.from_checkpoint(args.checkpoint, args.index)
            path, ex = explain(linker, args.text, args.mention, args.image, entity=args.entity, out=args.out)
        except (*_link_errors(), ValueError) as exc:
            return _fail("explain", exc)
        print(f"{path}: {args.mention!r} -> {ex.entity.qid} {ex.entity.name} (S_O {ex.entity.S_O:.4f}, "
              f"rank {ex.entity.rank})")
        return 0

    p.set_defaults(func=run)


def _cmd_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="H@1 by text length (Fig. 6) and prediction time per variant (Table 4)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run (or checkpoint) directories; one row each in Fig. 6")
    p.add_argument("--out", default=None, help="output folder (default RUN/report)")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--limit", type=int, default=None, help="Fig. 6 on a seeded subset of N mentions")
    p.add_argument("--timing-split", default="dev", choices=["dev", "test"])
    p.add_argument("--timing-limit", type=int, default=None, help="Table 4 on a seeded subset of N mentions")
    p.add_argument("--variants", default="OT,A1,KD", help="variants timed (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    def run(args: argparse.Namespace) -> int:
        from otmel.link.report import report

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)

        try:
            path = report(args.runs, args.out, split=args.split, limit=args.limit, timing_split=args.timing_split,
                          timing_limit=args.timing_limit, variants=args.variants.split(","), repeats=args.repeats)
        except (*_link_errors(), ValueError) as exc:
            return _fail("report", exc)
        print(path.read_text())
        print(f"written to {path.parent}")
        return 0

    p.set_defaults(func=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _cmd_synth, _cmd_pack, _cmd_verify, _cmd_train, _cmd_baseline,
    _cmd_tune, _cmd_ablate, _cmd_plot,
    _cmd_index, _cmd_link, _cmd_eval, _cmd_explain, _cmd_report,
]


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


if __name__ == "__main__":
    sys.exit(main())
