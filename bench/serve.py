"""The linking service under load: HTTP on Ray Serve vs the in-process batched `Linker`, same mentions, one run.

Parameters, fixed before the first run (docs/benchmarks.md, "Linking service"):
- mentions: the test mentions of the KG's shards (`--mentions`, default shards/synth), with their images (base64
  over HTTP; the same bytes in process), k = 10, two-stage, K = 128;
- in process (the baseline): one `Linker`, `link_batch` over batches of 16 (= the service's max batch), torch and
  faiss with 2 threads (the whole box); throughput = mentions / s over 3 passes after one warm-up pass;
- service: `otmel serve`'s deployment in this process (a local Ray on loopback), max batch 16, batch wait 5 ms, the
  "throughput" tuning (--tunings); layouts (--configs, CONFIGS below): 0 = 2 replicas x 1 CPU (1 thread each) on the
  HAProxy ingress (the default), 1 = the same on Serve's Python proxy, 2 = 1 replica x 2 CPUs on the Python proxy;
- loopback clients (aiohttp, in this process): 1 / 4 / 16 / 64 concurrent, each level after 32 warm-up requests,
  bounded: it stops at 1,500 requests or 30 s, whichever comes first; per-request latency p50 / p99, throughput =
  answered / wall time, failures = any non-200 or connection error (no retries).
Targets (issue 15): at 16 clients >= 0.7x the in-process throughput, p99 <= 4x p50, zero failed requests.

    .venv/bin/python bench/serve.py --checkpoint runs/bench/ckpt-OT-s3 --index runs/bench/index-synth \\
        --out runs/bench/serve-synth.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from otmel.data.manifest import shard_infos  # noqa: E402
from otmel.data.shards import iter_shard  # noqa: E402
from otmel.io import atomic_json  # noqa: E402

LEVELS = (1, 4, 16, 64)
MAX_REQUESTS, MAX_SECONDS, WARMUP = 1500, 30.0, 32
CONFIGS = ({"replicas": 2, "replica_cpus": 1.0, "ingress": "haproxy"},
           {"replicas": 2, "replica_cpus": 1.0, "ingress": "proxy"},
           {"replicas": 1, "replica_cpus": 2.0, "ingress": "proxy"})


def load_mentions(shards: Path, limit: int) -> list[dict[str, Any]]:
    """Test mentions with their image bytes (None when the mention has none)."""
    from otmel.data.manifest import read_manifest

    out: list[dict[str, Any]] = []
    for info in shard_infos(shards, "test", read_manifest(shards)):
        for s in iter_shard(shards / info.name, expected_samples=info.samples, expected_bytes=info.bytes):
            meta = json.loads(s["json"])
            out.append({"text": meta["sentence"], "mention": meta["mention"], "image": s.get("m.jpg")})
            if len(out) >= limit:
                return out
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def in_process(ckpt: str, index: str, ms: list[dict[str, Any]], batch: int = 16, threads: int = 2) -> dict[str, Any]:
    import faiss
    import psutil
    import torch

    from otmel.link import Linker
    from otmel.link.linker import LinkQuery

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    linker = Linker.from_checkpoint(ckpt, index)
    me = psutil.Process()
    qs = [LinkQuery(m["text"], m["mention"], m["image"], k=10) for m in ms]
    answers: list[Any] = []
    t_all = []
    cpu0 = 0.0
    for p in range(4):
        if p == 1:
            cpu0 = sum(me.cpu_times()[:2])
        t0 = time.perf_counter()
        got = []
        for s in range(0, len(qs), batch):
            got += linker.link_batch(qs[s:s + batch])
        if p == 0:
            answers = got
        else:
            t_all.append(time.perf_counter() - t0)
    cpu_ms = 1e3 * (sum(me.cpu_times()[:2]) - cpu0) / (len(qs) * len(t_all))
    return {"throughput": len(qs) * len(t_all) / sum(t_all), "batch": batch, "threads": threads, "cpu_ms": cpu_ms,
            "top1": [a[0].qid for a in answers]}


async def load_level(url: str, bodies: list[bytes], clients: int) -> dict[str, Any]:
    import aiohttp

    lat: list[float] = []
    failed = 0
    sent = 0
    deadline = time.monotonic() + MAX_SECONDS
    headers = {"content-type": "application/json"}
    conn = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(body: bytes) -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/link", data=body, headers=headers) as r:
                    await r.read()
                    return r.status == 200, time.perf_counter() - t0
            except (TimeoutError, aiohttp.ClientError):
                return False, time.perf_counter() - t0

        await asyncio.gather(*(one(bodies[i % len(bodies)]) for i in range(WARMUP)))

        async def worker(w: int) -> None:
            nonlocal sent, failed
            while sent < MAX_REQUESTS and time.monotonic() < deadline:
                i = sent
                sent += 1
                ok, dt = await one(bodies[(i * 7 + w) % len(bodies)])
                lat.append(dt)
                failed += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "failed": failed, "seconds": wall,
            "throughput": (len(lat) - failed) / wall, "p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99)}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the clients), Serve's proxy, the replicas and the rest
    of Ray (controller, raylet, GCS, ...), from /proc via psutil."""
    import psutil

    out = {"clients": 0.0, "proxy": 0.0, "replicas": 0.0, "ray_other": 0.0}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        t = p.info["cpu_times"]
        if t is None:
            continue
        sec = t.user + t.system
        if p.info["pid"] == me:
            out["clients"] += sec
        elif "ServeReplica" in cmd:
            out["replicas"] += sec
        elif "ProxyActor" in cmd or "/haproxy" in cmd:
            out["proxy"] += sec
        elif "ray" in cmd and ("/ray/" in cmd or cmd.startswith("ray::")):
            out["ray_other"] += sec
    return out


