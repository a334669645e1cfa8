"""The linking service on a real local Ray Serve, over real HTTP on loopback (marked slow; run in CI).

One service for the module: 2 replicas (0.5 CPU each), batches of up to 8, a copy of the tiny test index (the
reload test changes it), small body / image limits so that the limit tests stay small, and the default ingress
(HAProxy, `otmel/serve/haproxy.py`). Short-lived `otmel serve` commands check either ingress as a user runs it, and
that SIGINT, SIGTERM and SIGHUP stop everything it started.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from otmel.link import Linker
from otmel.link.evaluate import read_split
from otmel.link.index_update import remove_from_index
from otmel.serve.app import ENTITY_KEYS, is_loopback
from otmel.serve.requests import Limits
from tests.ranking_helpers import assert_same_ranking
from tests.test_link import ckpt, index_dir, kg  # noqa: F401  (session fixtures)
from tests.test_serve_requests import png_bomb

pytestmark = pytest.mark.slow
LIMITS = Limits(max_body_bytes=200_000, max_image_bytes=100_000, max_image_pixels=1_000_000, max_batch_items=32)


# Serve keeps a stopping direct-ingress replica reachable for 30 s by default, for load balancers in front of the
# service to notice; no balancer here but Serve's own HAProxy, which marks a replica down within ~0.5 s. The tests'
# services drain for 2 s (each stop of a service otherwise takes >= 35 s of the suite's time).
FAST_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def _name(p: Any) -> str:
    """A process's name, "" once it has exited (a short-lived child of Ray may go between listing and reading)."""
    import psutil

    try:
        return str(p.name())
    except psutil.Error:
        return ""


