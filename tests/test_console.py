"""The quiet console without Ray: rank 0's events, the driver's rendering, the log capture, fd redirection."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from otmel.train.driver.console import DriverConsole, format_epoch_line
from otmel.train.worker.progress import WorkerConsole


class _Channel:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def put_nowait(self, e: tuple) -> None:
        self.events.append(e)


def test_rank0_sends_throttled_steps_and_the_epoch_summary(tmp_path: Path) -> None:
    ch = _Channel()
    w = WorkerConsole(ch, 0, tmp_path, progress=True, quiet=True)
    w.start_epoch(0, 3, 10, 0)
    for _ in range(10):
        w.step(1.5)
    w.end_epoch({"epoch": 1, "train/loss": 1.5, "train/samples_per_s": 10.0, "note": "x"})
    kinds = [e[0] for e in ch.events]
    assert kinds[0] == "epoch_start" and kinds[-1] == "epoch_end" and kinds.count("step") <= 3
    assert sum(e[1] for e in ch.events if e[0] == "step") == 10  # every step counted, few messages
    assert "note" not in ch.events[-1][1]  # only numbers cross to the driver
    other = _Channel()
    WorkerConsole(other, 1, tmp_path, progress=True, quiet=True).end_epoch({"epoch": 1})
    assert other.events == []  # only rank 0 talks
    silent = _Channel()
    w = WorkerConsole(silent, 0, tmp_path, progress=False, quiet=True)
    w.start_epoch(0, 1, 2, 0)
    w.step(1.0)
    w.end_epoch({"epoch": 1, "train/loss": 1.0})
    assert [e[0] for e in silent.events] == ["epoch_end"]  # no bar, but the summary line still comes


def test_driver_renders_one_line_per_epoch(tmp_path: Path) -> None:
    out = io.StringIO()
    con = DriverConsole(tmp_path, epochs=2, stream=out)
    con.handle(("epoch_start", 0, 2, 4, 0))
    con.handle(("step", 4, 2.0))
    con.handle(("epoch_end", {"epoch": 1, "train/loss": 2.0, "train/samples_per_s": 50.0, "dev/H@1": 0.5,
                              "dev/MRR": 0.6}))
    con.close()
    assert "epoch 1/2  loss 2.0000  50.0 samples/s  dev H@1 50.00  MRR 60.00" in out.getvalue()
    assert format_epoch_line({"epoch": 2, "train/loss": 1.0}, 2).startswith("epoch 2/2  loss 1.0000")


def test_capture_logs_sends_ray_and_warnings_to_the_run_log(tmp_path: Path) -> None:
    before = (warnings.showwarning, list(warnings.filters), logging.getLogger("py.warnings").propagate)
    con = DriverConsole(tmp_path, epochs=1, stream=io.StringIO())
    con.capture_logs()
    try:
        logging.getLogger("ray.train").warning("a ray warning")
        warnings.warn("a library warning", FutureWarning, stacklevel=1)
    finally:
        con.close()
    text = (tmp_path / "logs" / "driver.log").read_text()
    assert "a ray warning" in text and "a library warning" in text
    # and the process's warnings are as they were (a run started from Python, or the next test, sees its own)
    assert (warnings.showwarning, list(warnings.filters), logging.getLogger("py.warnings").propagate) == before


def test_worker_output_is_redirected_at_the_fd_level(tmp_path: Path) -> None:
    code = ("import os, sys; from pathlib import Path; from otmel.train.worker.progress import WorkerConsole;"
            f"WorkerConsole(None, 1, Path({str(tmp_path)!r}), True, True).redirect_output();"
            "print('py out'); sys.stdout.flush(); os.write(2, b'c-level err\\n')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    log = (tmp_path / "logs" / "worker-rank1.log").read_text()
    assert "py out" in log and "c-level err" in log
