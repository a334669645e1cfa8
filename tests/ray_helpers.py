"""Shared by the end-to-end Ray tests: a tiny packed synthetic dataset and a local Ray session."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from otmel.data.pack import pack
from otmel.data.synth import generate


def synth_shards(root: Path, *, seed: int = 3, scale: float = 0.1, shard_size: int = 40) -> Path:
    """Generate the synthetic benchmark at `scale` into ROOT/src and pack it into ROOT/shards."""
    generate(root / "src", seed=seed, scale=scale, workers=1)
    pack(root / "src", "cleaned", root / "shards", shard_size=shard_size, progress=False)
    return root / "shards"


@contextlib.contextmanager
def local_ray(prefix: str, num_cpus: int) -> Iterator[None]:
    """An in-process local Ray (dashboard on 127.0.0.1), CPU DeepSpeed and offline W&B in its workers."""
    import ray

    tmp = Path("/tmp") / f"{prefix}-{os.getpid()}"  # short: Ray's socket paths are length-limited
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _temp_dir=str(tmp), runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
