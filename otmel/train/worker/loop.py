"""The per-worker training loop that Ray Train runs on every worker (`TorchTrainer(train_worker, ...)`).

Per epoch: steps on the seeded training stream of (seed, epoch, rank) — every rank runs the same number of
steps — with the global negative pool, until the run has seen the epoch's samples (`otmel.train.worker.elastic`:
the run's clock is in samples, so an elastic run that resizes keeps its schedule); then (every `eval_every`
epochs) whole-KG validation; then one checkpoint + report, a barrier that every rank reaches the same number of
times. Every `run.preemption_check_every` steps the workers ask Ray Train whether one of their nodes is being
drained, and write a just-in-time checkpoint on a notice. At the end: the test split with the best-dev-MRR
weights. Resume restores model, optimizer, scheduler, RNG and the stream position (epoch + step in epoch: the
stream of an epoch is a function of its seed, so a resumed run of the same world size skips exactly the batches it
had consumed and sees the samples an uninterrupted run would; after a resize it takes up the new world's stream
at the share of the epoch already done).

Devices: one per worker (`worker_device`: Ray Train's GPU under `scaling.use_gpu`, else the CPU), decided once and
handed to the engine, the evaluation and the mining; every batch reaches the model through
`otmel.train.worker.devices.to_device` (the training step's after its hard negatives are appended on the CPU).
"""

from __future__ import annotations

import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmel.data.loaders import eval_loader, kg_loader, train_loader
from otmel.data.manifest import split_counts
from otmel.errors import UserError
from otmel.loss import OTMELLoss
from otmel.model import OTMEL
from otmel.model.encoder import build_preprocessor
from otmel.model.modes import eval_mode
from otmel.runconfig import DataConfig, RunConfig
from otmel.train.worker.checkpoint import (
    CheckpointCorruptError,
    load_checkpoint,
    load_extra,
    previous_valid_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from otmel.train.worker.devices import to_device
from otmel.train.worker.distributed import all_reduce_sum, entity_pool_for
from otmel.train.worker.elastic import SampleClock, worker_batch
from otmel.train.worker.engine import Engine
from otmel.train.worker.evaluate import encode_kg, evaluate_split

# the tests' fault hook (`otmel.train.worker.faults`), also importable from here as before
from otmel.train.worker.faults import FAULT_ENV as FAULT_ENV
from otmel.train.worker.faults import FAULT_MARKER as FAULT_MARKER
from otmel.train.worker.faults import fault_run_config as fault_run_config
from otmel.train.worker.faults import fault_step, hold_while_alone, maybe_inject_fault
from otmel.train.worker.mining import HardNegativeSchedule
from otmel.train.worker.precision import Precision
from otmel.train.worker.progress import WorkerConsole
from otmel.train.worker.tracking import Tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(cfg: RunConfig, world_size: int) -> int:
    """Steps of one epoch at `world_size` workers of `train.batch_size` (`train.steps_per_epoch` when set)."""
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    n_train = split_counts(Path(cfg.data.shards))["train"]
    return max(1, n_train // (cfg.train.batch_size * world_size))


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's one device: under `scaling.use_gpu` the GPU Ray Train assigned it (`ray.train.torch.get_device`,
    made the current CUDA device), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise UserError(f"scaling.use_gpu=true, but this worker has no CUDA device (Ray Train gives it {device}; "
                        f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}): install a CUDA "
                        "build of torch on the GPU nodes, or set scaling.use_gpu=false")
    torch.cuda.set_device(device)
    return device