def served(ckpt: str, index: str, ms: list[dict[str, Any]], cfg: dict[str, Any], port: int,
           levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:
    import urllib.request

    from otmel.serve.run import ServeOptions, deploy, shutdown

    url = deploy(ServeOptions(checkpoint=ckpt, index=index, port=port, max_batch_size=16, batch_wait_ms=5.0, **cfg))
    try:
        bodies = [json.dumps({"text": m["text"], "mention": m["mention"], "k": 10,
                              "image": base64.b64encode(m["image"]).decode() if m["image"] else None}).encode()
                  for m in ms]
        top1 = []
        for b in bodies:  # the answers, one at a time (compared with the in-process ones)
            req = urllib.request.Request(url + "/link", data=b, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                top1.append(json.loads(r.read())["entities"][0]["qid"])
        out = []
        for c in levels:
            before = cpu_seconds()
            lv = asyncio.run(load_level(url, bodies, c))
            after = cpu_seconds()
            answered = max(1, lv["requests"] - lv["failed"])  # CPU ms per answered request, by process role
            lv["cpu_ms_per_request"] = {k: 1e3 * (after.get(k, 0.0) - before.get(k, 0.0)) / answered for k in after}
            out.append(lv)
        return {**cfg, "levels": out, "top1": top1}
    finally:
        shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--mentions", default="shards/synth", help="packed shards whose test mentions are sent")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="0,1", help="which service layouts of CONFIGS to run (e.g. 0,1,2)")
    ap.add_argument("--tunings", default="throughput",
                    help="otmel serve --tuning values to measure, each with every layout (e.g. throughput,ray-default)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    args = ap.parse_args()
    levels = tuple(int(c) for c in args.levels.split(","))
    ms = load_mentions(Path(args.mentions), args.limit)
    base = in_process(args.checkpoint, args.index, ms)
    print(f"in process: {base['throughput']:.1f} mentions/s (batches of {base['batch']}, {base['threads']} threads), "
          f"{base['cpu_ms']:.1f} CPU ms per mention", flush=True)
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "index": args.index, "mentions": len(ms),
                              "in_process": base, "service": []}
    for cfg in [{**CONFIGS[int(i)], "tuning": t} for t in args.tunings.split(",") for i in args.configs.split(",")]:
        s = served(args.checkpoint, args.index, ms, cfg, args.port, levels)
        s["top1_agreement"] = float(np.mean([a == b for a, b in zip(s.pop("top1"), base["top1"], strict=True)]))
        result["service"].append(s)
        for lv in s["levels"]:
            print(f"{cfg['ingress']}, {cfg['tuning']}, {cfg['replicas']} x {cfg['replica_cpus']:g} CPU | "
                  f"{lv['clients']:>2} clients: "
                  f"{lv['throughput']:.1f}/s ({lv['throughput'] / base['throughput']:.2f}x in process), "
                  f"p50 {lv['p50_ms']:.1f} ms, p99 {lv['p99_ms']:.1f} ms (p99/p50 {lv['p99_ms'] / lv['p50_ms']:.1f}), "
                  f"{lv['failed']} failed of {lv['requests']}; CPU ms/request "
                  + ", ".join(f"{k} {v:.1f}" for k, v in lv["cpu_ms_per_request"].items()), flush=True)
        atomic_json(Path(args.out), {**result, "in_process": {k: v for k, v in base.items() if k != "top1"}})


if __name__ == "__main__":
    main()
