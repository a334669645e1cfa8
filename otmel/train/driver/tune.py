"""Hyper-parameter sweeps with Ray Tune, every trial a distributed Ray Train run of the ordinary code path.

Pattern (Ray 2.60, Train V2): one Tune *driver function* per trial
(`trial_driver`) builds the same `TorchTrainer` as `otmel train` (`launch.build_trainer`) with
`TuneReportCallback` and a deterministic run name `train-<trial_id>` (so a restored sweep resumes each
trial's Train run from its checkpoints), and fits it. Tune only schedules: ASHA stops weak trials on the
per-epoch `dev/MRR`.

A sweep is described by a YAML file (`configs/search/NAME.yaml`, see `SearchSpec`). Outputs, in the
experiment directory `RUN.storage/sweeps/NAME/`: Tune's state (restorable), `trials/train-*` (the Train
runs), `rows.json`, `ranked.md`, `ranked.csv` and `best.yaml` (a run config `otmel train --config` accepts).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from otmel.analysis.sweep_results import rank_rows, rows_from_grid, unfinished, write_sweep_outputs
from otmel.runconfig import RunConfig, load_config, set_dotted
from otmel.train.driver.launch import DEFAULT_CONFIG, make_paths_absolute, prepare_data

DRIVER_CPUS = 0.1  # the trial driver only waits on its TorchTrainer; `with_resources(..., {"cpu": 0})` fails
DOMAINS = ("loguniform", "uniform", "choice", "grid", "randint")


@dataclass
class SchedulerSpec:
    type: str = "asha"  # "asha" or "none"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0


@dataclass
class SearchSpec:
    """A sweep file. `space` maps dotted run-config keys to one domain each: `{loguniform: [lo, hi]}`,
    `{uniform: [lo, hi]}`, `{randint: [lo, hi]}`, `{choice: [a, b, ...]}` (sampled) or `{grid: [...]}`
    (every value); `overrides` are `section.key=value` strings applied to the base config first."""

    space: dict[str, dict[str, Any]]
    metric: str = "dev/MRR"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent_trials: int = 1
    seed: int | None = 0
    plan_entropy: bool = True  # measure the mean OT plan entropy of each finished trial (Fig. 3)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    overrides: list[str] = field(default_factory=list)


def load_search(path: str | Path) -> SearchSpec:
    """Read and check a sweep file strictly: unknown keys and unknown domains fail, naming them."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    known = {f.name for f in dataclasses.fields(SearchSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise KeyError(f"{path}: unknown search key(s) {unknown}; known: {sorted(known)}")
    if not raw.get("space"):
        raise ValueError(f"{path}: `space` is required and must not be empty")
    sched = dict(raw.pop("scheduler", None) or {})
    bad = sorted(set(sched) - {f.name for f in dataclasses.fields(SchedulerSpec)})
    if bad:
        raise KeyError(f"{path}: unknown scheduler key(s) {bad}")
    spec = SearchSpec(**raw, scheduler=SchedulerSpec(**sched))
    if spec.scheduler.type not in ("asha", "none"):
        raise ValueError(f"{path}: scheduler.type must be 'asha' or 'none', got {spec.scheduler.type!r}")
    if spec.mode not in ("max", "min"):
        raise ValueError(f"{path}: mode must be 'max' or 'min'")
    for key, dom in spec.space.items():
        if not (isinstance(dom, dict) and len(dom) == 1 and next(iter(dom)) in DOMAINS):
            raise ValueError(f"{path}: space.{key} must be one of {{{'|'.join(DOMAINS)}: ...}}, got {dom!r}")
        kind, args = next(iter(dom.items()))
        if kind in ("loguniform", "uniform", "randint") and not (isinstance(args, list) and len(args) == 2):
            raise ValueError(f"{path}: space.{key}.{kind} takes [low, high]")
        if kind in ("choice", "grid") and not (isinstance(args, list) and args):
            raise ValueError(f"{path}: space.{key}.{kind} takes a non-empty list")
    return spec


