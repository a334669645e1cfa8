"""Running a real multi-process gloo group from a test: spawn, wait with a deadline, kill on timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def spawn_and_join(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout: float = 120.0) -> None:
    """`fn(rank, *args)` in `nprocs` spawned processes; fails the test (killing them) after `timeout` seconds."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers timed out")
