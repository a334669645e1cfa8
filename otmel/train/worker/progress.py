"""A worker's side of the console (`otmel.train.driver.console` is the driver's): on a quiet console each worker's
stdout / stderr go to RUN_DIR/logs/worker-rank{R}.log (redirected at the file-descriptor level, so C-level and
subprocess output are caught too) and rank 0 sends throttled progress events to the driver's queue; on a verbose
console rank 0 draws its own tqdm bar and Ray forwards everything as usual."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG_DIR = "logs"  # under the run directory: driver.log, worker-rank{R}.log
_THROTTLE_S = 1.0  # at most one progress event per second from rank 0


class WorkerConsole:
    """A worker's side: progress events to the driver's queue (rank 0) when there is one; a local tqdm bar on a
    verbose console; nothing on a quiet one without a queue (a trial of a sweep or study)."""

    def __init__(self, channel: Any | None, rank: int, run_dir: Path, progress: bool, quiet: bool) -> None:
        self.channel, self.rank, self.run_dir, self.quiet = channel, rank, run_dir, quiet
        self.progress = progress and rank == 0 and (channel is not None or not quiet)
        self._bar: tqdm | None = None
        self._last = 0.0
        self._pending = 0

    def redirect_output(self) -> None:
        """Quiet console only: this worker's stdout / stderr (file descriptors 1 and 2) go to its log file."""
        if not self.quiet:
            return
        log = self.run_dir / LOG_DIR / f"worker-rank{self.rank}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:  # an unwritable run directory on this node: keep Ray's own worker logs
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def _send(self, event: tuple[Any, ...]) -> None:
        with contextlib.suppress(Exception):  # a full or vanished queue never stops training
            assert self.channel is not None  # callers check
            self.channel.put_nowait(event)

    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int) -> None:
        if not self.progress:
            return
        if self.channel is not None:
            self._send(("epoch_start", epoch, epochs, steps, initial))
        else:
            self._bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", mininterval=2.0)

    def step(self, loss: float) -> None:
        if not self.progress:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= _THROTTLE_S:
            self._send(("step", self._pending, loss))
            self._pending, self._last = 0, now

    def note(self, message: str) -> None:
        """A line about the run itself (a resize, a preemption notice): rank 0 writes it to its log and sends it to
        the driver's console."""
        if self.rank != 0:
            return
        print(f"[otmel] {message}", flush=True)
        if self.channel is not None:
            self._send(("note", message))

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Close the bar; rank 0 sends the epoch's summary to the driver (with or without a progress bar)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.rank != 0 or self.channel is None:
            return
        if self._pending:
            self._send(("step", self._pending, float(metrics.get("train/loss", float("nan")))))
            self._pending = 0
        self._send(("epoch_end", {k: v for k, v in metrics.items() if isinstance(v, int | float)}))


__all__ = ["LOG_DIR", "WorkerConsole"]
