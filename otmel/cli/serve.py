"""`otmel serve`: the linking service on Ray Serve (otmel/serve/)."""

from __future__ import annotations

import argparse

from otmel.cli.common import add_address, ray_handler


def _cmd_serve(sub: argparse._SubParsersAction) -> None:
    from otmel.serve.requests import Limits
    from otmel.serve.run import SHUTDOWN_GRACE_S

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint + index over HTTP on Ray Serve (POST /link, /link/batch; GET /healthz, /info)",
        description="Deploy the linking service on Ray Serve (a local Ray on loopback by default, --address for a "
        "cluster) and stay in the foreground until Ctrl-C, SIGTERM or SIGHUP, which stop everything it started "
        "(exit status 0). Concurrent requests are batched per replica. The HTTP "
        "proxy listens on --host (127.0.0.1 unless you say otherwise). API and limits: docs/linking.md.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--index", required=True, help="an `otmel index` folder built with that checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (its torch threads)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a replica waits to fill a batch")
    p.add_argument("--mode", choices=["two-stage", "exhaustive"], default="two-stage", help="default mode")
    p.add_argument("--candidates", type=int, default=128, help="first-stage candidates re-ranked (two-stage)")
    p.add_argument("--watch-index-s", type=float, default=2.0,
                   help="each replica re-reads the index manifest at most this often (0: only on /admin/reload)")
    add_address(p, config_key=False)
    p.add_argument("--tuning", choices=["throughput", "ray-default"], default="throughput",
                   help="Ray Serve request-path settings for the local Ray this starts (otmel/serve/run.py "
                   "SERVE_TUNINGS; on a cluster, its environment decides)")
    p.add_argument("--ingress", choices=["auto", "haproxy", "proxy"], default="auto",
                   help="haproxy: Ray Serve's HAProxy ingress (faster; its stats and metrics kept on loopback, "
                   "otmel/serve/haproxy.py); proxy: Serve's Python HTTP proxy; auto (default): haproxy when this "
                   "starts the Ray and the HAProxy binary of ray[serve] is installed (Linux), else proxy")
    p.add_argument("--access-log", action="store_true",
                   help="Serve's per-request access log lines (route, status, latency; never bodies)")
    p.add_argument("--shutdown-grace-s", type=float, default=SHUTDOWN_GRACE_S,
                   help="on Ctrl-C / SIGTERM / SIGHUP, how long Serve may take to drain and stop (with the HAProxy "
                   "ingress >= 35 s) before the processes left are stopped (SIGTERM, then SIGKILL); a second signal "
                   f"stops them at once (default {SHUTDOWN_GRACE_S:g})")
    g = p.add_argument_group("request limits (4xx beyond them)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument("--max-batch-items", type=int, default=d.max_batch_items)
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.set_defaults(func=ray_handler("serve", _serve))


def _serve(args: argparse.Namespace) -> int:
    from otmel.serve.requests import Limits
    from otmel.serve.run import ServeOptions, serve_forever

    limits = Limits(max_body_bytes=args.max_body_bytes, max_batch_items=args.max_batch_items,
                    max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels)
    return serve_forever(ServeOptions(
        checkpoint=args.checkpoint, index=args.index, host=args.host, port=args.port, replicas=args.replicas,
        replica_cpus=args.replica_cpus, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        mode=args.mode, candidates=args.candidates, watch_index_s=args.watch_index_s,
        address=None if (args.address or "").strip() == "local" else args.address,  # local: a Ray of its own
        tuning=args.tuning, ingress=args.ingress, access_log=args.access_log,
        shutdown_grace_s=args.shutdown_grace_s, limits=limits))


COMMANDS = [_cmd_serve]
