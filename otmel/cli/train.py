"""`otmel train`, `baseline`, `tune`, `ablate`, `plot`, `placement`: training on Ray and its experiments."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from otmel.cli.common import add_address, address_overrides, debug_wanted, fail, ray_handler, worker_failed
from otmel.errors import WorkerError

Handler = Callable[[argparse.Namespace], int]


def _reporting(cmd: str, run: Handler) -> Handler:
    """`run`, with a failed training run (a Ray Train worker's error, or Ray's) reported in one line
    (`otmel.cli.common.worker_failed`: exit 2 when the user can fix it, else 1), and its `--address` checked and
    named to the Ray it starts or joins (`otmel.cli.common.ray_handler`)."""
    with_ray = ray_handler(cmd, run)

    def handler(args: argparse.Namespace) -> int:
        try:
            return with_ray(args)
        except WorkerError as exc:
            if debug_wanted(args):
                raise
            return worker_failed(cmd, exc)

    return handler


def _cmd_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train OT-MEL on Ray Train (+ DeepSpeed); no arguments: the embedded synthetic default",
        description="Train OT-MEL with Ray Train. With no arguments: start a local Ray, generate and pack the "
        "synthetic benchmark if absent, train the tiny model on 2 CPU workers, evaluate, print the table.",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's worker output, report dumps and library warnings (default: RUN_DIR/logs/)")
    add_address(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.epochs=2")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.driver.launch import main as train_main

        train_main(args.config, [*args.overrides, *address_overrides(args),
                                 *(["run.console=verbose"] if args.verbose else [])], args.resume)
        return 0

    p.set_defaults(func=_reporting("train", run))


def _cmd_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="string-match and CLS-only baselines (default: the synthetic data)")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    add_address(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for the CLS-only run")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.driver.launch import baselines

        baselines(args.config, [*args.overrides, *address_overrides(args)], args.split)
        return 0

    p.set_defaults(func=_reporting("baseline", run))


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
    add_address(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for every trial")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.driver.tune import run_sweep

        if args.resume and not args.name:
            return fail("tune", "--resume needs --name")
        run_sweep(args.config, args.search, [*args.overrides, *address_overrides(args)], name=args.name,
                  resume=args.resume)
        return 0

    p.set_defaults(func=_reporting("tune", run))


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
    add_address(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. train.epochs=3")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.driver.ablate import run_ablation

        if args.resume and not args.name:
            return fail("ablate", "--resume needs --name")
        run_ablation(args.config, [*args.overrides, *address_overrides(args)],
                     variants=_csv_list(args.variants) if args.variants else None,
                     seeds=[int(s) for s in _csv_list(args.seeds)], name=args.name, resume=args.resume,
                     concurrent=args.concurrent)
        return 0

    p.set_defaults(func=_reporting("ablate", run))


def _seed_list(text: str) -> list[int]:
    """ "0-4" or "0,1,2" -> [0, 1, 2, ...]."""
    out: list[int] = []
    for part in _csv_list(text):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def _cmd_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="models x seeds, paired by seed: mean ± 95%% CI and paired tests; resumable, tables as it goes",
        description="Train every model (Table-2 variant id, CLS, LREG) with every seed, one trial after another "
        "on one Ray, and rewrite RUN.storage/studies/NAME/summary.md after every trial (mean ± 95%% CI, paired "
        "differences with their CI and tests). Re-run the same command to resume.",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--name", required=True, help="study name (its folder; re-use it to resume)")
    p.add_argument("--variants", default=None, help="comma-separated model ids, e.g. OT,A1,KD,CLS (required to run)")
    p.add_argument("--seeds", default="0-4", help="train.seed values: 0-4 or 0,1,2 (default 0-4)")
    p.add_argument("--pairs", default=None,
                   help="paired comparisons a-b, comma-separated, e.g. OT-A1,OT-CLS (default: each vs the first)")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="train nothing: write the study's tables from its rows so far to PATH ('-': stdout)")
    add_address(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for every trial")

    def run(args: argparse.Namespace) -> int:
        from otmel.train.driver.study import run_study, study_summary

        if args.report is not None:
            from pathlib import Path

            from otmel.io import atomic_write
            from otmel.runconfig import load_config

            study = Path(load_config(args.config, args.overrides).run.storage) / "studies" / args.name
            if not (study / "plan.json").is_file():
                return fail("study", f"no study at {study} (no plan.json)")
            text = study_summary(study)
            if args.report == "-":
                print(text)
            else:
                atomic_write(args.report, text)
                print(f"wrote {args.report}")
            return 0
        if not args.variants:
            return fail("study", "--variants is required to run a study (or use --report)")
        try:
            seeds = _seed_list(args.seeds)
            pairs = None
            if args.pairs:
                pairs = [tuple(x.upper().split("-", 1)) for x in _csv_list(args.pairs)]
                if any(len(pr) != 2 for pr in pairs):
                    raise ValueError(f"--pairs {args.pairs!r}: each pair is A-B")
        except ValueError as exc:
            return fail("study", exc)
        run_study(args.config, [*args.overrides, *address_overrides(args)], name=args.name,
                  variants=_csv_list(args.variants), seeds=seeds, pairs=pairs)  # type: ignore[arg-type]
        return 0

    p.set_defaults(func=_reporting("study", run))


def _cmd_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="figures from finished experiments (e.g. `otmel plot sweep RUN`)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    s = kinds.add_parser("sweep", help="H@1 and MRR against model.reg (and the plan entropy), as in Fig. 3")
    s.add_argument("run", metavar="RUN", help="sweep directory (runs/sweeps/NAME) or its NAME under runs/sweeps")
    s.add_argument("--out", default=None, help="PNG path (default: RUN/reg.png)")
    s.add_argument("--x", default="model.reg", help="swept key on the x axis (default model.reg)")

    def run(args: argparse.Namespace) -> int:
        from otmel.analysis.plots import plot_sweep, resolve_sweep

        try:
            out = plot_sweep(resolve_sweep(args.run), args.out, x_key=args.x)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            return fail("plot", exc)
        print(f"wrote {out}")
        return 0

    s.set_defaults(func=run)


def _cmd_placement(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="will a run's training workers fit a cluster's node types? (no Ray starts)",
                       description="Check a run config against the node types of a cluster-launcher YAML or a "
                       "KubeRay manifest: one line when it fits; exit 2 naming the largest node type when not.")
    p.add_argument("--cluster", required=True,
                   help="cluster YAML (cluster/aws.yaml, cluster/kuberay-raycluster.yaml, ...)")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")

    def run(args: argparse.Namespace) -> int:
        from otmel.runconfig import load_config
        from otmel.train.driver.launch import DEFAULT_CONFIG
        from otmel.train.driver.placement import check_placement, describe_fit, node_types

        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        print(describe_fit(cfg, check_placement(cfg, node_types(args.cluster), where=args.cluster)))
        return 0

    p.set_defaults(func=run)


COMMANDS = [_cmd_train, _cmd_baseline, _cmd_tune, _cmd_ablate, _cmd_study, _cmd_plot, _cmd_placement]
