"""A local Ray started by otmel listens on loopback only: every listening socket of its processes (GCS, raylet,
dashboard and its agents, workers) is on 127.0.0.0/8 or ::1 (slow: starts Ray in a subprocess)."""

from __future__ import annotations

import ipaddress
import json
import os
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
