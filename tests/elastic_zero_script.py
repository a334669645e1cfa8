"""Run by tests/test_elastic.py in spawned gloo processes: one phase of the ZeRO resharding check.

A phase builds `Engine` (the training engine of otmel, DeepSpeed ZeRO-1 on CPU over gloo) on a small model at a
world size, optionally loads the optimizer states that an earlier phase's ranks wrote (each rank's
`Engine.optimizer_state()`, as a checkpoint holds them), takes `steps` optimizer steps on seeded data, and writes
its own states and weights. The test compares the merged Adam moments of phases of different world sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from otmel.runconfig import TrainConfig
from otmel.train.worker.engine import Engine, load_state_file, save_state_file

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))  # odd sizes: ZeRO pads its partitions


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s slice of the global batch of `step`: the same global batch at any world size."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 7, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per]


def phase(rank: int, world: int, port: int, load_from: str, out: str, steps: int, first_step: int,
          more_steps: int = 0, more_out: str = "") -> None:
    """`steps` steps from `first_step` (after loading `load_from`), saved to `out`; then `more_steps` more, saved
    to `more_out` (a run that goes on at the same size: the fixed-size reference)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = model()
    train = TrainConfig(lr=1e-2, warmup_steps=1, batch_size=GLOBAL_BATCH // world,
                        deepspeed_config=str(ROOT / "configs/deepspeed/zero1.json"))
    if load_from:
        net.load_state_dict(torch.load(Path(load_from) / "model.pt", weights_only=True))
    engine = Engine(net, train, total_steps=10, world_size=world, use_gpu=False)
    if load_from:
        saved = sorted(Path(load_from).glob("optim-rank*.pt"), key=lambda p: int(p.stem[len("optim-rank"):]))
        engine.load_optimizer_state([load_state_file(p) for p in saved])
    if first_step:  # the LR schedule where the saving run left it, restored as a checkpoint restores it
        engine.load_scheduler_state({"last_batch_iteration": float(first_step - 1)})
    for folder, first, n in ((out, first_step, steps), (more_out, first_step + steps, more_steps)):
        if not folder:
            continue
        for step in range(first, first + n):
            x = batch(step, rank, world)
            # the mean over the GLOBAL batch: every world size sees the same gradient (DeepSpeed averages over ranks)
            loss = (engine(x) ** 2).sum() / GLOBAL_BATCH * world
            engine.step(loss, lr_iteration=float(step))
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_state_file(engine.optimizer_state(), Path(folder) / f"optim-rank{rank}.pt")
        if rank == 0:
            torch.save(net.state_dict(), Path(folder) / "model.pt")
    dist.barrier()
    dist.destroy_process_group()
