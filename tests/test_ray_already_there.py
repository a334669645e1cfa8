"""A Ray already on the machine (issue 21, item 4): the commands that start Ray join a live cluster when asked
(`--address auto`, `--address HOST:PORT`, `RAY_ADDRESS`) and otherwise start a Ray of their own, say which in one
line, never break on a stale `ray_current_cluster` file, and turn a join that cannot work into one error line (exit 2).

The cluster is this module's own `ray start --head` on loopback with free ports and token authentication (its token
in the environment only: nothing is written to ~/.ray), in a temp dir under /tmp that is also the Ray temp dir
(`RAY_TMPDIR`) of every command the tests run: `auto` finds it there, and no test reads or writes the machine's
/tmp/ray. It is stopped by killing exactly the processes whose command lines name that temp dir: Ray 2.60's
`ray stop` has no option to pick one Ray (it stops every Ray on the machine, a user's too). Other Rays on the machine
(a user's, another test's) change no assertion: the commands' own Rays and the head are told apart by address.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ray_helpers import free_port
from tests.test_link import ckpt, kg  # noqa: F401 (session fixtures: a tiny checkpoint and KG, shared with test_link*)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXE = shutil.which("otmel") or str(BIN / "otmel")
TOKEN = secrets.token_hex(16)


def _env(ray_tmpdir: Path, **extra: str) -> dict[str, str]:
    """A command's environment: Ray's temp dir under this test's folder, the head's token, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, OTMEL_DEBUG="",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _stop_ray_under(folder: Path, gcs: str) -> None:
    """Kill the processes of the head whose files live under `folder`, and only them: those whose command lines name
    the folder or the head's GCS address (its Ray Client server names only the address) and their children (the
    raylet's agents and workers, renamed `ray::...`); then any process still writing a file under the folder (one
    orphaned before it was seen). SIGKILL after 1 s: the raylet and the GCS wait on each other for longer than that."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}

    def kill(procs: set[psutil.Process]) -> None:
        procs = {p for p in procs if p.pid not in me}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(procs), timeout=1)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)

    named: set[psutil.Process] = set()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(folder) in cmd or f"={gcs} " in f"{cmd} " or f"={gcs}," in cmd:
                named.add(p)
    for p in list(named):
        with contextlib.suppress(psutil.Error):
            named.update(p.children(recursive=True))
    kill(named)
    left: set[psutil.Process] = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(f.path.startswith(f"{folder}/") for f in p.open_files()):
                left.add(p)
    kill(left)


@dataclass
class Head:
    address: str  # its GCS, 127.0.0.1:PORT
    tmpdir: Path  # RAY_TMPDIR of the commands: the head's temp dir is TMPDIR/ray, its bootstrap file in there
    root: Path


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    root = Path(tempfile.mkdtemp(prefix="orat-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    tmpdir = root / "t"
    tmpdir.mkdir()
    # (its Ray Client server on a free port too, not 10001; no test joins it with ray://: the client server's session
    # processes take ports from 23000 up, machine-wide, where another Ray's client sessions may already be)
    port, client = free_port(), free_port()
    ports = [f"--{k}={free_port()}" for k in ("dashboard-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port")]
    env = _env(tmpdir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # with --node-ip-address 127.0.0.1: loopback only
    address = f"127.0.0.1:{port}"
    try:
        out = subprocess.run([str(BIN / "ray"), "start", "--head", f"--temp-dir={tmpdir / 'ray'}", f"--port={port}",
                              "--node-ip-address=127.0.0.1", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                              "--include-dashboard=false", "--disable-usage-stats",
                              f"--ray-client-server-port={client}", *ports],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert (tmpdir / "ray" / "ray_current_cluster").read_text().strip() == address  # where `auto` looks
        yield Head(address, tmpdir, root)
    finally:
        _stop_ray_under(root, address)  # not `ray stop`: see the module docstring
        shutil.rmtree(root, ignore_errors=True)


# Each step: a command's start_ray (as `otmel CMD` calls it, under `ray_command`), then ray.shutdown(). "cli": the
# train command's own argument handling (`ray_handler`: the early check, `--address` as run.ray_address) and
# init_ray, the start-up of train / tune / ablate / study, without the training.
_PROBE = r"""
import json, os, sys, time
import ray
from otmel.cli import build_parser
from otmel.cli.common import address_overrides, ray_handler
from otmel.ray_runtime import RayJoinError, ray_command, start_ray
from otmel.runconfig import load_config
from otmel.train.driver.launch import init_ray

