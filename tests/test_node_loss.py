"""Nodes lost for real (`tests/elastic_script.py`, run in its own process so that the multi-node test cluster shares
no state with earlier Ray sessions of the test process): an elastic 1-2 worker DeepSpeed ZeRO-1 run on a head
without CPUs and two 1-CPU worker nodes (separate raylets) on this machine. A node drained with a preemption notice
gets a just-in-time checkpoint and is then SIGKILLed with every process under it: the run goes on with 1 worker from
that checkpoint, grows back to 2 workers on a replacement node, loses that node without a notice and goes on from
its newest checkpoint; it ends at the fixed-size run's sample count (slow; run in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_preempted_and_lost_nodes_shrink_and_grow_an_elastic_run_without_losing_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "elastic_script.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert out.returncode == 0 and "ELASTIC-OK" in out.stdout, (out.stdout[-3000:], out.stderr[-4000:])
