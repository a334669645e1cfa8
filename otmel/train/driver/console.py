"""What a training run shows on the console, and where everything else goes.

Quiet (the default, `run.console: quiet`): the driver prints the run's header, one progress bar per epoch (fed by
rank 0 through a small Ray queue actor: the workers are other processes, possibly on other nodes), one summary
line per epoch and the final table. Everything else — Ray's worker-prefixed output, Ray Train's report dumps,
DeepSpeed and library warnings — goes to log files in the run directory: `logs/driver.log` (the driver's Ray
logs and Python warnings) and `logs/worker-rank{R}.log` (each worker's whole stdout / stderr, redirected at the
file-descriptor level so C-level and subprocess output are caught too; `otmel.train.worker.progress`).

Verbose (`otmel train --verbose`, `run.console: verbose`): Ray forwards every worker's output to the driver as
usual and rank 0 draws its own tqdm bar, as before this module existed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from otmel.train.worker.progress import LOG_DIR


def format_epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """ "epoch 2/6  loss 1.2345  128.4 samples/s  dev H@1 70.12  MRR 80.22" (dev only when validated)."""
    line = (f"epoch {int(metrics['epoch'])}/{epochs}  loss {metrics.get('train/loss', float('nan')):.4f}  "
            f"{metrics.get('train/samples_per_s', 0.0):.1f} samples/s")
    if "dev/MRR" in metrics:
        line += f"  dev H@1 {100 * metrics['dev/H@1']:.2f}  MRR {100 * metrics['dev/MRR']:.2f}"
    return line


# ------------------------------------------------------------------------------------------------ driver side


class DriverConsole:
    """The driver's side of a quiet console: logs to files, a queue for rank 0's events, a thread drawing them."""

    def __init__(self, run_dir: Path, epochs: int, verbose: bool = False, stream: Any = None) -> None:
        self.run_dir, self.epochs, self.verbose = run_dir, epochs, verbose
        self.stream = stream or sys.stdout
        self.queue: Any | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bar: tqdm | None = None
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._quieted: list[tuple[logging.Handler, int]] = []
        self._warnings_state: tuple[Any, list[Any], bool] | None = None

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def capture_logs(self) -> None:
        """Quiet: the driver's Ray / Python-warning logs go to RUN_DIR/logs/driver.log (console: errors only)."""
        if self.verbose:
            return
        log = self.run_dir / LOG_DIR / "driver.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        # undone by close(): a run started from Python (or a test) leaves the process's warnings as they were
        self._warnings_state = (warnings.showwarning, list(warnings.filters),
                                logging.getLogger("py.warnings").propagate)
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        for name in ("ray", "py.warnings", "deepspeed"):
            lg = logging.getLogger(name)
            lg.addHandler(handler)
            self._handlers.append((lg, handler))
            for h in lg.handlers:
                if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    self._quieted.append((h, h.level))
                    h.setLevel(logging.ERROR)
        logging.getLogger("py.warnings").propagate = False

    def open_channel(self) -> Any | None:
        """The queue actor rank 0 writes its progress to (quiet console only; needs Ray to be initialised)."""
        if self.verbose:
            return None
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name="otmel-console", daemon=True)
        self._thread.start()
        return self.queue

    def _drain(self) -> None:
        from ray.util.queue import Empty

        assert self.queue is not None
        while not self._stop.is_set():
            try:
                event = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # the actor is gone (Ray shut down): nothing more to draw
                return
            self.handle(event)

    def handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "epoch_start":
            _, epoch, epochs, steps, initial = event
            self._close_bar()
            self._bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", file=self.stream,
                             mininterval=0.5, leave=False)
        elif kind == "step" and self._bar is not None:
            self._bar.update(event[1])
            self._bar.set_postfix(loss=f"{event[2]:.3f}", refresh=False)
        elif kind == "epoch_end":
            self._close_bar()
            self.print(format_epoch_line(event[1], self.epochs))
        elif kind == "note":  # a line of the run's own (a resize, a preemption notice), above the bar
            if self._bar is not None:
                self._bar.write(f"[otmel] {event[1]}", file=self.stream)
            else:
                self.print(f"[otmel] {event[1]}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Drain what is left, stop the thread, restore the console handlers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.queue is not None:
            from ray.util.queue import Empty

            with contextlib.suppress(Empty, Exception):  # drained, or the actor is gone
                while True:
                    self.handle(self.queue.get_nowait())
            with contextlib.suppress(Exception):
                self.queue.shutdown()
        self._close_bar()
        for h, level in self._quieted:
            h.setLevel(level)
        for lg, h in self._handlers:
            lg.removeHandler(h)
        for h in {h for _, h in self._handlers}:
            h.close()
        self._handlers.clear()
        if self._warnings_state is not None:
            showwarning, filters, propagate = self._warnings_state
            logging.captureWarnings(False)
            warnings.showwarning = showwarning
            cast(list[Any], warnings.filters)[:] = filters  # in place: the C module holds the same list
            warnings._filters_mutated()  # type: ignore[attr-defined]  # its cache, as simplefilter() clears it
            logging.getLogger("py.warnings").propagate = propagate
            self._warnings_state = None
        self._quieted.clear()


__all__ = ["DriverConsole", "format_epoch_line"]