results = []
for i, step in enumerate(json.loads(sys.argv[1])):
    print(f"@@ step {i}", file=sys.stderr, flush=True)
    os.environ.update(step.get("env", {}))
    t0 = time.perf_counter()
    res = {}
    try:
        if step.get("cli"):
            args = build_parser().parse_args(["train", "--address", step["address"]])
            cfg = load_config(None, address_overrides(args))
            res["run.ray_address"] = cfg.run.ray_address
            ray_handler("train", lambda a: init_ray(cfg) or 0)(args)
        else:
            with ray_command(step["cmd"], step.get("address")):
                start_ray(cpus=1, dashboard=False)
        res["gcs"] = ray.get_runtime_context().gcs_address
    except RayJoinError as exc:
        res["error"] = str(exc)
    res["seconds"] = time.perf_counter() - t0
    ray.shutdown()
    for k in step.get("env", {}):
        os.environ.pop(k, None)
    results.append(res)
print("@@ end", file=sys.stderr, flush=True)
print(json.dumps(results))
"""


def _probe(env: dict[str, str], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the steps in one fresh process; each result gets `lines`: the `otmel ...` lines its step printed."""
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps(steps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the probe hung; its stderr: {stderr[-4000:]}")
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    chunks = out.stderr.split("@@ step ")[1:]
    assert len(chunks) == len(results), out.stderr[-4000:]
    for res, chunk in zip(results, chunks, strict=True):
        res["lines"] = [ln for ln in chunk.split("@@ end")[0].splitlines()[1:] if ln.startswith("otmel")]
    return results


@pytest.fixture(scope="module")
def probed(head: Head) -> list[dict[str, Any]]:
    """With the head up: (0) no address, (1) `otmel train --address auto`, (2) --address HEAD, (3) RAY_ADDRESS=HEAD,
    (4) no address, Ray's temp dir holding a stale bootstrap file (a head that died: nobody listens at its port)."""
    stale_dir = head.root / "stale"
    (stale_dir / "ray").mkdir(parents=True)
    dead = f"127.0.0.1:{free_port()}"
    (stale_dir / "ray" / "ray_current_cluster").write_text(dead)
    steps = [{"cmd": "train"},
             {"cli": True, "address": "auto"},
             {"cmd": "tune", "address": head.address},
             {"cmd": "index", "env": {"RAY_ADDRESS": head.address}},
             {"cmd": "study", "env": {"RAY_TMPDIR": str(stale_dir)}}]
    results = _probe(_env(head.tmpdir), steps)
    results[4]["dead"], results[4]["file"] = dead, str(stale_dir / "ray" / "ray_current_cluster")
    return results


@pytest.mark.slow
def test_without_an_address_a_command_starts_its_own_ray_and_says_another_runs(head: Head,
                                                                               probed: list[dict[str, Any]]) -> None:
    own = probed[0]
    assert own.get("gcs") and own["gcs"] != head.address, own  # a Ray of its own, not the head
    assert own["gcs"].startswith("127.0.0.1:")
    assert own["lines"] == [f"otmel train: started a local Ray of its own (listening on 127.0.0.1; another Ray runs "
                            f"on this machine ({head.address}): pass --address auto to join it)"], own


@pytest.mark.slow
def test_asked_to_a_command_joins_the_head(head: Head, probed: list[dict[str, Any]]) -> None:
    auto, explicit, env = probed[1:4]
    assert auto["run.ray_address"] == "auto"  # --address is run.ray_address, which init_ray hands to start_ray
    for res in (auto, explicit, env):
        assert res.get("gcs") == head.address, res
    assert auto["lines"] == [f"otmel train: joined the Ray cluster at {head.address} (from --address auto)"]
    assert explicit["lines"] == [f"otmel tune: joined the Ray cluster at {head.address} (from --address)"]
    assert env["lines"] == [f"otmel index: joined the Ray cluster at {head.address} (from RAY_ADDRESS)"]


@pytest.mark.slow
def test_a_stale_bootstrap_file_never_breaks_a_command(probed: list[dict[str, Any]]) -> None:
    stale = probed[4]
    assert stale.get("gcs") and stale["gcs"] != stale["dead"], stale  # its own Ray (Ray's plain init would fail)
    assert len(stale["lines"]) == 1, stale
    # (other Rays of the machine may follow in the same line: "; another Ray runs ..." / "N other Rays run ...")
    assert stale["lines"][0].startswith(
        f"otmel study: started a local Ray of its own (listening on 127.0.0.1; ignored the stale {stale['file']}: "
        f"nothing answers at {stale['dead']}"), stale
    assert Path(stale["file"]).read_text() == stale["dead"]  # read, never rewritten


@pytest.mark.slow
def test_the_console_script_joins_with_address_auto_and_explains_a_missing_token(
        head: Head, ckpt: Path, kg: Path, tmp_path: Path) -> None:  # noqa: F811
    """`otmel index --address auto` builds an index on the head's worker; without the head's token (an explicit
    address turns no token auth on) the same command is one error line, exit 2."""
    base = ["index", "--checkpoint", str(ckpt), "--kg", str(kg), "--workers", "1", "--no-progress"]
    out = subprocess.run([EXE, *base, "--out", str(tmp_path / "idx"), "--address", "auto"], capture_output=True,
                         text=True, timeout=300, env=_env(head.tmpdir), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("otmel")] == [
        f"otmel index: joined the Ray cluster at {head.address} (from --address auto)"], out.stderr
    assert out.stdout.startswith("indexed 100 entities") and (tmp_path / "idx" / "index.json").is_file()

    t0 = time.perf_counter()
    out = subprocess.run([EXE, *base, "--out", str(tmp_path / "idx2"), "--address", head.address],
                         capture_output=True, text=True, timeout=300, env=_env(head.tmpdir, RAY_AUTH_MODE="disabled"),
                         cwd=ROOT)
    took = time.perf_counter() - t0
    assert out.returncode == 2, (took, out.stderr[-3000:])
    assert out.stderr.strip().splitlines() == [
        f"otmel index: error: could not join the Ray cluster at {head.address} (from --address): the cluster wants "
        "Ray's authentication token: set RAY_AUTH_MODE=token and give the cluster's token (~/.ray/auth_token, "
        "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN), or drop --address to run a local one"], out.stderr
    assert took < 90 and not (tmp_path / "idx2" / "index.json").exists(), took


# ------------------------------------------------------------------------------ no Ray needed


def test_a_wrong_address_is_one_error_line_exit_2_at_once(tmp_path: Path) -> None:
    """Nothing listens at the port: the console script says so before it does anything (no checkpoint is read)."""
    free = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    out = subprocess.run([EXE, "index", "--checkpoint", str(tmp_path / "no"), "--kg", str(tmp_path / "no"), "--out",
                          str(tmp_path / "o"), "--address", free], capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path), cwd=ROOT)
    took = time.perf_counter() - t0
    assert out.returncode == 2 and took < 30, (out.returncode, took)
    assert out.stderr.strip().splitlines() == [
        f"otmel index: error: could not join the Ray cluster at {free} (from --address): nothing answers there; "
        "start one with `ray start --head`, or drop --address to run a local one"], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("address", "source", "needle"), [
    ("127.0.0.1:{free}", "--address", "nothing answers there; start one with `ray start --head`, or drop --address"),
    ("ray://127.0.0.1:{free}", "--address", "nothing answers there"),
    ("127.0.0.1:{free}", "RAY_ADDRESS", "or unset RAY_ADDRESS to run a local one"),
    ("127.0.0.1:{free}", "run.ray_address", "or drop run.ray_address to run a local one"),
    ("http://127.0.0.1:8265", "RAY_ADDRESS", "an http:// address is a Ray dashboard / job server (what `ray job "
                                             "submit --address` takes), not a cluster to join"),
    ("ftp://h:1", "--address", "unknown scheme ftp://"),
    ("nowhere", "--address", "not an address of the form HOST:PORT, ray://HOST:PORT or auto"),
    ("h:99999", "--address", "not an address of the form HOST:PORT"),
])
def test_addresses_that_cannot_be_joined_are_refused_before_any_work(address: str, source: str,
                                                                      needle: str) -> None:
    from otmel.ray_address import RayJoinError, check_address

    address = address.format(free=free_port())
    t0 = time.perf_counter()
    with pytest.raises(RayJoinError) as exc:
        check_address(address, source)
    assert time.perf_counter() - t0 < 5
    assert needle in str(exc.value) and f"{address} (from {source})" in str(exc.value), str(exc.value)
    check_address(None)
    check_address("local")  # a local Ray of the command's own, as in ray.init


