"""Training benchmarks, measured side by side in one run:

(a) step time under Ray Train with 1 worker vs a plain single-process loop, same data, model, engine
    (target: Ray / plain <= 1.10);
(b) peak memory of one worker's training step as the global negative pool grows 256 -> 4096 entities
    (target: at most linear), with and without the matcher's activation checkpointing;
(c) samples/s of the embedded default (read from a finished run's results.json when given).

    .venv/bin/python bench/train.py [--steps 40] [--default-run runs/NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from otmel.loss import OTMELLoss  # noqa: E402
from otmel.model import OTMEL  # noqa: E402
from otmel.model.encoder import build_preprocessor  # noqa: E402
from otmel.runconfig import load_config  # noqa: E402
from otmel.train.worker.engine import Engine  # noqa: E402

OVR = ["model.tiny_width=64", "data.num_workers=1", "train.batch_size=32", "train.strategy=ddp",
       "train.epochs=1", "train.progress=false", "wandb.enabled=false"]


def plain_loop(shards: Path, steps: int) -> float:
    """samples/s of the same training steps in this process, no Ray."""
    from otmel.data.loaders import train_loader

    cfg = load_config(ROOT / "configs/synth.yaml", [f"data.shards={shards}", *OVR])
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mcfg = cfg.model_config()
    model = OTMEL(mcfg)
    engine = Engine(model, cfg.train, steps, 1, False)
    loss_fn = OTMELLoss()
    loader = train_loader(shards, build_preprocessor(mcfg), batch_size=cfg.train.batch_size, steps_per_epoch=steps,
                          seed=0, num_workers=cfg.data.num_workers)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        engine.step(loss_fn(**engine(batch))["loss"])
        n += len(batch["m_index"])
    return n / (time.perf_counter() - t0)


def ray_loop(shards: Path, steps: int, storage: Path) -> float:
    from otmel.train.driver.launch import main

    res = main(str(ROOT / "configs/synth.yaml"),
               [f"data.shards={shards}", *OVR, "scaling.num_workers=1", f"train.steps_per_epoch={steps}",
                f"run.storage={storage}", "run.name=bench-ray1", "train.eval_every=100"])
    state = json.loads((Path(res["checkpoint"]) / "state.json").read_text())
    return float(state["history"][0]["train/samples_per_s"])


def pool_memory(pool: int, checkpoint: bool, local: int = 32) -> float:
    """Peak RSS (MB) of one training step: `local` mentions against a pool of `pool` entities, of which
    `local` are encoded here with gradient and the rest arrive detached, as gathered from other workers."""
    from otmel.model.testing import random_batch, tiny_cfg

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg("OT", match_checkpoint=checkpoint, tiny_width=64, hidden_dim=32))
    b = random_batch(local, missing=())
    with torch.no_grad():
        remote = model.encode_entities(random_batch(min(pool - local, 256), seed=1, missing=()))
    reps = -(-(pool - local) // len(remote))
    remote = type(remote).cat([remote] * reps).select(slice(0, pool - local))

    def widen(e):  # noqa: ANN001, ANN202
        return type(e).cat([e, remote]), 0

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    OTMELLoss()(**model(b, entity_pool=widen))["loss"].backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--default-run", default=None, help="run dir of the embedded default, for samples/s")
    ap.add_argument("--skip-memory", action="store_true", help="skip (b), the pool-size memory sweep")
    ap.add_argument("--_pool", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._pool is not None:  # child process of (b): one measurement per process, clean peak RSS
        print(pool_memory(args._pool, bool(args._ckpt)))
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per worker")
    shards = ROOT / "shards/synth"
    if not (shards / "manifest.json").exists():
        sys.exit("pack the synthetic benchmark first: .venv/bin/otmel train (or otmel synth + otmel pack)")
    rows = []
    if not args.skip_memory:
        print("\n(b) peak memory of one worker's step vs global pool size (local batch 32, tiny model)")
    for ckpt in () if args.skip_memory else (1, 0):
        for pool in (256, 512, 1024, 2048, 4096):
            out = subprocess.run([sys.executable, __file__, "--_pool", str(pool), "--_ckpt", str(ckpt)],
                                 capture_output=True, text=True, check=True)
            mb = float(out.stdout.strip().splitlines()[-1])
            rows.append((ckpt, pool, mb))
            print(f"  checkpointing={'on ' if ckpt else 'off'} pool {pool:5d}: +{mb:8.1f} MB")
    for ckpt in () if args.skip_memory else (1, 0):
        r = {p: mb for c, p, mb in rows if c == ckpt}
        print(f"  checkpointing={'on ' if ckpt else 'off'}: 4096/256 memory ratio {r[4096] / r[256]:.2f} "
              f"(pool ratio 16; linear or better when <= 16)")

    print(f"\n(a) training step time, {args.steps} steps, batch 32: Ray Train 1 worker vs plain loop")
    # plain, Ray, plain: the machine's load drifts, so the plain figure is the mean of one run either side
    plain_runs = [plain_loop(shards, args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        ray_sps = ray_loop(shards, args.steps, Path(tmp))
    plain_runs.append(plain_loop(shards, args.steps))
    plain = sum(plain_runs) / 2
    print(f"  plain loop     {plain:8.1f} samples/s (runs before/after: {plain_runs[0]:.1f} / {plain_runs[1]:.1f})")
    print(f"  Ray Train (1)  {ray_sps:8.1f} samples/s")
    print(f"  step time ratio Ray / plain = {plain / ray_sps:.3f} (target <= 1.10)")

    if args.default_run:
        res = json.loads((Path(args.default_run) / "results.json").read_text())
        state = json.loads((Path(res["checkpoint"]) / "state.json").read_text())
        sps = [h["train/samples_per_s"] for h in state["history"]]
        print(f"\n(c) embedded default ({args.default_run}): {sum(sps) / len(sps):.1f} samples/s over "
              f"{len(sps)} epochs (2 workers, global pool 64), wall {res['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
