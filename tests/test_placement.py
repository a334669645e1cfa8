"""The YAMLs users deploy hold the runs they are for: every top-level run config's training workers (the placement
group of its trainer's `ScalingConfig`) fit a node type of cluster/aws.yaml and of the KubeRay manifests, an
oversize run fails before anything is submitted with one line naming the largest node type, and on a real Ray
cluster whose nodes carry aws.yaml's resources (GPUs as a count: no CUDA code runs) every config's placement group
becomes ready, the oversize one never (slow part: one multi-node cluster, in its own process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from otmel.cli import main
from otmel.errors import UserError
from otmel.runconfig import load_config
from otmel.train.driver.placement import (
    PlacementError,
    check_placement,
    node_types,
    per_node,
    worker_bundles,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OVERSIZE = ["scaling.cpus_per_worker=64"]  # 64 CPUs + 1 GPU per worker: more CPUs than a g5.12xlarge has


def _types(name: str) -> dict[str, tuple[dict[str, float], int, bool]]:
    return {t.name: ({k: v for k, v in t.resources.items() if k in ("CPU", "GPU")}, t.max_nodes, t.head)
            for t in node_types(CLUSTER / name)}


def test_node_types_of_the_deployed_yamls() -> None:
    assert _types("aws.yaml") == {"head": ({"CPU": 4}, 1, True), "gpu_4x": ({"CPU": 48, "GPU": 4}, 4, False)}
    kuberay = {"headgroup": ({"CPU": 4}, 1, True), "gpu-4x": ({"CPU": 44, "GPU": 4}, 4, False)}
    assert _types("kuberay-raycluster.yaml") == _types("kuberay-rayjob.yaml") == kuberay
    assert _types("local-autoscaler.yaml") == {"ray.head.default": ({"CPU": 0}, 1, True),
                                               "cpu_1x": ({"CPU": 1}, 3, False)}


def test_the_local_autoscaler_yaml_is_what_the_autoscaler_reads() -> None:
    """cluster/local-autoscaler.yaml (scripts/local-cluster.sh) passes the autoscaler's own check as written: the
    wheel lacks the fake provider's defaults file, so `prepare_config` cannot fill anything in."""
    import copy

    import yaml
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "local-autoscaler.yaml").read_text())
    validate_config(copy.deepcopy(cfg))
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["provider"]["gcs_address"].startswith("127.0.0.1:")
    assert cfg["head_node_type"] == FAKE_HEAD_NODE_TYPE  # the provider tags its head node so
    assert 0 < cfg["idle_timeout_minutes"] < 1
    cfg["available_node_types"]["cpu_1x"]["max_worker"] = cfg["available_node_types"]["cpu_1x"].pop("max_workers")
    with pytest.raises(ValidationError):
        validate_config(cfg)


def test_the_bundles_are_those_of_the_trainer() -> None:
    from otmel.train.driver.launch import build_trainer

    for path in CONFIGS:
        cfg = load_config(path, ["run.storage=/tmp/otmel-placement-unused"])
        bundles, strategy = worker_bundles(cfg)
        one = {"CPU": float(cfg.scaling.cpus_per_worker), **({"GPU": 1.0} if cfg.scaling.use_gpu else {})}
        assert bundles == [one] * cfg.scaling.max_workers and strategy == "PACK", path.name
        sc = build_trainer(cfg, "probe").scaling_config  # what Ray Train places: one such bundle per worker
        assert sc._resources_per_worker_not_none == one and sc.placement_strategy == strategy, path.name


def test_an_elastic_run_needs_room_for_its_minimum() -> None:
    types = node_types(CLUSTER / "local-autoscaler.yaml")  # at most 3 one-CPU nodes
    cfg = load_config(ROOT / "configs/synth.yaml", ["scaling.num_workers=[2, 5]"])
    assert worker_bundles(cfg)[0] == [{"CPU": 1.0}] * 5
    fit = check_placement(cfg, types)  # starts with 2, grows to the 3 that fit
    assert (fit.node_type, fit.nodes) == ("cpu_1x", 3)
    with pytest.raises(PlacementError, match=r"4 training workers .* at most 3"):
        check_placement(load_config(ROOT / "configs/synth.yaml", ["scaling.num_workers=[4, 5]"]), types)


@pytest.mark.parametrize("cluster,big", [("aws.yaml", "gpu_4x"), ("kuberay-raycluster.yaml", "gpu-4x")])
def test_every_run_config_fits_the_deployed_clusters(cluster: str, big: str) -> None:
    types = node_types(CLUSTER / cluster)
    for path in CONFIGS:
        cfg = load_config(path)
        fit = check_placement(cfg, types, where=cluster)
        if cfg.scaling.use_gpu:  # the paper's 4 GPU workers: one 4-GPU node
            assert (fit.node_type, fit.workers_per_node, fit.nodes) == (big, 4, 1), path.name
        else:  # 1-CPU workers: any node holds them; the roomiest is named
            assert fit.node_type == big and fit.nodes == 1, path.name


