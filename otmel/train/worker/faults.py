"""Fault injection for the tests, outside the run config: with `OTMEL_TEST_FAIL_AT_STEP=N` (`FAULT_ENV`) in the
driver's environment, one worker (rank 1, or 0 alone) dies once, abruptly, at global step N, once Ray Train took its
last report; the marker (`FAULT_MARKER`) in the run folder keeps the restarted workers alive (tests/test_train_ray.py,
tests/test_full_size.py). The driver hands the variable to the workers (`fault_run_config`); the training loop calls
`maybe_inject_fault` before every step, and `hold_while_alone` (`HOLD_MARKER`, tests/elastic_script.py). Ray is
imported only to wait for Ray Train to take the last report.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

FAULT_ENV = "OTMEL_TEST_FAIL_AT_STEP"
FAULT_MARKER = ".fault-injected"
# while this file is in the run folder, a worker group of one worker waits before each step (tests/elastic_script.py:
# the run must still be going when the node it grows onto joins; a tiny model's steps would otherwise end it first)
HOLD_MARKER = ".otmel-test-hold-single-worker"


def fault_step() -> int | None:
    """The global step of `FAULT_ENV` (None when it is unset); a value that is not an integer >= 1 is an error."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: must be a global step >= 1")
    return int(value)


def fault_run_config() -> dict[str, Any]:
    """`ray.train.RunConfig` arguments handing the driver's `FAULT_ENV` to the workers' runtime env ({} when it is
    unset): the workers of a joined or already started Ray do not see the driver's environment."""
    step = fault_step()
    return {} if step is None else {"worker_runtime_env": {"env_vars": {FAULT_ENV: str(step)}}}


def maybe_inject_fault(fail_at_step: int | None, global_step: int, rank: int, world_size: int, run_dir: Path
                       ) -> None:
    """One worker dies once, abruptly, at `fail_at_step` (`FAULT_ENV`)."""
    if fail_at_step is None or global_step != fail_at_step:
        return
    if rank != (1 if world_size > 1 else 0):
        return
    marker = run_dir / FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} killed at step {global_step}\n")
    _wait_until_reports_are_taken()
    os._exit(1)


def hold_while_alone(run_dir: Path, world_size: int) -> None:
    """Wait while `HOLD_MARKER` is in the run folder and this worker group has one worker (one stat per step)."""
    if world_size != 1:
        return
    marker = run_dir / HOLD_MARKER
    while marker.exists():
        time.sleep(0.1)


def _wait_until_reports_are_taken(timeout_s: float = 60.0) -> None:
    """Until Ray Train's controller took this worker's last report (Ray 2.60 holds it in a one-slot queue until its
    next poll, every 2 s): a worker dying right after a checkpoint would take it along, and the checkpoint the restart
    resumes from would be a race."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        reports = get_train_context().get_result_queue()
    except Exception:  # another Ray Train: two poll intervals
        time.sleep(5.0)
        return
    deadline = time.monotonic() + timeout_s
    while reports.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)


__all__ = ["FAULT_ENV", "FAULT_MARKER", "HOLD_MARKER", "fault_run_config", "fault_step", "hold_while_alone",
           "maybe_inject_fault"]
