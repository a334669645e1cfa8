"""Elastic training on this machine: how fast a run gets going again after a node is lost, what it loses with and
without a preemption notice, and what the preemption poll costs per step.

1. `tests/elastic_script.py` (a fresh process): an elastic 1-2 worker ZeRO-1 run on a multi-node cluster of this
   machine (a 0-CPU head, 1-CPU worker nodes). A node drained with a notice, then SIGKILLed; a replacement node;
   that node SIGKILLed without a notice. Reported: seconds from each kill to the first training step on the
   survivor (the resize record's time: written when the restarted worker resumes, just before its first step),
   the step the notice arrived at and the step each restart resumed from, samples/s per epoch with its world size.
2. The poll's cost: the same fixed 2-worker run on a local Ray with `run.preemption_check_every=1` and `0`, two
   runs each, interleaved (1, 0, 0, 1) in this process; the poll's own time per call (`train/preemption_poll_ms`,
   measured around the call in the worker) against the step time, and the throughput with / without the poll
   (`--every N`: the poll's interval, 1 by default).

Parameters, fixed before the first run: tiny model (width 32, hidden 16, 32 px), batch 8 per worker, 20 steps per
epoch x 2 epochs for (1) (the test's own settings), 40 steps x 1 epoch for (2), seed 0, `data.num_workers=0`.

    python bench/elastic.py                         # ~6 min on 2 cores; prints the figures and one JSON line
    python bench/elastic.py --poll-only --every 10  # part 2 at the default check interval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def elastic_run(tmp: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "elastic_script.py"), str(tmp)], capture_output=True,
                         text=True, timeout=900, env=env, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ELASTIC-TIMES ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"the elastic run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return dict(json.loads(line[len("ELASTIC-TIMES "):]))


def poll_cost(tmp: Path, every_n: int = 1) -> dict[str, Any]:
    from otmel.train.driver.launch import main as train_main
    from tests.ray_helpers import local_ray, synth_shards

    shards = synth_shards(tmp / "data")
    common = [f"data.shards={shards}", "data.num_workers=0", "model.tiny_width=32", "model.hidden_dim=16",
              "model.tiny_image_size=32", "train.batch_size=8", "train.steps_per_epoch=40", "train.epochs=1",
              "train.eval_batch_size=64", "train.progress=false", "scaling.num_workers=2", "wandb.enabled=false",
              f"run.storage={tmp}"]
    runs: dict[int, list[dict[str, Any]]] = {every_n: [], 0: []}
    with local_ray("otbel", 3):
        # interleaved (ABBA): a drift in the machine's load hits both alike
        for i, every in enumerate((every_n, 0, 0, every_n)):
            res = train_main(str(ROOT / "configs/synth.yaml"), [*common, f"run.preemption_check_every={every}",
                                                                  f"run.name=poll{i}"])
            runs[every].append(res["history"][-1])
    sps = {e: [h["train/samples_per_s"] for h in hs] for e, hs in runs.items()}
    poll_ms = mean(h["train/preemption_poll_ms"] for h in runs[every_n])
    step_ms = 1000 * 16 / mean(sps[0])  # one step = 2 workers x 8 samples
    return {"every": every_n, "samples_per_s": sps, "poll_ms": poll_ms, "step_ms": step_ms,
            "poll_share_per_step": poll_ms / step_ms / every_n,
            "throughput_ratio": mean(sps[every_n]) / mean(sps[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=1, help="run.preemption_check_every of the poll-cost runs")
    ap.add_argument("--poll-only", action="store_true", help="only part 2 (the poll's cost)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="otbel-") as d:
        el = None if args.poll_only else elastic_run(Path(d) / "elastic")
        poll = poll_cost(Path(d) / "poll", args.every)
    print("ELASTIC-BENCH " + json.dumps({"elastic": el, "poll": poll}, sort_keys=True, default=str))
    if el is not None:
        r = el["resizes"]
        print(f"node killed after a notice -> first step on the survivor: "
              f"{el['kill_after_notice_to_training_on_the_survivor_s']:.1f} s")
        print(f"node killed without a notice -> first step on the survivor: "
              f"{el['kill_without_notice_to_training_on_the_survivor_s']:.1f} s")
        print(f"notice -> just-in-time checkpoint registered: {el['notice_to_jit_checkpoint_s']:.1f} s (notice seen "
              f"at step {el['jit_step']})")
        print("resizes: " + ", ".join(f"{x['from']}->{x['to']} resumed at step {x['global_step']}" for x in r))
        print("samples/s per epoch (world at its end): " + ", ".join(
            f"{h['train/samples_per_s']:.1f} ({int(h['train/world_size'])})" for h in el["history"]))
    print(f"preemption poll every {poll['every']} step(s): {poll['poll_ms']:.1f} ms a call, step {poll['step_ms']:.0f} "
          f"ms: {100 * poll['poll_share_per_step']:.2f}% of a step in the call itself; samples/s with / without the "
          f"poll = {poll['throughput_ratio']:.3f} (runs: {poll['samples_per_s']})")


if __name__ == "__main__":
    main()
