"""Run by tests/test_node_loss.py in a fresh process (a multi-node test cluster must not share a process with
earlier Ray sessions): an elastic run (`scaling.num_workers=[1, 2]`, DeepSpeed ZeRO-1) on a head without CPUs and
two 1-CPU worker nodes. Once the run has a checkpoint, one node gets a preemption notice (`ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION` with a deadline); the workers must write a just-in-time checkpoint; once Ray Train has
registered it the node is SIGKILLed. The run must go on with 1 worker from that checkpoint and grow back to 2 when a
replacement node joins (the lone worker held before each step meanwhile: `faults.HOLD_MARKER`); then the
replacement is SIGKILLed without a notice, and the run must go on with 1 worker from its newest registered
checkpoint; it must end at the fixed-size run's number of samples (within one global batch), recording every resize
and the notice. Prints a JSON line of timings (bench/elastic.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from otmel.train.driver.launch import main as train_main
from otmel.train.worker.faults import HOLD_MARKER
from tests.ray_helpers import free_port, kill_node, synth_shards

ROOT = Path(__file__).resolve().parents[1]
STEPS, EPOCHS, BATCH = 20, 2, 8  # per epoch at 2 workers: 20 steps of 2 x 8 samples


def overrides(shards: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}", "data.num_workers=0", "model.tiny_width=32", "model.hidden_dim=16",
        "model.tiny_image_size=32", f"train.batch_size={BATCH}", f"train.steps_per_epoch={STEPS}",
        f"train.epochs={EPOCHS}", "train.eval_every=2", "train.warmup_steps=2", "train.eval_batch_size=64",
        "train.progress=false", "train.checkpoint_every=4", "scaling.num_workers=[1, 2]", "scaling.resize_check_s=1",
        "run.preemption_check_every=1", "run.max_failures=3", "run.max_preemptions=2", "wandb.enabled=false",
        f"run.storage={storage}", f"run.name={name}", *extra,
    ]


def _states(run: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(run.glob("checkpoint_*/state.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # being written
            continue
    return out


def _registered(run: Path, name: str) -> bool:
    """Whether Ray Train's controller has registered checkpoint folder `name` as the run's latest (a checkpoint is
    resumed from only once registered: files on disk alone are not enough)."""
    try:
        snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return name in json.dumps(snap.get("latest_checkpoint_result"))


def _latest_registered(run: Path) -> dict[str, Any]:
    """The state of the checkpoint Ray Train would resume from now ({} while none is, or a file is being replaced)."""
    try:
        snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
        return dict(json.loads((run / name / "state.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _wait(what: str, cond: Any, deadline: float, t: threading.Thread, result: dict[str, Any]) -> Any:
    while True:
        value = cond()
        if value:
            return value
        assert t.is_alive() and time.time() < deadline, f"never: {what} ({result.get('exc')!r})"
        time.sleep(0.2)


def _worker_nodes() -> set[str]:
    """The nodes of the run's live training workers."""
    import ray.util.state

    actors = ray.util.state.list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return {a["node_id"] for a in actors if "RayTrainWorker" in (a.get("class_name") or "")}