def _haproxy_pids(directory: Path) -> list[int]:
    """The HAProxy processes of the service whose ingress files are in `directory` (not another service's on the
    machine, a user's or another test's)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "haproxy" and str(directory) in " ".join(p.info["cmdline"] or [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, path: str, body: Any = None, *, raw: bytes | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")


@pytest.fixture(scope="module")
def served(ckpt: Path, index_dir: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
           ) -> Iterator[dict[str, Any]]:
    import ray

    from otmel.serve.run import ServeOptions, deploy, shutdown

    if ray.is_initialized():  # a Ray left by another module: the service starts its own, as `otmel serve` does
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in FAST_DRAIN}
    os.environ.update(FAST_DRAIN)
    index = tmp_path_factory.mktemp("serve") / "index"
    shutil.copytree(index_dir, index)
    opts = ServeOptions(checkpoint=str(ckpt), index=str(index), port=_free_port(), replicas=2, replica_cpus=0.5,
                        max_batch_size=8, batch_wait_ms=10, watch_index_s=0.5, limits=LIMITS)
    url = deploy(opts)
    assert opts.ingress == "haproxy"  # "auto" on Linux with ray[serve]'s HAProxy wheel
    ingress = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent  # this service's private directory
    try:
        yield {"url": url, "index": index, "ckpt": ckpt, "ingress": ingress}
    finally:
        shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not _haproxy_pids(ingress)  # Serve stopped its HAProxy


@pytest.fixture(scope="module")
def queries(kg: Path, ckpt: Path, index_dir: Path) -> list[dict[str, Any]]:  # noqa: F811
    linker = Linker.from_checkpoint(ckpt, index_dir)
    _, metas = read_split(kg, "test", linker.pre)
    return [{"text": m["sentence"], "mention": m["mention"]} for m in metas[:6]]


def test_served_results_equal_linker_link(served: dict[str, Any], queries: list[dict[str, Any]]) -> None:
    linker = Linker.from_checkpoint(served["ckpt"], served["index"])
    image = _png_b64()
    for i, q in enumerate(queries):
        mode = ("two-stage", "exhaustive")[i % 2]
        body = {**q, "k": 5, "mode": mode, "image": image if i < 2 else None}
        status, out = call(served["url"], "/link", body)
        assert status == 200, out
        assert set(out) == {"entities", "mode", "elapsed_ms"} and out["mode"] == mode and out["elapsed_ms"] > 0
        want = linker.link(q["text"], q["mention"], base64.b64decode(image) if i < 2 else None, k=5, mode=mode)
        assert_same_ranking(out["entities"], want)  # the same ranking, up to float noise at a near-tie
        for got, w in zip(out["entities"], want, strict=True):
            assert set(got) == set(ENTITY_KEYS) and got["rank"] == w.rank
            if got["qid"] != w.qid:
                continue
            assert got["name"] == w.name
            for t in ("S_O", "S_F", "S_T", "S_V"):
                assert (got[t] is None) == (getattr(w, t) is None)
                if got[t] is not None:
                    assert got[t] == pytest.approx(getattr(w, t), abs=1e-5)


def test_haproxy_ingress_listens_on_loopback_only_with_the_hardened_config(served: dict[str, Any]) -> None:
    import psutil

    from otmel.serve.haproxy import config_path

    # Serve reloads its HAProxy now and then (a new process takes over the sockets, the old one exits): read the
    # newest one, again if it is replaced while being read
    port = int(served["url"].rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while True:
        try:
            procs = [psutil.Process(pid) for pid in _haproxy_pids(served["ingress"])]
            assert procs, "no HAProxy of this service"
            proc = max(procs, key=lambda p: p.create_time())
            cmdline = proc.cmdline()
            listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            # a new HAProxy takes the old one's sockets over its admin socket a moment after it starts
            assert port in {a.port for a in listening}, listening
            break
        except (psutil.Error, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    cfg = config_path(cmdline)  # its files in the service's private directory (Serve rewrites the file at
    assert cfg is not None and cfg.parent.parent.name.startswith("otmel-haproxy-")  # run time: the launcher
    assert cfg.parent.parent.stat().st_mode & 0o777 == 0o700  # hardens each HAProxy start, see the sockets below
    assert len(listening) >= 3  # the service, stats, metrics
    assert all(a.ip == "127.0.0.1" for a in listening), listening
    def is_replica(p: psutil.Process) -> bool:
        try:
            return "ServeReplica" in " ".join(p.cmdline())
        except psutil.Error:  # a short-lived process already gone
            return False

    replicas = [p for p in psutil.Process().children(recursive=True) if is_replica(p)]  # this test's Ray only
    direct = [c.laddr for p in replicas for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
              and 30000 <= c.laddr.port <= 31000]  # the replicas' direct-ingress HTTP servers
    assert len(direct) == 2 and all(a.ip == "127.0.0.1" for a in direct), direct


def test_health_info_and_batching(served: dict[str, Any], queries: list[dict[str, Any]]) -> None:
    assert call(served["url"], "/healthz") == (200, {"status": "ok", "generation": 1})
    status, info = call(served["url"], "/info")
    assert status == 200 and info["index"]["ann"] == "exact" and info["index"]["entities"] > 50
    assert info["checkpoint"]["sha256"] and info["limits"]["max_body_bytes"] == LIMITS.max_body_bytes
    results: list[int] = []

    def client(q: dict[str, Any]) -> None:
        for _ in range(4):
            results.append(call(served["url"], "/link", {**q, "k": 3})[0])

    threads = [threading.Thread(target=client, args=(queries[i % len(queries)],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 64
    sizes = [s for _ in range(8) for s in call(served["url"], "/info")[1]["recent_batch_sizes"]]
    assert max(sizes) > 1  # concurrent requests shared a forward pass


def _png_b64(w: int = 24, h: int = 24) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD: list[tuple[str, Any, int, str]] = [
    ("invalid-json", b'{"text": "x", ', 400, "body"),
    ("not-an-object", [1, 2], 400, "body"),
    ("missing-text", {"mention": "Ada"}, 400, "text"),
    ("empty-mention", {"text": "Ada wrote", "mention": ""}, 400, "mention"),
    ("long-text", {"text": "x" * 10_001, "mention": "x"}, 400, "text"),
    ("long-mention", {"text": "Ada", "mention": "A" * 501}, 400, "mention"),
    ("k-zero", {"text": "Ada", "mention": "Ada", "k": 0}, 400, "k"),
    ("k-too-big", {"text": "Ada", "mention": "Ada", "k": 101}, 400, "k"),
    ("k-not-int", {"text": "Ada", "mention": "Ada", "k": "5"}, 400, "k"),
    ("unknown-mode", {"text": "Ada", "mention": "Ada", "mode": "fast"}, 400, "mode"),
    ("unknown-field", {"text": "Ada", "mention": "Ada", "img": None}, 400, "img"),
    ("image-not-base64", {"text": "Ada", "mention": "Ada", "image": "%%%"}, 400, "image"),
    ("image-not-an-image", {"text": "Ada", "mention": "Ada", "image": base64.b64encode(b"hello").decode()}, 400,
     "image"),
    ("image-too-many-bytes", {"text": "Ada", "mention": "Ada",
                              "image": base64.b64encode(os.urandom(120_000)).decode()}, 413, "image"),
    ("decompression-bomb", {"text": "Ada", "mention": "Ada",
                            "image": base64.b64encode(png_bomb(20_000, 20_000)).decode()}, 413, "image"),
    ("body-too-big", {"text": "Ada " * 60_000, "mention": "Ada"}, 413, "body"),
    ("deep-nesting", b"[" * 50_000 + b"]" * 50_000, 400, "body"),  # RecursionError in json: was a 500
    ("lone-surrogate", b'{"text": "Ada \\ud800", "mention": "Ada"}', 400, "text"),  # the tokenizer raised TypeError
    ("extreme-aspect", {"text": "Ada", "mention": "Ada", "image": _png_b64(1, 900)}, 400, "image"),
]


@pytest.mark.parametrize(("case", "body", "status", "field"), BAD, ids=[b[0] for b in BAD])
def test_every_bad_request_gets_its_4xx_and_the_next_good_one_answers(
        served: dict[str, Any], queries: list[dict[str, Any]], case: str, body: Any, status: int, field: str) -> None:
    raw = body if isinstance(body, bytes) else None
    got, out = call(served["url"], "/link", None if raw else body, raw=raw)
    assert got == status, (case, out)
    assert out["error"]["field"] == field and out["error"]["rule"]
    if isinstance(body, dict) and isinstance(body.get("text"), str) and len(body["text"]) > 100:
        assert body["text"][:100] not in json.dumps(out)  # nothing the client sent is reflected
    assert call(served["url"], "/link", {**queries[0], "k": 2})[0] == 200


def test_wrong_method_and_unknown_route_are_4xx(served: dict[str, Any]) -> None:
    assert call(served["url"], "/link", method="GET")[0] == 405
    assert call(served["url"], "/nope")[0] == 404
    assert call(served["url"], "/admin/reload", method="GET")[0] == 405
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("192.0.2.7") and not is_loopback(None)


def test_a_batch_mixing_good_and_bad_items(served: dict[str, Any], queries: list[dict[str, Any]]) -> None:
    items = [{**queries[0], "k": 3}, {"text": "x", "mention": "x", "k": 0}, {**queries[1], "k": 2},
             {"text": "Ada", "mention": "Ada", "image": "!!"}, {**queries[2], "mode": "exhaustive"}]
    status, out = call(served["url"], "/link/batch", items)
    assert status == 200 and len(out) == 5
    assert [len(o["entities"]) if "entities" in o else None for o in out] == [3, None, 2, None, 10]
    assert out[1]["error"]["field"] == "items[1].k" and out[3]["error"]["field"] == "items[3].image"
    single = call(served["url"], "/link", {**queries[1], "k": 2})[1]
    assert [e["qid"] for e in out[2]["entities"]] == [e["qid"] for e in single["entities"]]
    assert call(served["url"], "/link/batch", [items[0]] * 33)[0] == 413
    assert call(served["url"], "/link/batch", [])[0] == 400


def _replicas() -> list[str]:
    """The live replicas' actor names (GCS's named-actor table: no dashboard needed)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::otmel#LinkService#"))


