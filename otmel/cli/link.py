"""`otmel index`, `link`, `eval`, `explain`, `report`: linking at KG scale (inference)."""

from __future__ import annotations

import argparse
import sys
from typing import cast

from otmel.cli.common import add_address, fail, ray_handler


def _link_errors() -> tuple[type[BaseException], ...]:
    from otmel.data.manifest import ManifestError
    from otmel.link import CheckpointError, EntityIndexError, LinkInputError

    return CheckpointError, EntityIndexError, LinkInputError, ManifestError, KeyError


def _ann_args(p: argparse.ArgumentParser, build: bool) -> None:
    g = p.add_argument_group("first-stage index (see docs/linking.md)")
    if build:
        g.add_argument("--ann", choices=["auto", "exact", "hnsw", "ivfpq"], default=None,
                       help="first-stage search (default auto: exact below 250,000 entities, hnsw below "
                       "2,000,000, else ivfpq; docs/linking.md)")
        g.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M")
        g.add_argument("--ef-construction", type=int, default=40, help="HNSW build beam")
        g.add_argument("--nlist", type=int, default=0, help="IVF lists (0: ~4 sqrt(n))")
        g.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers = bytes per vector (0: dim / 4)")
        g.add_argument("--pq-bits", type=int, default=8)
        g.add_argument("--train-size", type=int, default=200_000, help="IVF-PQ training sample")
        g.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                       help="re-rank features on disk (float16 halves the store)")
        g.add_argument("--vector-dtype", choices=["float32", "float16"], default="float32",
                       help="first-stage vectors on disk (float16 halves them; exact search converts)")
    g.add_argument("--ef-search", type=int, default=None, help="HNSW query beam (default: the index's)")
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default: the index's)")
    g.add_argument("--refine", type=int, default=None, help="fetch refine x K by the ANN, keep K by exact score")


def search_overrides(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k in ("ef_search", "nprobe", "refine") if (v := getattr(args, k, None)) is not None}


def _ann_params(args: argparse.Namespace) -> object:
    from otmel.link.ann import AnnParams

    p = AnnParams(kind=args.ann or "auto", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                  nlist=args.nlist, pq_m=args.pq_m, pq_bits=args.pq_bits, train_size=args.train_size)
    return p.with_search(**search_overrides(args))