def _example_value(dom: dict[str, Any]) -> Any:
    return next(iter(dom.values()))[0]


def override(key: str, value: Any) -> str:
    """A `key=value` override string whose value reads back (YAML) as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def check_space(config: str | None, overrides: list[str], space: dict[str, dict[str, Any]]) -> None:
    """Fail before Ray starts if a swept key is not a run-config key or a value is invalid (strict
    `load_config` on the first value of every domain)."""
    for key, dom in space.items():
        if "." not in key:
            raise KeyError(f"search space key {key!r} must be dotted, e.g. model.reg")
        load_config(config, [*overrides, override(key, _example_value(dom))])


def to_tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sweep-file domains as Ray Tune search-space objects."""
    from ray import tune

    make: dict[str, Callable[[Any], Any]]
    make = {"loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
            "uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[next(iter(dom))](next(iter(dom.values()))) for key, dom in space.items()}


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> RunConfig:
    """A trial's run config: the base config dict with the dotted `params` set (strictly re-validated)."""
    d = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(d, key, value)
    cfg = RunConfig.from_dict(d)
    cfg.model_config()
    return cfg


def trial_driver(config: dict[str, Any]) -> None:
    """One Tune trial: build and fit the TorchTrainer of `launch` (same `train_worker`), reporting every
    Train report to Tune. The Train run is named after the trial id, so a restored sweep resumes it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from otmel.train.driver.launch import build_trainer, run_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(config["base"], config["params"])
    cfg.run.storage = config["train_storage"]
    cfg.wandb.group = config["group"]  # W&B runs of one sweep are grouped
    run_name = f"train-{trial_id}"
    results = run_trainer(build_trainer(cfg, run_name, callbacks=[TuneReportCallback()]), cfg, run_name)
    if config.get("plan_entropy") and results.get("checkpoint"):
        from otmel.analysis.entropy import checkpoint_plan_entropy

        extra = checkpoint_plan_entropy(cfg, Path(results["checkpoint"]))
        # one more result: the final Train metrics plus the entropy, so the trial's last result has both
        ray.tune.report({**{k: v for k, v in results["metrics"].items() if k != "checkpoint_path"}, **extra})


def init_ray_for_trials(cfg: RunConfig, concurrent: int) -> None:
    """Join RAY_ADDRESS / run.ray_address, or start a local Ray with room for `concurrent` trials (each
    `num_workers * cpus_per_worker` CPUs plus a fractional driver: +1 logical CPU, the drivers sleep while their
    trainers run)."""
    from otmel.train.driver.launch import init_ray

    init_ray(cfg, extra_cpus=1, concurrent=concurrent)


def trial_lines(metric: str) -> Any:
    """A Tune callback (it runs in this driver process) printing one line per finished or failed trial."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            val = (trial.last_result or {}).get(metric)
            print(f"[otmel] trial {trial.trial_id} done: {trial.config.get('params')} {metric} "
                  f"{'–' if val is None else f'{100 * val:.2f}'}", flush=True)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            print(f"[otmel] trial {trial.trial_id} FAILED: {trial.config.get('params')} (its log: "
                  f"{trial.local_path})", flush=True)

    return TrialLines()


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def run_trials(
    base: RunConfig, params: dict[str, Any], *, name: str, resume: bool, tune_config: dict[str, Any],
    plan_entropy: bool = False,
) -> tuple[Any, Path]:
    """Run (or, with `resume`, restore and finish) the Tune experiment `name` whose trials are training
    runs of `base` with `params` (Tune domains keyed by dotted config keys). Returns (ResultGrid, the local
    directory for the summary files)."""
    from ray import tune

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # reports without dev/MRR (mid-epoch)
    verbose = base.run.console == "verbose"
    storage = f"{base.run.storage.rstrip('/')}/sweeps"  # a local path or a URI such as s3://bucket/runs
    exp_uri = f"{storage}/{name}"
    driver = tune.with_resources(trial_driver, {"cpu": DRIVER_CPUS})
    if resume:
        if not tune.Tuner.can_restore(exp_uri):
            raise FileNotFoundError(f"no restorable Tune experiment at {exp_uri}")
        print(f"[otmel] restoring the sweep at {exp_uri}", flush=True)
        tuner = tune.Tuner.restore(exp_uri, trainable=driver, resume_unfinished=True, resume_errored=True)
    else:
        if tune.Tuner.can_restore(exp_uri):
            raise FileExistsError(f"{exp_uri} already holds a sweep: pass --resume to continue it, or another --name")
        space = {"base": base.to_dict(), "params": params, "group": name, "plan_entropy": plan_entropy,
                 "train_storage": f"{exp_uri}/trials"}
        tune_config = {"trial_dirname_creator": _trial_dirname, **tune_config}
        tuner = tune.Tuner(
            driver, param_space=space, tune_config=tune.TuneConfig(**tune_config),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1 if verbose else 0,
                                      callbacks=[trial_lines("dev/MRR")]),
        )
    grid = tuner.fit()
    # the tables / best.yaml are written locally: into the experiment directory, or for a remote storage
    # into runs/sweeps/NAME under the current directory
    return grid, Path(exp_uri) if "://" not in exp_uri else Path("runs") / "sweeps" / name