def test_a_killed_replica_is_replaced_and_at_most_one_percent_fails(served: dict[str, Any],
                                                                    queries: list[dict[str, Any]]) -> None:
    import ray

    before = _replicas()
    assert len(before) == 2
    outcomes: list[tuple[float, int]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                outcomes.append((time.monotonic(), call(served["url"], "/link", {**queries[i % 6], "k": 3},
                                                        timeout=30)[0]))
                continue
            outcomes.append((time.monotonic(), -1))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=False)
    killed_at = time.monotonic()
    deadline = killed_at + 90
    while time.monotonic() < deadline:  # Serve starts a new replica
        now = _replicas()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.5)
    recovered_at = time.monotonic()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    now = _replicas()
    assert len(now) == 2 and before[0] not in now, now
    failed = [s for _, s in outcomes if s != 200]
    assert len(failed) <= 0.01 * len(outcomes), (len(failed), len(outcomes), failed[:10])
    after = [s for at, s in outcomes if at > recovered_at + 1.0]
    assert after and all(s == 200 for s in after)


def test_a_reload_changes_the_answers(served: dict[str, Any], queries: list[dict[str, Any]]) -> None:
    q = {**queries[3], "k": 5}
    top = call(served["url"], "/link", q)[1]["entities"][0]["qid"]
    remove_from_index(served["index"], [top])
    status, out = call(served["url"], "/admin/reload", {})
    assert status == 200 and out["generation"] == out["generation_before"] + 1
    time.sleep(1.5)  # the other replica follows within watch_index_s = 0.5 s (checked between batches)
    for _ in range(8):
        got = call(served["url"], "/link", q)[1]["entities"]
        assert top not in [e["qid"] for e in got] and len(got) == 5
    assert call(served["url"], "/admin/reload", {})[1]["reloaded"] is False


