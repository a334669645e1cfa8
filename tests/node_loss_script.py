"""Run by tests/test_node_loss.py in a fresh process (a multi-node test cluster must not share a process with
earlier Ray sessions). A node lost for real: a head without CPUs and two 1-CPU worker nodes (separate raylets) on
this machine, so the 2 training workers sit on different nodes; once the first checkpoint exists one node's raylet
and every process under it are SIGKILLed from outside and a replacement node is started. The run must resume from
its last checkpoint and end with the uninterrupted run's step count and metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from otmel.train.driver.launch import main as train_main
from tests.ray_helpers import synth_shards

ROOT = Path(__file__).resolve().parents[1]


def _overrides(shards: Path, storage: Path, name: str) -> list[str]:
    return [
        f"data.shards={shards}", "data.num_workers=0", "model.tiny_width=32", "model.hidden_dim=16",
        "model.tiny_image_size=32", "train.batch_size=8", "train.steps_per_epoch=4", "train.epochs=2",
        "train.eval_every=1", "train.warmup_steps=2", "train.eval_batch_size=32", "train.progress=false",
        "train.strategy=ddp", "train.checkpoint_every=2", "run.max_failures=2", "wandb.enabled=false",
        f"run.storage={storage}", f"run.name={name}",
    ]


def _kill_node(node: Any) -> list[int]:
    """SIGKILL a node's raylet and every process under it (its workers), as a lost machine would: no code path of
    the workers runs. Returns the pids killed."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    return [p.pid for p in victims]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_nodes_of_run() -> set[str]:
    import ray.util.state

    actors = ray.util.state.list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return {a["node_id"] for a in actors if "RayTrainWorker" in (a.get("class_name") or "")}


def main(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    shards = synth_shards(tmp_path / "data")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                      "WANDB_MODE": "offline"}})
        cfg = str(ROOT / "configs/synth.yaml")
        ref = train_main(cfg, _overrides(shards, tmp_path, "ref"))

        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["res"] = train_main(cfg, _overrides(shards, tmp_path, "lost"))
            except BaseException as exc:  # reported by the assertions below
                result["exc"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.time() + 300
        while not list((tmp_path / "lost").glob("checkpoint_*/state.json")):
            assert t.is_alive() and time.time() < deadline, f"no first checkpoint: {result}"
            time.sleep(0.3)
        time.sleep(1)  # let Ray Train register it
        placed = _worker_nodes_of_run()
        assert placed == {n.node_id for n in nodes}  # one training worker on each worker node, the lost one included
        killed = _kill_node(nodes[1])
        cluster.worker_nodes.discard(nodes[1])
        assert killed and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                  for p in killed)
        cluster.add_node(num_cpus=1)  # the replacement machine
        t.join(timeout=600)
        assert not t.is_alive() and "exc" not in result, result.get("exc")
        hit = result["res"]
        assert hit["metrics"]["global_step"] == ref["metrics"]["global_step"] == 8
        for k, v in ref["metrics"].items():
            if k.startswith(("dev/", "test/")):
                assert hit["metrics"][k] == v, k
        assert [h["epoch"] for h in hit["history"]] == [1, 2]
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    print("NODE-LOSS-OK")