def main(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # a worker group that cannot start (placed on a node that died but is not yet declared dead) is given up after
    # 15 s instead of Ray Train's 60, as on a cluster of spot nodes (docs/scale-out.md)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    shards = synth_shards(tmp_path / "data")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"},
        # a lost node is declared dead after ~3 s (Ray's default: ~15 s), as a cloud cluster tuned for spot would
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 1000}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                      "WANDB_MODE": "offline"}})
        result: dict[str, Any] = {}
        run_dir = tmp_path / "elastic"

        def run() -> None:
            try:
                result["res"] = train_main(str(ROOT / "configs/synth.yaml"), overrides(shards, tmp_path, "elastic"))
            except BaseException as exc:  # reported by the assertions below
                result["exc"] = exc

        t0 = time.time()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.time() + 400
        _wait("a first checkpoint at 2 workers", lambda: any(s.get("world_size") == 2 for s in _states(run_dir)),
              deadline, t, result)
        _wait("a worker on each node", lambda: _worker_nodes() == {n.node_id for n in nodes}, deadline, t, result)
        victim = nodes[1]
        victim_id = victim.node_id
        t_notice = time.time()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                        "--node-id", victim_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        "spot instance reclaimed (test)", "--deadline-remaining-seconds", "30"], check=True,
                       capture_output=True, text=True, timeout=60)
        jit_dir = _wait("a just-in-time checkpoint", lambda: next(
            (f.parent.name for f in sorted(run_dir.glob("checkpoint_*/state.json"))
             if "preemptions" in f.read_text() and json.loads(f.read_text())["preemptions"]), None),
            deadline, t, result)
        _wait("the checkpoint registered", lambda: _registered(run_dir, jit_dir), deadline, t, result)
        t_jit = time.time()
        jit = json.loads((run_dir / jit_dir / "state.json").read_text())
        latest_before_notice_kill = _wait("the latest registered state", lambda: _latest_registered(run_dir),
                                          deadline, t, result)
        kill_node(victim)
        cluster.worker_nodes.discard(victim)
        t_kill = time.time()
        _wait("a checkpoint at 1 worker", lambda: next(
            (s for s in _states(run_dir) if s.get("world_size") == 1), None), deadline, t, result)
        # the lone worker waits before each step from here until the run has grown back (a tiny model's remaining
        # steps could otherwise end the run before Ray Train resizes onto the new node)
        hold = run_dir / HOLD_MARKER
        hold.write_text("tests/elastic_script.py\n")
        replacement = cluster.add_node(num_cpus=1)  # the replacement machine: the run grows back to 2
        _wait("a registered checkpoint after growing back to 2 workers", lambda: any(
            (r["from"], r["to"]) == (1, 2) for r in _latest_registered(run_dir).get("resizes", [])),
            deadline, t, result)
        hold.unlink()
        # the replacement is lost without a notice: the run goes on from its newest registered checkpoint
        latest = _latest_registered(run_dir)
        assert _worker_nodes() == {nodes[0].node_id, replacement.node_id}
        kill_node(replacement)
        cluster.worker_nodes.discard(replacement)
        t_kill2 = time.time()
        t.join(timeout=max(1.0, deadline - time.time()))
        assert not t.is_alive() and "exc" not in result, result.get("exc")
        res = result["res"]
        resizes = [(r["from"], r["to"]) for r in res["resizes"]]
        assert resizes == [(2, 1), (1, 2), (2, 1)], res["resizes"]
        # the run went on from the just-in-time checkpoint, or a newer one registered before the kill
        assert res["preemptions"][0]["global_step"] == jit["global_step"]
        assert res["resizes"][0]["global_step"] >= latest_before_notice_kill["global_step"] >= jit["global_step"]
        assert res["preemptions"][0]["nodes"] == [victim_id] and len(res["preemptions"]) == 1
        # without a notice: from the newest checkpoint registered before the kill (at most one interval old)
        assert res["resizes"][2]["global_step"] >= latest["global_step"]
        epoch_samples, global_batch = STEPS * 2 * BATCH, 2 * BATCH
        assert EPOCHS * epoch_samples <= res["samples"] < EPOCHS * epoch_samples + global_batch
        assert [h["epoch"] for h in res["history"]] == [1, 2] and res["metrics"]["final"] == 1
        assert 0 <= res["metrics"]["test/MRR"] <= 1
        print("ELASTIC-TIMES " + json.dumps({
            "notice_to_jit_checkpoint_s": t_jit - t_notice,
            "kill_after_notice_to_training_on_the_survivor_s": res["resizes"][0]["time"] - t_kill,
            "kill_without_notice_to_training_on_the_survivor_s": res["resizes"][2]["time"] - t_kill2,
            "jit_step": jit["global_step"], "total_s": time.time() - t0,
            "samples": res["samples"], "resizes": res["resizes"], "history": res["history"]}))
    finally:
        (tmp_path / "elastic" / HOLD_MARKER).unlink(missing_ok=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    print("ELASTIC-OK")
