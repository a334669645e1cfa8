"""Will a run's Ray Train workers fit a cluster? Checked against the node types a user deploys, before any job.

A training run's workers are one placement group: `ray.train.ScalingConfig(...).as_placement_group_factory()`
(Ray 2.60 Train V2: one bundle per worker, `{"CPU": scaling.cpus_per_worker}` plus `{"GPU": 1}` with
`scaling.use_gpu`; the trainer's own empty head bundle is dropped; strategy PACK) of the `ScalingConfig` that
`launch.build_trainer` gives its `TorchTrainer` (`launch.scaling_config`). A bundle that fits no node type waits
forever (the autoscaler cannot add a node that holds it), so `check_placement` raises a one-line `PlacementError`
naming the largest node type instead; it also refuses a run whose workers (an elastic run: its minimum) outnumber
what every node type at its `max_workers` can hold.

Node types come from a cluster-launcher YAML (`available_node_types[*].resources`, e.g. cluster/aws.yaml,
cluster/local-autoscaler.yaml) or a KubeRay manifest (RayCluster / RayJob / RayService: the head group and each
worker group, their resources read by the rules of Ray's own KubeRay autoscaler: `rayStartParams` first, then the
Ray container's limits, then its requests).

    otmel placement --cluster cluster/aws.yaml --config configs/richpediamel.yaml [k=v ...]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from otmel.errors import ConfigError
from otmel.runconfig import RunConfig
from otmel.train.driver.launch import scaling_config


class PlacementError(ConfigError):
    """The run's training workers cannot be placed on any node type of the cluster (the message names the largest)."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_nodes: int  # the head: 1; a worker type: its max_workers (capped by the cluster's)
    head: bool = False


@dataclass(frozen=True)
class Fit:
    node_type: str  # the node type that holds the most workers
    workers_per_node: int
    nodes: int  # nodes of that type the run takes (an elastic run: at the most workers that fit)
    bundle: dict[str, float]  # one worker's
    strategy: str


def worker_bundles(cfg: RunConfig) -> tuple[list[dict[str, float]], str]:
    """The placement group of the run's workers at their largest: its bundles (one per worker; an elastic run's
    `max_workers`) and strategy, from the `ScalingConfig` of the run's trainer (`launch.scaling_config`)."""
    sc = scaling_config(cfg)
    if sc.elasticity_enabled:  # Ray sizes an elastic group between MIN and MAX; the factory takes a fixed count
        sc = dataclasses.replace(sc, num_workers=sc.max_workers)
    pgf = sc.as_placement_group_factory()
    return [dict(b) for b in pgf.bundles], str(pgf.strategy)


def _kuberay_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(str(kind))


def node_types(path: str | Path) -> list[NodeType]:
    """The node types of a cluster-launcher YAML or of the (first) Ray cluster in a KubeRay manifest. A launcher
    node type without `resources` (Ray would detect them from the instance type) is left out; none left fails."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    types: list[NodeType] = []
    launcher = next((d for d in docs if "available_node_types" in d), None)
    if launcher is not None:
        cap = int(launcher.get("max_workers", 2**31))
        for name, spec in launcher["available_node_types"].items():
            if spec.get("resources") is None:
                continue
            head = name == launcher.get("head_node_type")
            types.append(NodeType(name, {k: float(v) for k, v in spec["resources"].items()},
                                  1 if head else min(int(spec.get("max_workers", cap)), cap), head))
    else:
        spec = next((s for s in map(_kuberay_spec, docs) if s), None)
        if spec is None:
            raise ConfigError(f"{path}: neither a cluster-launcher YAML (available_node_types) nor a KubeRay "
                              "RayCluster / RayJob / RayService")
        # Ray's in-tree KubeRay autoscaler derives its node types exactly so (Ray 2.60)
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _HEAD_GROUP_NAME,
            _generate_available_node_types_from_ray_cr_spec,
        )

        for name, t in _generate_available_node_types_from_ray_cr_spec(spec).items():
            head = name == _HEAD_GROUP_NAME
            types.append(NodeType(name, {k: float(v) for k, v in t["resources"].items()},
                                  1 if head else int(t["max_workers"]), head))
    if not types:
        raise ConfigError(f"{path}: no node type declares its resources")
    return types


def per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many copies of `bundle` one node with `resources` holds."""
    counts = [math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items() if k not in ("memory", "object_store_memory")) + "}"


def _largest(types: list[NodeType], bundle: dict[str, float]) -> NodeType:
    keys = sorted(bundle, key=lambda k: (k != "GPU", k != "CPU", k))
    return max(types, key=lambda t: tuple(t.resources.get(k, 0.0) for k in keys))


def check_placement(cfg: RunConfig, types: list[NodeType], where: str = "the cluster") -> Fit:
    """Where `cfg`'s training workers go on a cluster of `types`; `PlacementError` when no node type holds one
    worker, or the cluster at its largest cannot hold them all (an elastic run: its `min_workers`; it then runs with
    as many workers as fit, `Fit.nodes` counting the nodes of its largest size that fit)."""
    bundles, strategy = worker_bundles(cfg)
    bundle, n = bundles[0], cfg.scaling.min_workers
    asks = (f"scaling.cpus_per_worker={cfg.scaling.cpus_per_worker}, scaling.use_gpu="
            f"{str(cfg.scaling.use_gpu).lower()}")
    fits = [(t, per_node(bundle, t.resources)) for t in types]
    fits = [(t, k) for t, k in fits if k > 0]
    if not fits:
        big = _largest(types, bundle)
        raise PlacementError(f"a training worker needs {_fmt(bundle)} ({asks}) but no node type of {where} holds it: "
                             f"the largest, {big.name}, has {_fmt(big.resources)}")
    capacity = sum(k * t.max_nodes for t, k in fits)  # every node type at its max_workers
    if capacity < n:
        big = _largest([t for t, _ in fits], bundle)
        raise PlacementError(f"{n} training workers of {_fmt(bundle)} ({asks}) do not fit {where}: at most "
                             f"{capacity} fit its nodes at their max_workers (the largest node type, {big.name}, "
                             f"holds {per_node(bundle, big.resources)})")
    best, k = max(fits, key=lambda tk: (tk[1], not tk[0].head))
    return Fit(best.name, k, math.ceil(min(len(bundles), capacity) / k), bundle, strategy)


def describe_fit(cfg: RunConfig, fit: Fit) -> str:
    """The one line `otmel placement` prints for a run that fits."""
    return (f"fits: {cfg.scaling.describe()} worker(s) of {_fmt(fit.bundle)} -> {fit.nodes} node(s) of type "
            f"{fit.node_type} ({fit.workers_per_node} per node, {fit.strategy})")


__all__ = ["Fit", "NodeType", "PlacementError", "check_placement", "describe_fit", "node_types", "per_node",
           "worker_bundles"]
