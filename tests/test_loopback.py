"""A local Ray started by otmel listens on loopback only: every listening socket of its processes (GCS, raylet,
dashboard and its agents, workers) is on 127.0.0.0/8 or ::1 (slow: starts Ray in a subprocess)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, os, time, psutil, ray
from otmel.ray_runtime import start_ray
start_ray(cpus=1)
@ray.remote
def f():
    return os.getpid()
ray.get([f.remote() for _ in range(2)])
time.sleep(3)  # let the dashboard agents open their ports
me = psutil.Process()
socks = []
for p in [me, *me.children(recursive=True)]:
    try:
        socks += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps(socks))
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is IPv4 loopback on a dual-stack socket
    return addr.is_loopback


def test_a_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    socks = json.loads(out.stdout.strip().splitlines()[-1])
    names = {n for n, _, _ in socks}
    assert len(socks) >= 4 and any("gcs" in n for n in names) and any("raylet" in n for n in names), socks
    outside = [s for s in socks if not _loopback(s[1])]
    assert not outside, outside


def test_a_local_ray_that_times_out_at_startup_is_stopped_and_started_once_more(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py); on a busy machine a local start can
    miss it (seen in CI). `start_ray` stops what the failed start left and starts once more; any other error, or a
    second timeout, is raised as it is."""
    import ray

    from otmel import ray_runtime

    calls: list[str] = []
    stopped: list[int] = []

    def flaky_init(**kw: object) -> None:
        calls.append(str(kw.get("address")))
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray_runtime, "stop_own_ray_children", lambda: stopped.append(1) or 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runtime.start_ray(cpus=1, dashboard=False) is True
    assert calls == ["local", "local"] and stopped == [1]
    err = capsys.readouterr().err
    assert "did not start within Ray's 30 s" in err and "stopped its 2 process(es)" in err
    assert "started a local Ray of its own" in err

    for error, tries in ((Exception("The current node timed out during startup."), 2),  # once more, not forever
                         (ValueError("some other problem"), 1)):  # not retried

        def failing(err: Exception = error, **kw: object) -> None:
            calls.append("x")
            raise err

        calls.clear()
        monkeypatch.setattr(ray, "init", failing)
        with pytest.raises(type(error), match=str(error)[:20]):
            ray_runtime.start_ray(cpus=1, dashboard=False)
        assert len(calls) == tries


def test_stopping_a_failed_start_stops_ray_children_only(tmp_path: Path) -> None:
    from otmel.ray_runtime import stop_own_ray_children

    raylet = tmp_path / "raylet"
    raylet.symlink_to(shutil.which("sleep") or "/bin/sleep")
    ray_like = subprocess.Popen([str(raylet), "30"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert stop_own_ray_children() >= 1
        assert ray_like.wait(timeout=10) is not None
        assert other.poll() is None  # not Ray's: left alone
    finally:
        for p in (ray_like, other):
            if p.poll() is None:
                p.kill()
                p.wait()
