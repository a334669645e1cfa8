"""The cluster definitions: the Ray cluster-launcher YAML validates offline against the schema shipped in
the ray wheel (and a misspelled key fails it); the KubeRay manifests parse, share one cluster spec and run
the same entry point as every other way of training (`python ray_jobs/train.py`)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.exceptions import ValidationError

from otmel.runconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
ENTRY = "python ray_jobs/train.py"


def _validate(cfg: dict[str, Any]) -> None:
    """Against the wheel's schema; a cloud config after Ray's own defaults are filled in. The running autoscaler
    only validates (Ray 2.60 cannot `prepare_config` a fake_multinode config: the wheel lacks its defaults file)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = copy.deepcopy(cfg)
    validate_config(cfg if cfg["provider"]["type"] == "fake_multinode" else prepare_config(cfg))


def _launcher_yamls() -> list[Path]:
    return [p for p in sorted(CLUSTER.glob("*.yaml")) if "provider" in (yaml.safe_load(p.read_text()) or {})]


def test_every_cluster_launcher_yaml_validates() -> None:
    paths = _launcher_yamls()
    assert [p.name for p in paths] == ["aws.yaml", "local-autoscaler.yaml"]
    for p in paths:
        _validate(yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_4x"].__setitem__("max_worker", c["available_node_types"]["gpu_4x"]
                                                              .pop("max_workers")),
    lambda c: c.__setitem__("setup_comands", c.pop("setup_commands")),
    lambda c: c["available_node_types"]["gpu_4x"].__setitem__("resources", {"CPU": 48, "GPU": 0.5}),
    lambda c: c["available_node_types"]["gpu_4x"].__setitem__("min_workers", 9),
], ids=["misspelled-node-key", "misspelled-top-key", "fractional-gpu", "min-above-max"])
def test_validation_rejects_broken_configs(mutate: Any) -> None:
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    mutate(cfg)
    with pytest.raises((ValidationError, ValueError)):
        _validate(cfg)


def test_aws_yaml_contents() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    head, gpu = types[cfg["head_node_type"]], types["gpu_4x"]
    assert "GPU" not in head["resources"] and gpu["resources"]["GPU"] == 4
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    setup = cfg["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if "pip install" in c and "torch==" in c)
    proj_i = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/otmel", c))
    assert torch_i < proj_i  # torch (CUDA build) first, then the project
    assert any("aws s3 sync" in c and "s3://" in c for c in setup)
    torch_pin = next(d for d in _deps() if d.startswith("torch=="))
    assert torch_pin in setup[torch_i]  # the same torch version as pyproject's pin
    assert all("venv/bin/activate" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])


def _deps() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _k8s() -> dict[str, dict[str, Any]]:
    docs = {}
    for p in sorted(CLUSTER.glob("kuberay-*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            docs[d["kind"]] = d
    return docs


def test_kuberay_manifests_parse_and_share_one_cluster_spec() -> None:
    docs = _k8s()
    assert set(docs) == {"RayCluster", "RayJob", "RayService"}
    for d in docs.values():
        assert d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"]
    cluster, job = docs["RayCluster"]["spec"], docs["RayJob"]["spec"]
    assert job["rayClusterSpec"] == cluster
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in str(cluster["headGroupSpec"])


def test_kuberay_job_runs_the_same_entry_point_with_a_valid_config() -> None:
    job = _k8s()["RayJob"]["spec"]
    assert job["entrypoint"].startswith(ENTRY + " ")
    argv = shlex.split(job["entrypoint"])
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    cfg = load_config(ROOT / config, overrides)  # the job's config and overrides are valid
    assert cfg.data.shards.startswith("/home/ray/shards/") and cfg.run.storage.startswith("s3://")
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == "/home/ray/otmel"


def test_docs_and_launcher_name_the_same_entry_point() -> None:
    doc = (ROOT / "docs/scale-out.md").read_text()
    submits = re.findall(r"ray job submit[^\n]*?(?:\\\n[^\n]*?)*-- (python ray_jobs/\w+\.py)", doc)
    assert submits and ENTRY in submits
    for cmd in ("ray up -y cluster/aws.yaml", "ray down -y cluster/aws.yaml",
                "kubectl apply -f cluster/kuberay-rayjob.yaml"):
        assert cmd in doc
    assert ENTRY in (CLUSTER / "aws.yaml").read_text()


def _serve_config(text: str) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(text))


def test_serve_config_validates_and_builds_the_otmel_app() -> None:
    """configs/serve/otmel.yaml passes Serve's own schema, its import path is our builder, its args build the app
    (no replica starts: binding only), and a misspelled key fails the schema."""
    import importlib

    from ray.serve.deployment import Application

    text = (ROOT / "configs/serve/otmel.yaml").read_text()
    cfg = _serve_config(text)
    (app,) = cfg.applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder.__module__ == "otmel.serve.app" and app.route_prefix == "/"
    assert cfg.http_options.host == "127.0.0.1"  # loopback unless a deployment says otherwise
    assert isinstance(builder(app.args), Application)
    with pytest.raises(ValueError, match="checkpoint"):
        builder({"index": "x"})
    broken = yaml.safe_load(text)
    broken["applications"][0]["import_pth"] = broken["applications"][0].pop("import_path")
    with pytest.raises(Exception, match="import_pth|import_path"):
        _serve_config(yaml.safe_dump(broken))


def test_kuberay_rayservice_serves_the_same_application(tmp_path: Path) -> None:
    svc = _k8s()["RayService"]["spec"]
    local = yaml.safe_load((ROOT / "configs/serve/otmel.yaml").read_text())
    embedded = yaml.safe_load(svc["serveConfigV2"])
    _serve_config(svc["serveConfigV2"])
    assert embedded["applications"] == local["applications"]
    assert embedded["http_options"]["host"] == "0.0.0.0"  # in the pod, behind KubeRay's Service
    cluster = svc["rayClusterConfig"]
    assert cluster["rayVersion"] == _k8s()["RayCluster"]["spec"]["rayVersion"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas run on the workers
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] >= 1 and group["maxReplicas"] >= group["minReplicas"]
    # head and workers run Serve with the environment `otmel serve` gives a local Ray: HAProxy ingress + tuning
    from otmel.serve.haproxy import ingress_environment
    from otmel.serve.run import SERVE_TUNINGS

    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (worker,) = group["template"]["spec"]["containers"]
    for container in (head, worker):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert SERVE_TUNINGS["throughput"].items() <= env.items()
    local = ingress_environment(tmp_path / "ingress")
    for key in ("RAY_SERVE_HAPROXY_RETRY_ON", "RAY_SERVE_HAPROXY_RETRIES"):
        assert env[key] == local[key]
