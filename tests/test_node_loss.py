"""A node lost for real (`tests/node_loss_script.py`, run in its own process so that the multi-node test cluster
shares no state with earlier Ray sessions of the test process): a head without CPUs and two 1-CPU worker nodes
(separate raylets) on this machine, the 2 training workers on different nodes, one node's raylet and every
process under it SIGKILLed from outside after the first checkpoint, a replacement node started; the run resumes
and ends with the uninterrupted run's step count and bit-identical metrics (slow; run in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_a_lost_node_is_replaced_and_the_run_ends_as_if_nothing_happened(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "node_loss_script.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert out.returncode == 0 and "NODE-LOSS-OK" in out.stdout, (out.stdout[-2000:], out.stderr[-4000:])