def _start_otmel_serve(checkpoint: Path, index: Path, port: int, ingress: str, *extra: str) -> subprocess.Popen[str]:
    """`otmel serve` as a user runs it, in a session of its own (its process group gets the "terminal's" SIGHUP)."""
    exe = Path(sys.executable).parent / "otmel"
    # without the Serve environment this process set for the module's own service (a user's shell has none; inherited,
    # the command would take that service's HAProxy files and ports as the user's own settings)
    clean_env = {k: v for k, v in os.environ.items()
                 if not k.startswith("RAY_SERVE_") and k not in ("OTMEL_HAPROXY_BINARY", "RAY_ADDRESS")}
    return subprocess.Popen([str(exe), "serve", "--checkpoint", str(checkpoint), "--index", str(index),
                             "--port", str(port), "--replica-cpus", "0.5", "--ingress", ingress, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**clean_env, "RAY_AUTH_MODE": "disabled", **FAST_DRAIN})


def _ready_line(proc: subprocess.Popen[str]) -> str:
    line, seen = "", []
    while proc.stdout and not line.startswith("otmel serve:"):  # (Ray may forward a log line first)
        line = proc.stdout.readline()
        seen.append(line)
        assert line or proc.poll() is None, (seen, proc.poll(), proc.stderr.read()[-3000:] if proc.stderr else "")
    return line


def _alive(procs: list[Any]) -> list[Any]:
    import psutil

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in procs if running(p)]


# (signal, sent to the process group as a closed terminal does, --shutdown-grace-s): SIGTERM and SIGINT let Serve
# drain (FAST_DRAIN: >= 2 s); the SIGHUP run gives it 0.5 s, so it also checks the stop of the processes left over
STOPS = {"auto": [("SIGTERM", False, None), ("SIGHUP", True, "0.5")], "proxy": [("SIGINT", False, None)]}