def _cmd_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="encode a KG once with a checkpoint: a disk-backed entity store + first-stage index; live updates",
        description="Build: compute every entity-only feature of the packed KG with CHECKPOINT (parallel Ray tasks "
        "over the KG shards), streamed into a memory-mapped store, plus an exact or faiss first-stage index "
        "(`--ann`). Update an index in place: `--add KG --into INDEX` appends entities (same checkpoint, nothing "
        "re-encoded), `--remove QID... --into INDEX` hides entities, `--compact --into INDEX` rewrites it. Every "
        "change switches the manifest atomically: an interrupted one leaves the previous index usable.",
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (or run directory)")
    p.add_argument("--kg", default=None, help="packed shard folder whose KG to encode, e.g. shards/NAME")
    p.add_argument("--out", default=None, help="index folder to build (replaced atomically)")
    p.add_argument("--into", default=None, help="index folder to update (--add / --remove / --compact)")
    p.add_argument("--add", default=None, metavar="KG", help="packed shard folder of new entities to append")
    p.add_argument("--remove", nargs="+", default=None, metavar="QID", help="entities to hide until --compact")
    p.add_argument("--compact", action="store_true", help="rewrite live rows into one segment, rebuild its ANN")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, one KG shard per task (0: in this process)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    add_address(p, config_key=False)
    _ann_args(p, build=True)

    def run(args: argparse.Namespace) -> int:
        from otmel.link import build_index
        from otmel.link.ann import AnnError
        from otmel.link.index_update import add_to_index, compact_index, remove_from_index

        updates = [a for a in ("add", "remove", "compact") if getattr(args, a)]
        errors = cast("tuple[type[BaseException], ...]", (*_link_errors(), AnnError))
        try:
            if len(updates) > 1:
                return fail("index", ValueError(f"give one of --add, --remove, --compact, not {updates}"))
            if updates:
                if not args.into:
                    return fail("index", ValueError(f"--{updates[0]} needs --into INDEX (the folder to update)"))
                if updates[0] == "add":
                    r = add_to_index(args.into, args.add, args.checkpoint, workers=args.workers,
                                     batch_size=args.batch_size, progress=not args.no_progress)
                    print(f"added {r['added']} entities of {args.add} to {args.into} as {r['segment']} "
                          f"in {r['seconds']:.1f} s")
                elif updates[0] == "remove":
                    r = remove_from_index(args.into, args.remove)
                    print(f"removed {r['removed']} entities from {args.into} ({r['tombstones']} hidden until "
                          "--compact)")
                else:
                    r = compact_index(args.into, ann=_ann_params(args) if args.ann else None)  # type: ignore[arg-type]
                    print(f"compacted {args.into}: {r['rows']} entities ({r['dropped']} removed rows dropped) "
                          f"in {r['seconds']:.1f} s")
                return 0
            missing = [f"--{k}" for k in ("checkpoint", "kg", "out") if not getattr(args, k)]
            if missing:
                return fail("index", ValueError(f"building an index needs {', '.join(missing)} "
                                                "(or update one with --add/--remove/--compact --into INDEX)"))
            index = build_index(args.checkpoint, args.kg, args.out, workers=args.workers, batch_size=args.batch_size,
                                progress=not args.no_progress, ann=_ann_params(args),  # type: ignore[arg-type]
                                store_dtype=args.store_dtype, vector_dtype=args.vector_dtype)
        except errors as exc:
            return fail("index", exc)
        b = index.meta["build"]
        print(f"indexed {len(index)} entities ({index.meta['counts']['with_image']} with an image) of {args.kg} "
              f"in {b['seconds']:.1f} s ({b['ann_seconds']:.1f} s for the {index.params.kind} first stage) -> "
              f"{args.out} (checkpoint sha256 {index.checkpoint_sha256[:16]}...)")
        return 0

    p.set_defaults(func=ray_handler("index", run))


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
    _ann_args(p, build=False)

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
                linker.search = search_overrides(args)
                hits = linker.link(args.text, args.mention, args.image, k=args.k)
            t2 = time.perf_counter()
        except _link_errors() as exc:
            return fail("link", exc)
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
    add_address(p, config_key=False)
    p.add_argument("--terms", action="store_true",
                   help="exhaustive mode: also rank by each score term alone (S_F, S_T, S_V, text cosine, text CA)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result (per mention) here")
    _ann_args(p, build=False)

    def run(args: argparse.Namespace) -> int:
        import json

        from otmel.link.evaluate import evaluate, format_eval

        modes = ["exhaustive", "two-stage"] if args.mode == "both" else [args.mode]
        try:
            res = evaluate(args.checkpoint, args.shards, args.split, modes=modes, candidates=args.candidates,
                           first_stage=args.first_stage, index=args.index, limit=args.limit, seed=args.seed,
                           workers=args.workers, terms=args.terms, progress=True,
                           search=search_overrides(args))
        except cast("tuple[type[BaseException], ...]", (*_link_errors(), ValueError)) as exc:
            return fail("eval", exc)
        print(format_eval(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    p.set_defaults(func=ray_handler("eval", run))


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
        except cast("tuple[type[BaseException], ...]", (*_link_errors(), ValueError)) as exc:
            return fail("explain", exc)
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
        except cast("tuple[type[BaseException], ...]", (*_link_errors(), ValueError)) as exc:
            return fail("report", exc)
        print(path.read_text())
        print(f"written to {path.parent}")
        return 0

    p.set_defaults(func=run)


COMMANDS = [_cmd_index, _cmd_link, _cmd_eval, _cmd_explain, _cmd_report]
