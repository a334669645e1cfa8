"""Starting Ray for a command: the one start-up shared by train / study / tune / ablate / index.

`start_ray` joins a cluster (`address`, or the RAY_ADDRESS a `ray job submit` sets) or starts a local Ray of its
own (never another local Ray it happens to find on the machine) that listens on loopback only: its dashboard on
127.0.0.1 and — because the node's address is 127.0.0.1 — the GCS,
raylet, object manager, worker and agent servers too (Ray 2.60 binds its gRPC servers to loopback only when the
node IP is 127.0.0.1; it picks 127.0.0.1 as the node IP when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the setting it
uses on laptops; `_node_ip_address="127.0.0.1"` alone is resolved back to the machine's address). A cluster keeps
Ray's own networking (docs/reliability.md: what to firewall). Quiet by default: Ray's INFO start-up lines and
the workers' output stay in Ray's (and the run's) log files; `verbose=True` forwards worker output to the
console as Ray normally does.
This module and the Ray-facing parts of `otmel/train/` and `otmel/link/index.py` are the only ones that import Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any


def start_ray(*, address: str | None = None, cpus: int = 1, env_vars: dict[str, str] | None = None,
              verbose: bool = False, dashboard: bool = True) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it. A local Ray gets
    max(`cpus`, the machine's CPUs) logical CPUs. The local dashboard (which also serves the State API that Ray
    Train's placement-group cleaner polls) is bound to 127.0.0.1; `dashboard=False` for short-lived helpers."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"runtime_env": {"env_vars": dict(env_vars or {})}, "log_to_driver": verbose,
                          "logging_level": logging.INFO if verbose else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kw)
    else:
        # address="local": a Ray of this command's own, even when another one runs on the machine (`ray start
        # --head`, another otmel command, a test) or a dead one left /tmp/ray/ray_current_cluster behind; without
        # it ray.init() joins (or fails to join) that one. Joining is what RAY_ADDRESS / --address are for.
        with loopback_only():
            ray.init(address="local", num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", **kw)
    return True


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within the block, a local Ray started by this process uses 127.0.0.1 as its node address (so every server
    binds loopback): the environment variable for the processes Ray spawns, the constant for this one (read at
    import). Both are restored afterwards: the processes already started keep the setting, and a later Ray of
    another kind in this process (a multi-node test cluster, a joined cluster) is not affected."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_const = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old_env


__all__ = ["loopback_only", "start_ray"]