@pytest.mark.parametrize("ingress", ["auto", "proxy"])
def test_otmel_serve_command_runs_in_the_foreground_and_stops_on_ctrl_c_sigterm_and_sighup(
        ingress: str, ckpt: Path, index_dir: Path, queries: list[dict[str, Any]]) -> None:  # noqa: F811
    """The command, as a user runs it, with either ingress (its own Ray): the same answers as `Linker.link`; SIGINT
    (Ctrl-C), SIGTERM (kill, systemd, Kubernetes) and SIGHUP (its terminal closed: the whole process group) stop it
    with exit 0, and then no process of its Ray and no HAProxy (auto = haproxy here) is left and the port is free:
    a second service is started on the same port at once and answers."""
    import psutil

    port = _free_port()
    want = "haproxy" if ingress == "auto" else "proxy"
    for n, (name, to_group, grace) in enumerate(STOPS[ingress]):
        proc = _start_otmel_serve(ckpt, index_dir, port, ingress, *(["--shutdown-grace-s", grace] if grace else []))
        try:
            line = _ready_line(proc)
            assert f"http://127.0.0.1:{port}" in line, (line, proc.poll())
            assert f", {want} ingress;" in line, line
            started = psutil.Process(proc.pid).children(recursive=True)  # its Ray's processes, Serve's HAProxy
            haproxies = [c for c in started if _name(c) == "haproxy"]
            assert bool(haproxies) == (want == "haproxy")
            if n == 0:
                linker = Linker.from_checkpoint(ckpt, index_dir)
                # queries[3]'s top entity was removed from the module's service (test_a_reload_changes_the_answers),
                # which still runs: this service answers from its own index (Serve's fallback proxy port, fixed at
                # 8500 and shared through SO_REUSEPORT, once let one service answer for the other)
                for q in (queries[0], queries[3]):
                    status, out = call(f"http://127.0.0.1:{port}", "/link", {**q, "k": 2})
                    assert status == 200, out
                    assert_same_ranking(out["entities"], linker.link(q["text"], q["mention"], None, k=2))
                assert call(f"http://127.0.0.1:{port}", "/link", {"text": "x", "mention": "x", "k": 0})[0] == 400
            else:  # the port of the service stopped before, served again at once
                assert call(f"http://127.0.0.1:{port}", "/link", {**queries[0], "k": 2})[0] == 200
            sig = getattr(signal, name)
            if to_group:
                os.killpg(proc.pid, sig)
                time.sleep(0.5)  # the hangup reached the service only: its Ray is there to be stopped in order
                assert {_name(c) for c in _alive(started)} >= {"raylet", "gcs_server"}
            else:
                proc.send_signal(sig)
            rc = proc.wait(timeout=240)  # Serve drains its replicas (HAProxy: >= 35 s), then stops Ray: slow on busy
            err = proc.stderr.read() if proc.stderr else ""  # cores (past --shutdown-grace-s, 60 s, it stops them)
            assert rc == 0, err[-3000:]
            assert f"otmel serve: {name}: shutting down" in err, err[-3000:]
            if grace:
                assert f"it did not stop within {grace} s: stopping its processes" in err, err[-3000:]
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            deadline = time.monotonic() + 5
            while _alive(started) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(started), [(p.pid, _name(p)) for p in _alive(started)]
            with socket.socket() as s:  # nothing listens on the port any more (an orphaned HAProxy kept it)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def test_no_request_body_or_image_reaches_the_logs(served: dict[str, Any], queries: list[dict[str, Any]]) -> None:
    import ray

    marker = f"MARKER{os.getpid()}Q{time.time_ns()}"
    image = base64.b64encode(marker.encode() * 4).decode()  # not an image: answered 400, the value never echoed
    assert call(served["url"], "/link", {"text": f"{marker} met Ada", "mention": "Ada"})[0] == 200
    status, out = call(served["url"], "/link", {"text": "Ada", "mention": "Ada", "image": image})
    assert status == 400 and marker not in json.dumps(out) and image[:40] not in json.dumps(out)
    call(served["url"], "/link", raw=f'{{"text": "{marker}", '.encode())  # invalid JSON
    time.sleep(2)  # let the replicas' and the proxy's log lines reach their files
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    seen = [p.name for p in logs.rglob("*") if p.is_file() and (marker.encode() in p.read_bytes()
                                                               or image[:40].encode() in p.read_bytes())]
    assert not seen, seen
    assert sum(1 for p in logs.rglob("*serve*") if p.is_file()) > 0  # (the logs exist and were searched)
