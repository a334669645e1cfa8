"""The per-worker training loop that Ray Train runs on every worker (`TorchTrainer(train_worker, ...)`).

Per epoch: `steps_per_epoch` steps on the seeded training stream of (seed, epoch, rank) — every rank runs
the same number of steps — with the global negative pool; then (every `eval_every` epochs) whole-KG
validation; then one checkpoint + report, a barrier that every rank reaches the same number of times.
At the end: the test split with the best-dev-MRR weights. Resume restores model, optimizer, scheduler, RNG
and the stream position (epoch + step in epoch: the stream of an epoch is a function of its seed, so the
resumed run skips exactly the batches it had consumed and sees the samples an uninterrupted run would).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from otmel.data.loaders import eval_loader, kg_loader, train_loader
from otmel.data.manifest import split_counts
from otmel.loss import OTMELLoss
from otmel.model import OTMEL
from otmel.model.encoder import build_preprocessor
from otmel.train.checkpoint import load_checkpoint, load_extra, save_checkpoint
from otmel.train.config import RunConfig
from otmel.train.distributed import entity_pool_for
from otmel.train.engine import Engine
from otmel.train.evaluate import encode_kg, evaluate_split
from otmel.train.mining import HardNegativeSchedule
from otmel.train.tracking import Tracker

FAULT_MARKER = ".fault-injected"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(cfg: RunConfig, world_size: int) -> int:
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    n_train = split_counts(Path(cfg.data.shards))["train"]
    return max(1, n_train // (cfg.train.batch_size * world_size))


def _maybe_inject_fault(cfg: RunConfig, global_step: int, rank: int, world_size: int, run_dir: Path) -> None:
    """Fault injection for tests: one worker dies once, abruptly, at `fail_at_step`."""
    if cfg.train.fail_at_step is None or global_step != cfg.train.fail_at_step:
        return
    if rank != (1 if world_size > 1 else 0):
        return
    marker = run_dir / FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} killed at step {global_step}\n")
    os._exit(1)


class Evaluator:
    """Whole-KG evaluation of one or more splits, sharing one entity cache per call."""

    def __init__(self, cfg: RunConfig, preprocessor: Any, rank: int, world_size: int) -> None:
        self.cfg, self.pre, self.rank, self.world = cfg, preprocessor, rank, world_size

    def __call__(self, model: OTMEL, splits: list[str]) -> dict[str, float]:
        shards, kw = Path(self.cfg.data.shards), dict(
            batch_size=self.cfg.train.eval_batch_size, rank=self.rank, world_size=self.world,
            num_workers=self.cfg.data.num_workers,
        )
        was_training = model.training
        model.eval()
        try:
            cache = encode_kg(model, kg_loader(shards, self.pre, **kw))
            out: dict[str, float] = {}
            for split in splits:
                metrics, _ = evaluate_split(model, [], eval_loader(shards, split, self.pre, **kw), self.world, cache)
                out.update({f"{split}/{k}": v for k, v in metrics.items()})
        finally:
            model.train(was_training)
        return out


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg = RunConfig.from_dict(loop_config["run"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_flush_denormal(True)  # CPU: denormal floats in Sinkhorn plans cost 5-50x per op
    torch.set_num_threads(max(1, cfg.scaling.cpus_per_worker))
    seed_everything(cfg.train.seed)  # identical initial weights on every rank

    mcfg = cfg.model_config()
    model = OTMEL(mcfg)
    pre = build_preprocessor(mcfg)
    steps = steps_per_epoch(cfg, world)
    engine = Engine(model, cfg.train, steps * cfg.train.epochs, world, cfg.scaling.use_gpu)
    loss_fn = OTMELLoss(mcfg.kd, mcfg.kd_weight, mcfg.kd_target)
    pool = entity_pool_for(cfg.train.negatives, rank, world, gather_with_grad=cfg.train.gather_with_grad)
    evaluate = Evaluator(cfg, pre, rank, world)
    config_dict = cfg.to_dict()

    st: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_mrr": -1.0, "best_epoch": -1,
                          "history": []}
    best: dict[str, torch.Tensor] | None = None
    hard = HardNegativeSchedule(cfg, pre, rank, world) if cfg.train.hard_negatives != "none" else None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st, best = load_checkpoint(Path(d), rank=rank, model=model, engine=engine)
            if hard is not None:
                hard.restore(load_extra(Path(d)))
    tracker = Tracker(cfg.wandb, enabled=rank == 0, name=run_dir.name, config=config_dict,
                      directory=str(run_dir / "wandb"))

    def report(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), rank=rank, model=model, engine=engine, state=st, best=best,
                            config=config_dict, extra=hard.state_tensors() if hard is not None else None)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    engine.train()
    for epoch in range(st["epoch"], cfg.train.epochs):
        hard_stats = hard.start_epoch(model, epoch) if hard is not None else {}
        loader = train_loader(
            Path(cfg.data.shards), pre, batch_size=cfg.train.batch_size, steps_per_epoch=steps, epoch=epoch,
            seed=cfg.train.seed, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        skip = st["step_in_epoch"]
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=rank != 0 or not cfg.train.progress, mininterval=2.0)
        sums: dict[str, float] = {}
        t0, n_samples = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            if i < skip:
                continue  # the batches consumed before the checkpoint we resumed from
            _maybe_inject_fault(cfg, st["global_step"], rank, world, run_dir)
            if hard is not None:
                batch = hard.augment(batch, epoch, i)
            terms = loss_fn(**engine(batch, entity_pool=pool))
            engine.step(terms["loss"])
            st["global_step"] += 1
            st["step_in_epoch"] = i + 1
            n_samples += len(batch["m_index"]) * world
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}", refresh=False)
            if rank == 0 and st["global_step"] % 10 == 0:
                tracker.log({f"train/{k}": float(v.detach()) for k, v in terms.items()} | {"train/lr": engine.lr},
                            st["global_step"])
            if cfg.train.checkpoint_every and (i + 1) % cfg.train.checkpoint_every == 0 and i + 1 < steps:
                report({"epoch": epoch, "global_step": st["global_step"]})
        bar.close()
        seconds = time.perf_counter() - t0
        done = max(1, steps - skip)
        metrics: dict[str, float] = {f"train/{k}": v / done for k, v in sums.items()}
        metrics.update({"epoch": epoch + 1, "global_step": st["global_step"], "train/lr": engine.lr,
                        "train/samples_per_s": n_samples / max(seconds, 1e-9)} | hard_stats)
        st["epoch"], st["step_in_epoch"] = epoch + 1, 0
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(evaluate(model, ["dev"]))
            if metrics["dev/MRR"] > st["best_mrr"]:
                st["best_mrr"], st["best_epoch"] = metrics["dev/MRR"], epoch + 1
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        st["history"].append(metrics)
        if rank == 0:
            tracker.log(metrics, st["global_step"])
        report(metrics)

    # Test with the best checkpoint (by dev MRR).
    if best is not None:
        model.load_state_dict(best)
    final = evaluate(model, ["dev", "test"])
    final.update({"best_epoch": st["best_epoch"], "global_step": st["global_step"], "final": 1})
    if rank == 0:
        tracker.log({f"final/{k}": v for k, v in final.items()}, st["global_step"])
    tracker.finish()
    report(final)
