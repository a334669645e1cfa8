"""Shared by the end-to-end Ray tests: a tiny packed synthetic dataset and a local Ray session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

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


def kill_node(node: Any) -> list[int]:
    """SIGKILL a node's raylet and every process under it (its workers), as a lost machine would: no code path of
    the workers runs. Returns the pids killed."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    return [p.pid for p in victims]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
