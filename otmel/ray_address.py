"""Which Ray cluster an address names, checked without joining it; which other Rays run on this machine.

Addresses follow Ray 2.60's rules: `HOST:PORT` (the GCS, 6379 by default), `ray://HOST:PORT` (Ray Client), `auto`
(the cluster that `ray start` recorded in `ray_current_cluster` under Ray's temp dir — `$RAY_TMPDIR/ray`, else
`$TMPDIR/ray`, else `/tmp/ray` — or else the one Ray whose raylet runs on this machine), `local` (a local Ray of
the command's own). An `http://` address is a dashboard / job server (what `ray job submit --address` takes), which
`ray.init` refuses. Unlike `ray.init(address="auto")`, `auto` here skips a recorded address where nothing answers.
`otmel.ray_runtime.start_ray` joins what `resolve_address` returns.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from otmel.errors import UserError

PROBE_TIMEOUT_S = 2.0  # a TCP connect to a GCS address (no Ray handshake): is anything listening there
GRPC_PROBE_TIMEOUT_S = 5.0  # then: does a gRPC server answer there (a Ray GCS: well under a second)
NOT_A_GCS = ("something listens there but no Ray GCS answers (another service's port, e.g. the dashboard's 8265?): "
             "give the GCS address that `ray start --head` printed")

class RayJoinError(UserError, ConnectionError):
    """A Ray cluster the command was asked to join cannot be joined; the message says what failed and how to
    choose (start one with `ray start --head`, or run a local Ray without the address)."""


# ------------------------------------------------------------------------------------------ addresses


@dataclass
class JoinTarget:
    """Where `start_ray` connects: `address` as `ray.init` takes it, its `source`, and whether `--address auto`
    found it (then, as `ray.init(address="auto")` does, a local token file turns token authentication on)."""

    address: str
    source: str
    auto: bool = False

    @property
    def via(self) -> str:
        """Where the address came from, for messages: "--address", "RAY_ADDRESS", "--address auto", ..."""
        if not self.auto:
            return self.source
        return f"{self.source} auto" if self.source.startswith("--") else f"{self.source}=auto"

    @property
    def host(self) -> str:
        return _split_host_port(self.address.split("://", 1)[-1], 10001)[0]


def check_address(address: str | None, source: str = "--address") -> None:
    """Fail early, before a command does any work, when `address` cannot be a cluster to join (see
    `resolve_address`); None and `local` pass."""
    if address and address.strip() != "local":
        resolve_address(address, source)


def resolve_address(address: str, source: str) -> JoinTarget:
    """The cluster `address` names (see the module docstring), checked without joining it: its form, that something
    listens on its port (a TCP connect) and that it speaks gRPC, as a GCS and a Ray Client server do. Raises
    `RayJoinError` naming the address, where it came from (`source`) and what to do."""
    addr = address.strip()
    where = f"{addr} (from {source})"
    if addr.startswith(("http://", "https://")):
        raise RayJoinError(f"cannot join {where}: an http:// address is a Ray dashboard / job server (what `ray job "
                           "submit --address` takes), not a cluster to join; give the cluster's GCS address "
                           f"HOST:PORT (port 6379 by default), ray://HOST:10001 or auto, or {drop_hint(source)}")
    if addr == "auto":
        return _resolve_auto(source)
    scheme, _, rest = addr.rpartition("://")
    if scheme not in ("", "ray"):
        raise RayJoinError(f"cannot join {where}: unknown scheme {scheme}:// (Ray takes HOST:PORT, ray://HOST:PORT or "
                           f"auto); {drop_hint(source)}")
    try:
        host, port = _split_host_port(rest, 10001 if scheme == "ray" else None)
    except ValueError:
        raise RayJoinError(f"cannot join {where}: not an address of the form HOST:PORT, ray://HOST:PORT or auto; "
                           f"{drop_hint(source)}") from None
    if not _answers(host, port):
        raise RayJoinError(f"could not join the Ray cluster at {where}: nothing answers there; start one with `ray "
                           f"start --head`, or {drop_hint(source)}")
    if not _speaks_grpc(host, port):
        raise RayJoinError(f"could not join the Ray cluster at {where}: {NOT_A_GCS}, or {drop_hint(source)}")
    return JoinTarget(addr, source)


def _resolve_auto(source: str) -> JoinTarget:
    recorded, file = bootstrap_address()
    if recorded and _answers_at(recorded):
        return JoinTarget(recorded, source, auto=True)
    live = sorted(a for a in running_gcs_addresses() if _answers_at(a))
    stale = f" ({file} names {recorded}, where nothing answers)" if recorded else ""
    if len(live) == 1:
        return JoinTarget(live[0], source, auto=True)
    if not live:
        raise RayJoinError(f"could not join a Ray cluster (auto, from {source}): no Ray runs on this machine{stale}; "
                           f"start one with `ray start --head`, or {drop_hint(source)}")
    raise RayJoinError(f"could not join a Ray cluster (auto, from {source}): {len(live)} Rays run on this machine "
                       f"({', '.join(live)}) and `ray start` recorded none of them{stale}; pass --address HOST:PORT "
                       f"to pick one, or {drop_hint(source)}")


def drop_hint(source: str) -> str:
    if source == "RAY_ADDRESS":
        return "unset RAY_ADDRESS to run a local one"
    return f"drop {source} to run a local one"


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """"host:port", "[::1]:port" (or a bare host when `default_port`) -> (host, port); ValueError otherwise."""
    text = text.strip().rstrip("/")
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text and default_port is not None:
        port_text = str(default_port)
    port = int(port_text)  # ValueError for "" or junk
    if not host or not 0 < port < 65536 or any(c in host for c in "/ @?#"):
        raise ValueError(text)
    return host, port


def _answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at host:port (closed at once; no Ray handshake)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _speaks_grpc(host: str, port: int, timeout: float | None = None) -> bool:
    """Whether a gRPC server (a Ray GCS or Ray Client server) answers at host:port: an HTTP/2 channel gets ready.
    Asked before `ray.init`, which would retry another service's port for minutes (and then exit the process:
    Ray 2.60's C++ GCS client ends it once `gcs_rpc_server_reconnect_timeout_s` passes). Not asked with TLS
    (`RAY_USE_TLS`), which an insecure channel cannot tell."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    try:
        import grpc
    except ImportError:
        return True
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])  # the port itself, no proxy
    try:
        grpc.channel_ready_future(channel).result(timeout=GRPC_PROBE_TIMEOUT_S if timeout is None else timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def _answers_at(address: str) -> bool:
    try:
        return _answers(*_split_host_port(address, None), timeout=0.5)
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ other Rays


def bootstrap_address() -> tuple[str | None, str]:
    """(the address in the `ray_current_cluster` file of Ray's default temp dir, or None; the file's path): where
    Ray 2.60 looks for the cluster `ray start` started last (ray/_common/utils.py `get_ray_address_file`:
    `$RAY_TMPDIR/ray`, else `$TMPDIR/ray` on Linux, else `/tmp/ray`). The file outlives the Ray that wrote it."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None, path
    except OSError:
        return None, path


def running_gcs_addresses() -> set[str]:
    """The GCS addresses of the raylets running on this machine (their command lines, as Ray's own `auto` finds
    them: ray/_private/services.py `find_gcs_addresses`)."""
    try:
        from ray._private import services

        find: Any = services.find_gcs_addresses
        find.cache_clear()  # (non-empty results are cached for the process)
        return set(find())
    except Exception:  # a process list we may not read is no reason to fail a command
        return set()


def other_ray_note() -> str:
    """"; another Ray runs on this machine ..." when a Ray is there to join (the cluster `ray start` recorded, if
    its port answers, else the raylets of this machine), "; ignored the stale ..." for a recorded address where
    nothing answers, else "". Cheap: a file, a process list and TCP connects; nothing is joined."""
    recorded, file = bootstrap_address()
    if recorded and _answers_at(recorded):
        return f"; another Ray runs on this machine ({recorded}): pass --address auto to join it"
    stale = f"; ignored the stale {file}: nothing answers at {recorded}" if recorded else ""
    live = sorted(a for a in running_gcs_addresses() if a != recorded and _answers_at(a))
    if len(live) == 1:
        return f"{stale}; another Ray runs on this machine ({live[0]}): pass --address auto to join it"
    if live:
        return f"{stale}; {len(live)} other Rays run on this machine: pass --address HOST:PORT to join one"
    return stale


__all__ = ["GRPC_PROBE_TIMEOUT_S", "NOT_A_GCS", "PROBE_TIMEOUT_S", "JoinTarget", "RayJoinError", "bootstrap_address",
           "check_address", "drop_hint", "is_loopback", "other_ray_note", "resolve_address", "running_gcs_addresses"]