def run_sweep(
    config: str | None, search: str, overrides: list[str] | None = None, *, name: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run a sweep of `config` over the space in the `search` file; writes and returns the ranked rows
    and the path of `best.yaml`."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    config = config or DEFAULT_CONFIG
    spec = load_search(search)
    ovr = [*spec.overrides, *(overrides or [])]
    check_space(config, ovr, spec.space)
    cfg = load_config(config, ovr)
    name = name or f"{Path(search).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_data(cfg)
    base = copy.deepcopy(cfg)
    make_paths_absolute(base)
    # The seeded generator limits concurrency itself (Ray 2.60 ignores, with a warning, TuneConfig's
    # max_concurrent_trials next to a SearchGenerator such as BasicVariantGenerator).
    tune_config: dict[str, Any] = {
        "num_samples": spec.num_samples,
        "search_alg": BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials),
    }
    if spec.scheduler.type == "asha":
        if cfg.train.eval_every != 1:
            print(f"[otmel] warning: train.eval_every={cfg.train.eval_every}; ASHA only sees dev/MRR on "
                  "evaluated epochs", flush=True)
        # max_t one past the last epoch: ASHA never stops a trial at its last epoch, before its test report
        tune_config["scheduler"] = ASHAScheduler(
            time_attr="epoch", metric=spec.metric, mode=spec.mode, max_t=cfg.train.epochs + 1,
            grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)
    init_ray_for_trials(base, spec.max_concurrent_trials)
    t0 = time.perf_counter()
    grid, exp = run_trials(base, to_tune_space(spec.space), name=name, resume=resume, tune_config=tune_config,
                           plan_entropy=spec.plan_entropy)
    wall = time.perf_counter() - t0
    rows = rank_rows(rows_from_grid(grid, list(spec.space)), spec.metric, spec.mode)
    best_cfg = None
    left = unfinished(rows)
    if rows and rows[0]["status"] == "done" and not left:
        best_cfg = load_config(config, [*ovr, *(override(k, v) for k, v in rows[0]["params"].items())])
        best_cfg.run.name = None
    out = write_sweep_outputs(exp, rows, list(spec.space), spec.metric, best_cfg,
                              meta={"search": str(search), "config": config, "overrides": ovr, "wall_seconds": wall})
    print("\n" + out["table"])
    print(f"\nsweep directory: {exp}\nwall time:       {wall:.0f} s")
    if best_cfg is not None:
        print(f"best config:     {out['best_yaml']}  (otmel train --config {out['best_yaml']})")
    if left:
        print(f"INTERRUPTED: {left} trial(s) unfinished (partial table, no best.yaml); continue with\n"
              f"  otmel tune --search {search} --name {name} --resume" + (f" --config {config}" if config else ""))
    return {"rows": rows, "path": str(exp), "best_yaml": out.get("best_yaml"), "wall_seconds": wall,
            "unfinished": left}