class Evaluator:
    """Whole-KG evaluation of one or more splits, sharing one entity cache per call, under the run's autocast (the
    training forward's: `precision`), on `device`; `eval/kg_entities` counts the entities ranked (all ranks')."""

    def __init__(self, data: DataConfig, eval_batch_size: int, preprocessor: Any, rank: int, world_size: int,
                 precision: Precision | None = None, device: torch.device | str = "cpu") -> None:
        self.data, self.batch_size, self.pre = data, eval_batch_size, preprocessor
        self.rank, self.world, self.precision = rank, world_size, precision or Precision()
        self.device = torch.device(device)

    def __call__(self, model: OTMEL, splits: list[str]) -> dict[str, float]:
        shards, kw = Path(self.data.shards), dict(
            batch_size=self.batch_size, rank=self.rank, world_size=self.world, num_workers=self.data.num_workers,
        )
        with eval_mode(model), self.precision.autocast():
            cache = encode_kg(model, kg_loader(shards, self.pre, **kw), self.device)
            out = {"eval/kg_entities": all_reduce_sum(len(cache) if cache is not None else 0, self.world)}
            for split in splits:
                metrics, _ = evaluate_split(model, [], eval_loader(shards, split, self.pre, **kw), self.world, cache,
                                            self.device)
                out.update({f"{split}/{k}": v for k, v in metrics.items()})
        return out


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive training steps had a NaN / Inf loss (`train.max_nonfinite_steps`)."""


class NonFiniteGuard:
    """The rule for NaN / Inf losses: every rank learns whether *any* rank's loss is non-finite (one tiny all-reduce
    per step, so all ranks skip together and no collective is left waiting); such a step is skipped; more than
    `limit` in a row raise `NonFiniteLossError`."""

    def __init__(self, limit: int, world_size: int) -> None:
        self.limit, self.world = limit, world_size
        self.in_a_row, self.total = 0, 0

    def skip(self, terms: dict[str, torch.Tensor], step: int) -> bool:
        """True when this step must be skipped (and counts it); raises past the limit."""
        bad = 0.0 if bool(torch.isfinite(terms["loss"].detach()).all()) else 1.0
        if all_reduce_sum(bad, self.world) == 0:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            values = {k: float(v.detach()) for k, v in terms.items() if v.numel() == 1}
            raise NonFiniteLossError(f"{self.in_a_row} consecutive steps with a non-finite loss (train."
                                     f"max_nonfinite_steps={self.limit}), the last at global step {step}: {values}")
        return True


@dataclass
class TrainState:
    """Where a run is; checkpointed as state.json (with the run config) and restored on resume."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch consumed (a mid-epoch checkpoint)
    global_step: int = 0
    best_mrr: float = -1.0  # best dev MRR so far and the epoch it was reached (1-based; -1: none yet)
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics
    samples: int = 0  # training samples seen by the whole run: its clock (otmel/train/worker/elastic.py)
    world_size: int = 0  # the world that wrote this state (0: none yet)
    resizes: list[dict[str, Any]] = field(default_factory=list)  # {time, global_step, samples, from, to}
    preemptions: list[dict[str, Any]] = field(default_factory=list)  # notices: {time, global_step, deadline_ms, ...}
    resumes: list[dict[str, Any]] = field(default_factory=list)  # restarts from a checkpoint: {time, global_step, ...}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Worker:
    """One Ray Train worker's run: resume, then per epoch train + validate + report, then test."""

    def __init__(self, cfg: RunConfig, run_dir: Path, channel: Any | None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.console = WorkerConsole(channel, self.rank, run_dir, cfg.train.progress, cfg.run.console == "quiet")
        self.console.redirect_output()
        torch.set_flush_denormal(True)  # CPU: denormal floats in Sinkhorn plans cost 5-50x per op
        torch.set_num_threads(max(1, cfg.scaling.cpus_per_worker))
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.device = worker_device(cfg.scaling.use_gpu)
        self.model = OTMEL(cfg.model)  # built on the CPU; the engine moves it to `self.device`
        self.pre = build_preprocessor(cfg.model)
        self.batch = worker_batch(cfg.scaling, cfg.train.batch_size, self.world)
        reference = cfg.train.batch_size * cfg.scaling.max_workers
        self.clock = SampleClock(reference, steps_per_epoch(cfg, cfg.scaling.max_workers) * reference,
                                 cfg.train.epochs)
        self.steps = self.clock.stream_steps(self.batch * self.world)  # batches of an epoch's stream
        self.engine = Engine(self.model, cfg.train, self.clock.reference_steps, self.world, cfg.scaling.use_gpu,
                             batch_size=self.batch, device=self.device)
        self.loss_fn = OTMELLoss(cfg.model.kd, cfg.model.kd_weight, cfg.model.kd_target)
        self.pool = entity_pool_for(cfg.train.negatives, self.rank, self.world,
                                    gather_with_grad=cfg.train.gather_with_grad)
        self.evaluate = Evaluator(cfg.data, cfg.train.eval_batch_size, self.pre, self.rank, self.world,
                                  self.engine.precision, self.device)
        self.hard = (HardNegativeSchedule(cfg.train, cfg.data, self.pre, self.rank, self.world, self.device)
                     if cfg.train.hard_negatives != "none" else None)
        self.best: dict[str, torch.Tensor] | None  # the best-dev-MRR weights so far (on the CPU)
        self.state, self.best = TrainState(), None
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps, self.world)
        self.config_dict = cfg.to_dict()
        self.tracker: Tracker | None = None
        self.fail_at_step = fault_step()
        self.notice: tuple[Any, ...] | None = None  # the preemption notice a JIT checkpoint was written for
        self.poll_seconds, self.polls = 0.0, 0

    def resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            directory = Path(d)
            try:
                verify_checkpoint(directory, self.rank)
            except CheckpointCorruptError as exc:  # use the newest older checkpoint that verifies (local storage)
                older = previous_valid_checkpoint(directory, self.rank)
                if older is None:
                    raise CheckpointCorruptError(f"{exc}; no older valid checkpoint beside it") from None
                warnings.warn(f"{exc}; resuming from the older {older.name} instead", stacklevel=1)
                directory = older
            st, self.best = load_checkpoint(directory, rank=self.rank, model=self.model, engine=self.engine)
            self.state = TrainState.from_dict(st)
            if self.hard is not None:
                self.hard.restore(load_extra(directory))
        state = self.state
        state.resumes.append({"time": time.time(), "global_step": state.global_step, "epoch": state.epoch,
                              "step_in_epoch": state.step_in_epoch, "checkpoint": directory.name})
        self.console.note(f"resumed from {directory.name} at global step {state.global_step} (epoch "
                          f"{state.epoch + 1}, {state.step_in_epoch} of its steps done)")
        if not state.samples and state.global_step:  # a checkpoint from before the clock: fixed size, whole steps
            state.samples = state.epoch * self.clock.epoch_samples + state.step_in_epoch * self.batch * self.world
        if state.world_size and state.world_size != self.world:
            # mid-epoch: `step_in_epoch` counted batches of the old world's stream; take up the new world's stream
            # at the share of the epoch already done
            done = max(0, state.samples - state.epoch * self.clock.epoch_samples)
            state.step_in_epoch = done // (self.batch * self.world)
            state.resizes.append({"time": time.time(), "global_step": state.global_step, "samples": state.samples,
                                  "from": state.world_size, "to": self.world})
            self.console.note(f"resized from {state.world_size} to {self.world} worker(s) at step {state.global_step} "
                              f"({state.samples} samples): per-worker batch {self.batch}, global batch "
                              f"{self.batch * self.world}")

    def report(self, metrics: dict[str, float]) -> None:
        """Checkpoint (every rank writes its files) and report: a barrier every rank reaches equally often."""
        import ray.train

        self.state.world_size = self.world
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), rank=self.rank, model=self.model, engine=self.engine,
                            state=asdict(self.state), best=self.best, config=self.config_dict,
                            extra=self.hard.state_tensors() if self.hard is not None else None,
                            durable=False)  # a staging folder: Ray Train copies it into storage
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's steps on the seeded stream of (seed, epoch, rank), skipping those a checkpoint had done,
        until the run's clock reaches the epoch's end."""
        cfg, st, clock = self.cfg, self.state, self.clock
        global_batch = self.batch * self.world
        with self.engine.autocast():  # mining encodes like evaluation
            hard_stats = self.hard.start_epoch(self.model, epoch) if self.hard is not None else {}
        loader = train_loader(Path(cfg.data.shards), self.pre, batch_size=self.batch,
                              steps_per_epoch=self.steps, epoch=epoch, seed=cfg.train.seed, rank=self.rank,
                              world_size=self.world, num_workers=cfg.data.num_workers,
                              shuffle_buffer=cfg.data.shuffle_buffer, integrity=cfg.data.integrity)
        skip = st.step_in_epoch
        self.console.start_epoch(epoch, cfg.train.epochs, self.steps, skip)
        sums: dict[str, float] = {}
        t0, n_samples, finite = time.perf_counter(), 0, 0
        for i, batch in enumerate(loader):
            if i < skip or clock.epoch_done(epoch, st.samples):
                continue  # consumed before the checkpoint we resumed from / past the epoch's samples (a resize)
            maybe_inject_fault(self.fail_at_step, st.global_step, self.rank, self.world, self.run_dir)
            hold_while_alone(self.run_dir, self.world)
            if self.hard is not None:
                batch = self.hard.augment(batch, epoch, i)  # on the CPU, then the whole batch moves
            batch = to_device(batch, self.device)
            with self.engine.autocast():  # model forward + loss; backward (engine.step) outside, as torch advises
                terms = self.loss_fn(**self.engine(batch, entity_pool=self.pool))
            skipped = self.nonfinite.skip(terms, st.global_step + 1)
            before = st.samples
            st.samples += global_batch
            if not skipped:
                self.engine.step(terms["loss"], clock.lr_iteration(st.samples))
                finite += 1
            st.global_step, st.step_in_epoch = st.global_step + 1, i + 1
            n_samples += len(batch["m_index"]) * self.world
            for k, v in terms.items() if not skipped else ():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            self.console.step(float(terms["loss"].detach()))
            if self.tracker is not None and st.global_step % 10 == 0:
                self.tracker.log({f"train/{k}": float(v.detach()) for k, v in terms.items()}
                                 | {"train/lr": self.engine.lr}, st.global_step)
            if clock.checkpoint_due(cfg.train.checkpoint_every, epoch, before, st.samples):
                self.report({"epoch": epoch, "global_step": st.global_step})
            self.check_preemption(epoch)
        metrics = {f"train/{k}": v / max(1, finite) for k, v in sums.items()}  # means over the steps taken
        metrics.update({"epoch": epoch + 1, "global_step": st.global_step, "train/lr": self.engine.lr,
                        "train/samples_per_s": n_samples / max(time.perf_counter() - t0, 1e-9)} | hard_stats)
        metrics["train/nonfinite_steps"] = float(self.nonfinite.total)
        metrics |= {"train/world_size": float(self.world), "train/samples": float(st.samples)}
        if self.polls:
            metrics["train/preemption_poll_ms"] = 1000 * self.poll_seconds / self.polls
        if cfg.data.integrity == "skip":  # shard reads skipped this epoch, summed over ranks
            metrics["data/skipped_shards"] = float(all_reduce_sum(loader.image_stats["skipped_shards"], self.world))
        st.epoch, st.step_in_epoch = epoch + 1, 0
        return metrics

    def check_preemption(self, epoch: int) -> None:
        """Every `run.preemption_check_every` steps (the same steps on every rank: the call is a barrier), ask Ray
        Train for a preemption notice; on a new one, record it and write a just-in-time checkpoint, then go on
        training (Ray Train restarts the run from it when the node goes, counting `run.max_preemptions`)."""
        every, st = self.cfg.run.preemption_check_every, self.state
        if not every or st.global_step % every:
            return
        import ray.train

        t0 = time.perf_counter()
        info = ray.train.get_preemption_info()
        self.poll_seconds, self.polls = self.poll_seconds + time.perf_counter() - t0, self.polls + 1
        if info is None:
            return
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key == self.notice:
            return
        self.notice = key
        st.preemptions.append({"time": time.time(), "global_step": st.global_step, "samples": st.samples,
                               "deadline_ms": info.deadline_ms, "nodes": info.preempted_node_ids,
                               "ranks": info.preempted_ranks})
        self.console.note(f"preemption notice for node(s) {', '.join(info.preempted_node_ids)} (ranks "
                          f"{info.preempted_ranks}) at step {st.global_step}: writing a checkpoint")
        self.report({"epoch": epoch, "global_step": st.global_step, "preemption_checkpoint": 1.0})

    def validate(self, epoch: int, metrics: dict[str, float]) -> None:
        """Dev metrics every `eval_every` epochs and after the last; keeps the best-dev-MRR weights."""
        if (epoch + 1) % self.cfg.train.eval_every and epoch + 1 != self.cfg.train.epochs:
            return
        metrics.update(self.evaluate(self.model, ["dev"]))
        if metrics["dev/MRR"] > self.state.best_mrr:
            self.state.best_mrr, self.state.best_epoch = metrics["dev/MRR"], epoch + 1
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def test(self) -> dict[str, float]:
        """Dev and test with the best checkpoint (by dev MRR)."""
        if self.best is not None:
            self.model.load_state_dict(self.best)
        final = self.evaluate(self.model, ["dev", "test"])
        final.update({"best_epoch": self.state.best_epoch, "global_step": self.state.global_step, "final": 1})
        return final

    def run(self) -> None:
        self.resume()
        self.tracker = Tracker(self.cfg.wandb, enabled=self.rank == 0, name=self.run_dir.name,
                               config=self.config_dict, directory=str(self.run_dir / "wandb"))
        self.engine.train()
        if self.rank == 0:
            self.tracker.log({"train/world_size": float(self.world)}, self.state.global_step)
            print(f"[otmel] precision: {self.engine.precision.describe()}", flush=True)  # the worker's log
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            metrics = self.train_epoch(epoch)
            self.validate(epoch, metrics)
            self.state.history.append(metrics)
            if self.rank == 0:
                self.tracker.log(metrics, self.state.global_step)
            self.console.end_epoch(metrics)
            self.report(metrics)
        final = self.test()
        if self.rank == 0:
            self.tracker.log({f"final/{k}": v for k, v in final.items()}, self.state.global_step)
        self.tracker.finish()
        self.report(final)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: `loop_config` = {"run": RunConfig dict, "run_dir": str,
    "console": the driver's progress queue or None}."""
    cfg = RunConfig.from_dict(loop_config["run"])
    Worker(cfg, Path(loop_config["run_dir"]), loop_config.get("console")).run()