def test_the_local_cluster_holds_the_cpu_configs_one_worker_per_node() -> None:
    types = node_types(CLUSTER / "local-autoscaler.yaml")
    fit = check_placement(load_config(ROOT / "configs/synth.yaml"), types)
    assert (fit.node_type, fit.workers_per_node, fit.nodes) == ("cpu_1x", 1, 2)
    with pytest.raises(PlacementError, match=r"no node type .* the largest, cpu_1x, has \{CPU: 1\}"):
        check_placement(load_config(ROOT / "configs/richpediamel.yaml"), types)
    with pytest.raises(PlacementError, match=r"4 training workers .* at most 3"):
        check_placement(load_config(ROOT / "configs/synth.yaml", ["scaling.num_workers=4"]), types)


def test_an_oversize_run_fails_naming_the_largest_node_type() -> None:
    cfg = load_config(ROOT / "configs/richpediamel.yaml", OVERSIZE)
    with pytest.raises(PlacementError) as err:
        check_placement(cfg, node_types(CLUSTER / "aws.yaml"), where="cluster/aws.yaml")
    msg = str(err.value)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError) and "\n" not in msg
    assert "{CPU: 64, GPU: 1}" in msg and "the largest, gpu_4x, has {CPU: 48, GPU: 4}" in msg
    assert "scaling.cpus_per_worker=64" in msg
    with pytest.raises(PlacementError, match=r"17 training workers .* at most 16"):
        check_placement(load_config(ROOT / "configs/richpediamel.yaml", ["scaling.num_workers=17"]),
                        node_types(CLUSTER / "kuberay-raycluster.yaml"))


def test_the_command_checks_before_any_submission(capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    check = ["placement", "--cluster", str(CLUSTER / "aws.yaml"), "--config", str(ROOT / "configs/richpediamel.yaml")]
    assert main(check) == 0
    assert "fits: 4 worker(s) of {CPU: 4, GPU: 1} -> 1 node(s) of type gpu_4x" in capsys.readouterr().out
    assert main([*check, *OVERSIZE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("otmel placement: error: ") and "gpu_4x" in err and "\n" not in err
    # a config mistake: the same one line
    assert main(["placement", "--cluster", str(CLUSTER / "aws.yaml"), "scaling.num_wrokers=2"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_every_config_is_placed_on_a_cluster_of_the_aws_node_types() -> None:
    tmp = tempfile.mkdtemp(prefix="otpl-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=tmp,
               PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, __file__, tmp], capture_output=True, text=True, timeout=300, env=env,
                             cwd=ROOT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0 and "PLACEMENT-OK" in out.stdout, (out.stdout[-3000:], out.stderr[-3000:])
    assert time.perf_counter() - t0 < 120


def _on_a_cluster(tmp: str) -> None:
    """Run in its own process: a head and one node per worker type of cluster/aws.yaml, with its resources."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    types = node_types(CLUSTER / "aws.yaml")

    def args(res: dict[str, float]) -> dict[str, Any]:
        extra = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")}
        return {"num_cpus": int(res.get("CPU", 0)), "num_gpus": int(res.get("GPU", 0)), "resources": extra,
                "object_store_memory": 80 * 1024 * 1024, "node_ip_address": "127.0.0.1"}

    head = next(t for t in types if t.head)
    os.makedirs(f"{tmp}/ray", exist_ok=True)  # RAY_TMPDIR/ray: where the Cluster writes ray_current_cluster
    cluster = Cluster(initialize_head=True, head_node_args={**args(head.resources), "temp_dir": f"{tmp}/ray",
                                                            "include_dashboard": False})
    try:
        assert cluster.head_node is not None
        node_type = {cluster.head_node.node_id: head.name}
        for t in types:
            if not t.head:
                node_type[cluster.add_node(**args(t.resources)).node_id] = t.name
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        for path in CONFIGS:
            cfg = load_config(path)
            fit = check_placement(cfg, types)
            bundles, strategy = worker_bundles(cfg)
            pg = placement_group(bundles, strategy=strategy)
            assert pg.wait(30), f"{path.name}: the placement group of its trainer was not ready"
            placed = {node_type[n] for n in placement_group_table(pg)["bundles_to_node_id"].values()}
            holds = {t.name for t in types if per_node(bundles[0], t.resources) > 0}
            assert fit.node_type in holds and placed <= holds, (path.name, placed, fit)
            if cfg.scaling.use_gpu:  # the paper's 4 GPU workers: all on one 4-GPU node
                assert placed == {"gpu_4x"} and fit.nodes == 1, (path.name, placed)
            remove_placement_group(pg)
        cfg = load_config(ROOT / "configs/richpediamel.yaml", OVERSIZE)
        try:
            check_placement(cfg, types)
            raise AssertionError("the oversize run was accepted")
        except PlacementError:
            pass
        pg = placement_group(worker_bundles(cfg)[0], strategy="PACK")
        assert not pg.wait(3), "Ray placed what the check refused"  # infeasible: it would wait forever
        remove_placement_group(pg)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _on_a_cluster(sys.argv[1])
    print("PLACEMENT-OK")
