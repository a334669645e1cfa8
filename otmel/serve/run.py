"""`otmel serve`: start (or join) Ray, deploy the linking service on Ray Serve, stay in the foreground.

A local Ray is started on loopback only (`otmel.ray_runtime.start_ray`); Serve's HTTP proxy binds `host` (default
127.0.0.1) — before `serve.run`, the only place Ray Serve 2.60 takes it. Ctrl-C or SIGTERM shuts the application
and Serve down, then the Ray this command started.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from otmel.ray_runtime import start_ray
from otmel.serve.requests import Limits

APP_NAME = "otmel"


@dataclass
class ServeOptions:
    """What `otmel serve` deploys (the flags of the same names)."""

    checkpoint: str
    index: str
    host: str = "127.0.0.1"  # the HTTP proxy's address; 0.0.0.0 exposes it to the network
    port: int = 8000
    replicas: int = 1
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica (also its torch threads, at least 1)
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0  # how long a replica waits to fill a batch
    mode: str = "two-stage"
    candidates: int = 128
    watch_index_s: float = 2.0  # every replica re-reads the index manifest at most this often (0: only on reload)
    address: str | None = None  # a Ray cluster to join (default: a local Ray on loopback)
    limits: Limits = field(default_factory=Limits)

    def app_args(self) -> dict[str, Any]:
        """The `build_app` arguments (also what `configs/serve/otmel.yaml` lists)."""
        return {"checkpoint": str(Path(self.checkpoint).expanduser().resolve()),
                "index": str(Path(self.index).expanduser().resolve()), "replicas": self.replicas,
                "replica_cpus": self.replica_cpus, "threads": max(1, int(self.replica_cpus)),
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms, "mode": self.mode,
                "candidates": self.candidates, "watch_index_s": self.watch_index_s, "limits": asdict(self.limits)}


def deploy(opts: ServeOptions) -> str:
    """Start Ray if needed, Serve's proxy on `host:port`, and the application; returns the service's URL once
    `/healthz` answers."""
    import ray
    from ray import serve

    from otmel.link.linker import Linker
    from otmel.serve.app import build_app

    # fail here, with the library's clear error, rather than in a replica's constructor (a missing checkpoint,
    # an index of another checkpoint, a bad mode)
    Linker.from_checkpoint(opts.checkpoint, opts.index, mode=opts.mode, candidates=opts.candidates)
    if opts.replicas < 1 or opts.replica_cpus < 0 or opts.max_batch_size < 1 or opts.batch_wait_ms < 0:
        raise ValueError("--replicas and --max-batch-size must be >= 1, --replica-cpus and --batch-wait-ms >= 0")
    start_ray(address=opts.address, cpus=int(opts.replicas * opts.replica_cpus + 0.999), dashboard=False)
    have = float(ray.cluster_resources().get("CPU", 0))
    if opts.replicas * opts.replica_cpus > have:
        raise ValueError(f"{opts.replicas} replica(s) x {opts.replica_cpus} CPU need more than the {have:g} CPUs "
                         "of this Ray: lower --replicas or --replica-cpus (e.g. 0.5)")
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(build_app(opts.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '::') else opts.host}:{opts.port}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service at {url} did not answer /healthz within {timeout_s:.0f} s")
        time.sleep(0.5)


def shutdown(started_ray: bool = True) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()


def serve_forever(opts: ServeOptions) -> int:
    """`otmel serve`: deploy, print where, wait for Ctrl-C / SIGTERM, shut down cleanly."""
    import ray

    joined = ray.is_initialized() or bool(opts.address)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        url = deploy(opts)
        print(f"otmel serve: {url}  (POST /link, /link/batch; GET /healthz, /info) — {opts.replicas} replica(s), "
              f"batches of up to {opts.max_batch_size}; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("otmel serve: shutting down", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown(started_ray=not joined)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


__all__ = ["APP_NAME", "ServeOptions", "deploy", "serve_forever", "shutdown", "wait_healthy"]
