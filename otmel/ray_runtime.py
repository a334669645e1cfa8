"""Starting Ray for a command: the one start-up shared by train / study / tune / ablate / index / serve.

`start_ray` joins a cluster when asked — an address (`--address`, `run.ray_address`), or the `RAY_ADDRESS` that a
`ray job submit` sets — or starts a local Ray of its own, never another local Ray it happens to find on the machine
(a `ray start --head`, another otmel command, a test), and never breaks on the `ray_current_cluster` file a Ray that
died left behind. It prints one line saying which it did (`otmel CMD: started a local Ray of its own ...` /
`otmel CMD: joined the Ray cluster at ADDRESS (from --address)`, on stderr), and a join that cannot work (nothing
answers at the address, an http:// address, the cluster wants an authentication token) is a `RayJoinError`: one line
`otmel CMD: error: could not join ...`, exit status 2, that says how to choose.

Addresses: `otmel.ray_address` (their forms, the checks made before joining, the other Rays of the machine).

A local Ray listens on loopback only: its dashboard on 127.0.0.1 and — because the node's address is 127.0.0.1 —
the GCS, raylet, object manager, worker and agent servers too (Ray 2.60 binds its gRPC servers to loopback only when
the node IP is 127.0.0.1; it picks 127.0.0.1 as the node IP when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the setting
it uses on laptops; `_node_ip_address="127.0.0.1"` alone is resolved back to the machine's address). A driver
joining a loopback address needs the same setting, or Ray rewrites 127.0.0.1 to the machine's address and waits for a
GCS that is not there. A cluster keeps Ray's own networking (docs/reliability.md: what to firewall). Quiet by
default: Ray's INFO start-up lines and the workers' output stay in Ray's (and the run's) log files; `verbose=True`
forwards worker output to the console as Ray normally does.
This module and the Ray-facing parts of `otmel/train/` and `otmel/link/index.py` are the only ones that import Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from otmel.ray_address import (
    NOT_A_GCS,
    JoinTarget,
    RayJoinError,
    bootstrap_address,
    check_address,
    drop_hint,
    is_loopback,
    other_ray_note,
    resolve_address,
    running_gcs_addresses,
)

# Ray 2.60 retries the GCS of a cluster it joins once a second, `RAY_gcs_server_port_wait_time_s` times (default 20,
# ray/_private/node.py `_init_gcs_client`), each failure a warning line of its C++ GCS client on stderr. The address
# answered a TCP connect and a gRPC handshake just before, so a GCS there answers within an attempt or two; what fails
# here fails every time (a token the cluster wants). Set the variable to wait longer (a head recovering from RocksDB).
JOIN_GCS_RETRIES = "5"


@dataclass
class _Command:
    name: str
    address: str | None


_command: list[_Command] = []  # the command being run (`ray_command`): its name and its --address


@contextlib.contextmanager
def ray_command(name: str, address: str | None = None) -> Iterator[None]:
    """Within the block, `start_ray` speaks for `otmel NAME` (its line's prefix) and joins `address` (the command's
    `--address`, already checked with `check_address`) when its caller names none; an address equal to it is labelled
    "--address". Undone on exit, so a later command in the same process (a test) starts from scratch."""
    _command.append(_Command(name, address or None))
    try:
        yield
    finally:
        _command.pop()


def start_ray(*, address: str | None = None, source: str = "run.ray_address", cpus: int = 1,
              env_vars: dict[str, str] | None = None, verbose: bool = False, dashboard: bool = True) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it (or joined a cluster). The address
    to join: `address` (named `source` in messages), else the command's `--address` (`ray_command`), else
    `RAY_ADDRESS`; none (or `local`): a local Ray of its own with max(`cpus`, the machine's CPUs) logical CPUs, its
    dashboard (which also serves the State API that Ray Train's placement-group cleaner polls) bound to 127.0.0.1;
    `dashboard=False` for short-lived helpers. Prints one line saying which it did; a join that fails raises
    `RayJoinError`."""
    import ray

    if ray.is_initialized():
        return False
    cmd = _command[-1] if _command else None
    if address and cmd is not None and address == cmd.address:
        source = "--address"
    elif not address and cmd is not None and cmd.address:
        address, source = cmd.address, "--address"
    elif not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    kw: dict[str, Any] = {"runtime_env": {"env_vars": without_job_env_vars(env_vars or {})}, "log_to_driver": verbose,
                          "logging_level": logging.INFO if verbose else logging.WARNING}
    prefix = f"otmel {cmd.name}" if cmd is not None else "otmel"
    if address and address.strip() != "local":
        target = resolve_address(address, source)
        _join(target, kw)
        _say(f"{prefix}: joined the Ray cluster at {target.address} (from {target.via})")
        return True
    note = other_ray_note()  # before ours runs: its own raylet is no other Ray
    # address="local": a Ray of this command's own, even when another one runs on the machine or a dead one left
    # ray_current_cluster behind; without it ray.init() joins (or fails to join) that one
    for attempt in (1, 2):
        try:
            with loopback_only():
                ray.init(address="local", num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=dashboard,
                         dashboard_host="127.0.0.1", **kw)
            break
        except Exception as exc:
            if attempt == 2 or STARTUP_TIMEOUT not in str(exc):
                raise
            # Ray waits a fixed 30 s for its raylet to register: on a busy machine it can take longer. Stop what the
            # failed start left (this process's own Ray children only) and start once more.
            stopped = stop_own_ray_children()
            _say(f"{prefix}: the local Ray did not start within Ray's 30 s ({exc}); stopped its {stopped} "
                 "process(es), starting it once more")
    _say(f"{prefix}: started a local Ray of its own (listening on 127.0.0.1{note})")
    return True


