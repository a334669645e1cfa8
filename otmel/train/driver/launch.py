"""The driver of a training run: prepare data, start (or join) Ray, fit a TorchTrainer, write results.

`ray_jobs/train.py` and `otmel train` both reach `main(...)` through `otmel.cli`: one code path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from otmel.io import atomic_json
from otmel.runconfig import RunConfig, check_files, load_config

DEFAULT_CONFIG = "configs/synth.yaml"


def prepare_data(cfg: RunConfig) -> None:
    """Check the run's files (before Ray starts), generate the synthetic benchmark if asked and absent, pack the
    source if the shards are absent."""
    check_files(cfg)
    shards = Path(cfg.data.shards)
    if (shards / "manifest.json").exists():
        from otmel.data.manifest import preflight

        for problem in preflight(shards, skip_train=cfg.data.integrity == "skip"):
            print(f"[otmel] warning: {problem}: this training shard will be skipped (data.integrity=skip)",
                  flush=True)
        return
    src = Path(cfg.data.source)
    if cfg.data.format == "cleaned" and cfg.data.synth_if_missing and not (src / "synth_stats.json").exists():
        from otmel.data.synth import generate

        print(f"[otmel] generating the synthetic benchmark into {src} ...", flush=True)
        generate(src, seed=cfg.data.synth_seed, scale=cfg.data.synth_scale, mode=cfg.data.synth_mode)
    if not src.exists():
        raise FileNotFoundError(f"data.source {src} does not exist and no shards at {shards}")
    from otmel.data.pack import pack

    print(f"[otmel] packing {src} ({cfg.data.format}) into {shards} ...", flush=True)
    pack(src, cfg.data.format, shards, shard_size=250, split_seed=cfg.data.split_seed)


def make_paths_absolute(cfg: RunConfig) -> None:
    """Workers may run elsewhere (cwd of a job, another node): hand them absolute local paths."""
    for sec, key in (("data", "source"), ("data", "shards"), ("train", "deepspeed_config"), ("run", "storage")):
        obj = getattr(cfg, sec)
        val = getattr(obj, key)
        if "://" not in val:
            setattr(obj, key, str(Path(val).expanduser().resolve()))


def _worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.scaling.cpus_per_worker)}
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
              "TORCH_EXTENSIONS_DIR", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # CPU workers only: never forced on GPU nodes
    return env


def local_run_dir(cfg: RunConfig, run_name: str) -> Path:
    """Where results.json, W&B files and the fault marker go: the run's folder in local storage; with
    remote storage (s3://, gs://: checkpoints go there) a local `runs/NAME` beside it."""
    if "://" in cfg.run.storage:
        return Path("runs").resolve() / run_name
    return Path(cfg.run.storage) / run_name


def init_ray(cfg: RunConfig, extra_cpus: int = 0, concurrent: int = 1) -> None:
    """Join the configured / job's cluster or start a local Ray with room for `concurrent` runs of `cfg`."""
    from otmel.ray_runtime import start_ray

    start_ray(address=cfg.run.ray_address, cpus=cfg.scaling.max_workers * cfg.scaling.cpus_per_worker * concurrent
              + extra_cpus, env_vars=_worker_env(cfg), verbose=cfg.run.console == "verbose")


def scaling_config(cfg: RunConfig) -> Any:
    """Ray Train's ScalingConfig of the run: N workers, or (MIN, MAX) with the resize check of an elastic run."""
    from ray.train.v2.api.config import ScalingConfig  # = ray.train.ScalingConfig (Train v2), typed as v2's

    sc = cfg.scaling
    workers: int | tuple[int, int] = (sc.min_workers, sc.max_workers) if sc.elastic else sc.max_workers
    return ScalingConfig(num_workers=workers, use_gpu=sc.use_gpu,
                                   resources_per_worker={"CPU": sc.cpus_per_worker},
                                   elastic_resize_monitor_interval_s=sc.resize_check_s)


def build_trainer(cfg: RunConfig, run_name: str, callbacks: list[Any] | None = None, console: Any = None) -> Any:
    """The TorchTrainer of one training run (`train_worker` on `cfg.scaling`); `callbacks` are Ray Train
    `UserCallback`s, e.g. Tune's `TuneReportCallback` when the run is one trial of a sweep; `console` the
    driver's progress queue (`otmel.train.driver.console.DriverConsole.open_channel`), or None."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import FailureConfig  # = ray.train.FailureConfig (Train v2), typed as v2's

    from otmel.train.worker.loop import fault_run_config, train_worker

    run_dir = local_run_dir(cfg, run_name)
    return TorchTrainer(
        train_worker,
        train_loop_config={"run": cfg.to_dict(), "run_dir": str(run_dir), "console": console},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            storage_path=cfg.run.storage, name=run_name,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         max_preemption_failures=cfg.run.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks or []), **fault_run_config(),
        ),
    )


def run_trainer(trainer: Any, cfg: RunConfig, run_name: str) -> dict[str, Any]:
    """Fit a trainer from `build_trainer`; returns results (also written to RUN_DIR/results.json). A failed run
    raises `otmel.errors.WorkerError` (`WorkerUserError` when the user can fix it) naming the worker's own error and
    its log, chained to Ray Train's error (`otmel.train.driver.failures`)."""
    run_dir = local_run_dir(cfg, run_name)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        from otmel.train.driver.failures import raise_worker_error

        raise_worker_error(exc, run_dir, logs=cfg.run.console != "verbose")
        raise
    wall = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    state: dict[str, Any] = {}
    if result.checkpoint is not None:  # per-epoch metrics (train losses, lr, samples/s, dev), resizes, preemptions
        with result.checkpoint.as_directory() as d:
            state_file = Path(d) / "state.json"
            if state_file.exists():
                state = json.loads(state_file.read_text())
    results = {
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_seconds": wall,
        "metrics": metrics,
        "history": state.get("history", []),
        "samples": state.get("samples"),
        "resizes": state.get("resizes", []),  # an elastic run's world changes: {time, global_step, samples, from, to}
        "preemptions": state.get("preemptions", []),  # the notices it wrote a just-in-time checkpoint for
        "resumes": state.get("resumes", []),  # every restart from a checkpoint: {time, global_step, epoch, ...}
        "config": cfg.to_dict(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(run_dir / "results.json", results, indent=2, sort_keys=True, default=str)
    return results


def fit(cfg: RunConfig, run_name: str, *, show_epochs: bool = False) -> dict[str, Any]:
    """Run the TorchTrainer; returns results (also written to RUN_DIR/results.json). Quiet console
    (`run.console`): worker output goes to RUN_DIR/logs/; with `show_epochs`, a progress bar and one line per
    epoch on this console."""
    from otmel.train.driver.console import DriverConsole

    con = DriverConsole(local_run_dir(cfg, run_name), cfg.train.epochs, verbose=cfg.run.console == "verbose")
    con.capture_logs()
    try:
        init_ray(cfg)  # a no-op when the caller (or an earlier run of a study) started Ray
        channel = con.open_channel() if show_epochs else None
        return run_trainer(build_trainer(cfg, run_name, console=channel), cfg, run_name)
    finally:
        con.close()


def header(cfg: RunConfig, run_name: str, config: str | None) -> str:
    """The run's header: what runs where."""
    strategy = cfg.train.strategy + (f" ({Path(cfg.train.deepspeed_config).stem})"
                                     if cfg.train.strategy == "deepspeed" else "")
    return (f"otmel train: run {run_name} | config {config or DEFAULT_CONFIG} | model {cfg.model.variant} | "
            f"{cfg.scaling.describe()} worker(s) x {cfg.scaling.cpus_per_worker} CPU"
            f"{' + GPU' if cfg.scaling.use_gpu else ''} | {strategy} | {cfg.train.epochs} epochs, batch "
            f"{cfg.train.batch_size}/worker, negatives {cfg.train.negatives}\n"
            f"logs: {local_run_dir(cfg, run_name) / 'logs'} (otmel train --verbose: on the console)")


def format_table(metrics: dict[str, Any]) -> str:
    cols = ["H@1", "H@3", "H@5", "MRR", "MR"]
    lines = ["split  " + "  ".join(f"{c:>7}" for c in cols)]
    for split in ("dev", "test"):
        if f"{split}/MRR" in metrics:
            vals = [metrics[f"{split}/{c}"] for c in cols]
            cells = [f"{100 * v:7.2f}" for v in vals[:-1]] + [f"{vals[-1]:7.1f}"]
            lines.append(f"{split:<6} " + "  ".join(cells))
    return "\n".join(lines)


def main(config: str | None = None, overrides: list[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Train from a YAML config (default: the embedded synthetic one) with `section.key=value` overrides;
    `resume` continues the run stored in that run directory."""
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if resume:
        run_dir = Path(resume).resolve()
        cfg.run.storage, cfg.run.name = str(run_dir.parent), run_dir.name
    run_name = cfg.run.name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_data(cfg)
    make_paths_absolute(cfg)
    print(header(cfg, run_name, config), flush=True)
    results = fit(cfg, run_name, show_epochs=True)
    print("\n" + format_table(results["metrics"]))
    print(f"\nrun directory: {results['run_dir']}\nresults:       {results['run_dir']}/results.json"
          f"\ncheckpoint:    {results['checkpoint']}\nwall time:     {results['wall_seconds']:.0f} s")
    return results


def baselines(config: str | None = None, overrides: list[str] | None = None, split: str = "test") -> dict[str, Any]:
    """The two reference points a trained model must beat on a dataset: string match (no training) and the
    CLS-only dual encoder (pooled text + image embeddings, no correlation assignment), trained by the same
    Ray code path and budget as the full model. Writes RUN_DIR/baselines.json."""
    from otmel.data.baselines import string_match_metrics
    from otmel.data.readers import read_dataset

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    prepare_data(cfg)
    ds = read_dataset(Path(cfg.data.source), cfg.data.format, split_seed=cfg.data.split_seed, load_images=False)
    t0 = time.perf_counter()
    string = string_match_metrics(ds.splits[split], ds.entities)
    string_s = time.perf_counter() - t0
    cls_run = main(config, [*(overrides or []), "model.variant=CLS"])
    cls = {k.split("/", 1)[1]: v for k, v in cls_run["metrics"].items() if k.startswith(f"{split}/")}
    out = {"split": split, "string_match": string, "string_match_seconds": string_s, "cls_only": cls,
           "cls_only_run": cls_run["run_dir"], "cls_only_seconds": cls_run["wall_seconds"]}
    path = Path(cls_run["run_dir"]) / "baselines.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True))
    print(f"\nbaselines on {split}:")
    for name in ("string_match", "cls_only"):
        m = out[name]
        print(f"  {name:<13} H@1 {100 * m['H@1']:6.2f}  H@3 {100 * m['H@3']:6.2f}  H@5 {100 * m['H@5']:6.2f}"
              f"  MRR {100 * m['MRR']:6.2f}  MR {m['MR']:7.1f}")
    print(f"written to {path}")
    return out