def test_a_listener_that_is_no_ray_gcs_is_refused_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that accepts TCP but speaks no gRPC (ray.init would retry it for minutes, then exit the process)."""
    from otmel import ray_address
    from otmel.ray_address import RayJoinError, check_address

    monkeypatch.setattr(ray_address, "GRPC_PROBE_TIMEOUT_S", 1.0)  # (5 s by default)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(RayJoinError, match="something listens there but no Ray GCS answers"):
            check_address(address)
        assert time.perf_counter() - t0 < 10


def test_auto_skips_a_stale_bootstrap_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--address auto`: the recorded address where nothing answers is skipped; then the one Ray running on the
    machine is it, none is an error naming the stale file, several an error listing them (the machine's raylets are
    replaced by listening sockets of this test)."""
    from otmel import ray_address
    from otmel.ray_address import RayJoinError, resolve_address

    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_address.bootstrap_address() == (dead, str(tmp_path / "ray" / "ray_current_cluster"))
    with contextlib.ExitStack() as stack:
        live = []
        for _ in range(2):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            s.listen()
            live.append(f"127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setattr(ray_address, "running_gcs_addresses", lambda: set())
        with pytest.raises(RayJoinError) as exc:
            resolve_address("auto", "--address")
        assert str(exc.value) == (
            f"could not join a Ray cluster (auto, from --address): no Ray runs on this machine "
            f"({tmp_path / 'ray' / 'ray_current_cluster'} names {dead}, where nothing answers); start one with `ray "
            "start --head`, or drop --address to run a local one")
        monkeypatch.setattr(ray_address, "running_gcs_addresses", lambda: {live[0]})
        target = resolve_address("auto", "--address")
        assert (target.address, target.auto, target.via) == (live[0], True, "--address auto")
        assert ray_address.other_ray_note() == (
            f"; ignored the stale {tmp_path / 'ray' / 'ray_current_cluster'}: nothing answers at {dead}; another Ray "
            f"runs on this machine ({live[0]}): pass --address auto to join it")
        monkeypatch.setattr(ray_address, "running_gcs_addresses", lambda: set(live))
        with pytest.raises(RayJoinError, match="2 Rays run on this machine .* pass --address HOST:PORT to pick one"):
            resolve_address("auto", "RAY_ADDRESS")
        (tmp_path / "ray" / "ray_current_cluster").write_text(live[1])  # a recorded one that answers comes first
        assert resolve_address("auto", "--address").address == live[1]


@pytest.mark.parametrize("argv", [
    ["train"], ["baseline"], ["tune", "--search", "s.yaml"], ["ablate"], ["study", "--name", "n"],
    ["index"], ["eval", "--checkpoint", "c", "--shards", "s"], ["serve", "--checkpoint", "c", "--index", "i"],
])
def test_every_command_that_starts_ray_takes_address(argv: list[str]) -> None:
    from otmel.cli import build_parser
    from otmel.cli.common import address_overrides
    from otmel.runconfig import load_config

    args = build_parser().parse_args([*argv, "--address", "[::1]:6379"])
    assert args.address == "[::1]:6379"
    if argv[0] not in ("index", "eval", "serve"):  # the commands with a run config: --address is run.ray_address
        assert load_config(None, address_overrides(args)).run.ray_address == "[::1]:6379"
    assert build_parser().parse_args(argv).address is None


def test_train_help_shows_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from otmel.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--address ADDRESS" in out and "run.ray_address" in out


def test_a_job_drivers_ray_init_leaves_out_the_variables_its_jobs_runtime_env_sets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from otmel.ray_runtime import without_job_env_vars

    mine = {"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert without_job_env_vars(mine) == mine  # not a job's driver: the workers need every one
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"WANDB_MODE": "online", "DS_ACCELERATOR": "cpu"}, "working_dir": "x"}}))
    assert without_job_env_vars(mine) == {"OMP_NUM_THREADS": "1"}  # the job's own values reach the workers
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert without_job_env_vars(mine) == mine