STARTUP_TIMEOUT = "timed out during startup"  # ray._private.node: the raylet did not register within 30 s

_RAY_PROCESSES = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor", "runtime_env_agent",
                  "dashboard_agent", "ray::", "default_worker", "raylet_")


def stop_own_ray_children() -> int:
    """Kill this process's child processes that are Ray's (a failed `ray.init` leaves its GCS / raylet running);
    never anything else. Returns how many."""
    import psutil

    me = psutil.Process()
    procs = []
    for p in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            text = " ".join([p.name(), *p.cmdline()[:3]])
            if any(k in text for k in _RAY_PROCESSES):
                procs.append(p)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    return len(procs)


# ------------------------------------------------------------------------------------------ joining


def _join(target: JoinTarget, kw: dict[str, Any]) -> None:
    """`ray.init` of `target`; its failures as one `RayJoinError` (what failed, how to choose)."""
    import ray

    if target.auto:
        with contextlib.suppress(Exception):  # as ray.init(address="auto") does: a local token file turns token auth on
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    retries = {} if "RAY_gcs_server_port_wait_time_s" in os.environ else {
        "RAY_gcs_server_port_wait_time_s": JOIN_GCS_RETRIES}
    try:
        with _env(retries), loopback_only() if is_loopback(target.host) else contextlib.nullcontext(), \
                _stderr_held() as held:
            ray.init(address=target.address, **kw)
            held.keep = True
    except Exception as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()
        why = _why(exc, client="://" in target.address)
        raise RayJoinError(f"could not join the Ray cluster at {target.address} (from {target.via}): {why}, or "
                           f"{drop_hint(target.source)}") from exc


def _why(exc: BaseException, client: bool = False) -> str:
    from otmel.errors import one_line

    text = one_line(exc)
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    seen = " ".join(f"{type(e).__name__} {e}" for e in chain).lower()
    if "authenticat" in seen or "invalidauthtoken" in seen:
        return ("the cluster wants Ray's authentication token: set RAY_AUTH_MODE=token and give the cluster's token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
    if client:
        return f"its Ray Client server did not connect this driver ({text[:300]}); its logs are ray_client_server*.err"
    if isinstance(exc, ConnectionError):
        return NOT_A_GCS
    return f"{text[:300]}; start one with `ray start --head`"


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Held:
    keep = False  # set once the join worked: what Ray wrote meanwhile is shown after all


@contextlib.contextmanager
def _stderr_held() -> Iterator[_Held]:
    """Hold what is written to file descriptor 2 (Ray's Python logging and its C++ GCS client's warnings, one per
    failed attempt) while a join is tried: shown afterwards if it worked, dropped if it failed (the `RayJoinError`
    says why in one line; `--debug` shows Ray's exception chain)."""
    import tempfile

    held = _Held()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to hold
        yield held
        return
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield held
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                buf.seek(0)
                data = buf.read()
                if data:
                    with contextlib.suppress(OSError):
                        os.write(2, data)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def without_job_env_vars(env_vars: dict[str, str]) -> dict[str, str]:
    """`env_vars` less the variables the runtime env of the `ray job submit` running this driver sets (they reach
    the workers anyway): Ray 2.60 refuses a `ray.init` whose runtime env names a variable the job's does ("Failed to
    merge the Job's runtime env", ray/_private/worker.py), e.g. `--runtime-env-json '{"env_vars": {"WANDB_MODE":
    "online"}}'`."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return dict(env_vars)
    try:
        job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        job_vars = {}
    return {k: v for k, v in env_vars.items() if k not in job_vars}


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


__all__ = [
    "JoinTarget", "RayJoinError", "bootstrap_address", "check_address", "loopback_only", "other_ray_note",
    "ray_command", "resolve_address", "running_gcs_addresses", "start_ray", "without_job_env_vars",
]
