"""The linking service: a Ray Serve deployment with a FastAPI ingress around `otmel.link.Linker`.

    POST /link          {"text", "mention", "image": base64 | null, "k": 1..100 = 10, "mode": "two-stage"|"exhaustive"}
                        -> {"entities": [{"rank", "qid", "name", "S_O", "S_F", "S_T", "S_V"}], "mode", "elapsed_ms"}
    POST /link/batch    [obj, ...] -> [answer | {"error": {"field", "rule"}}, ...] in the same order (200)
    GET  /healthz       200 {"status": "ok"} when this replica can answer
    GET  /info          checkpoint, index, KG size, ANN kind, modes, limits
    POST /admin/reload  (from loopback only) pick up a changed index folder now

Concurrent requests to one replica are batched (`@serve.batch`, at most one batch at a time per replica): one
encoder forward and one re-rank per batch (`Linker.link_batch`), run in a worker thread so that the event loop
keeps reading requests; images are decoded in worker threads too. A bad request gets a 4xx JSON body naming the
field and the rule (`otmel.serve.requests`); a bad item of a batch fails alone. Request bodies and images are never
logged. Every replica also follows the index folder by itself (`watch_index_s`: it re-reads the manifest at most
that often, between batches), so with several replicas all of them switch, not only the one /admin/reload hit.
A switch never drops a request: a batch runs on the index generation it started with.
This module and `otmel/serve/run.py` are the only ones that import Ray Serve. (No `from __future__ import
annotations` here: FastAPI reads the route signatures at run time, and Serve's class ingress does not resolve string
annotations: `request: Request` became a required query parameter.)
"""


import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from otmel.link.linker import LinkedEntity, Linker, LinkInputError, LinkQuery
from otmel.serve.requests import (
    ADMIN_LOOPBACK_RULE,
    Limits,
    ParsedRequest,
    RequestError,
    parse_batch_request,
    parse_json,
    parse_link_request,
    to_query,
)

log = logging.getLogger("otmel.serve")
api = FastAPI(title="otmel linking service", docs_url=None, redoc_url=None, openapi_url=None)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ENTITY_KEYS = ("rank", "qid", "name", "S_O", "S_F", "S_T", "S_V")


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's loopback (the only origin /admin/reload accepts)."""
    return host in LOOPBACK


def entity_json(e: LinkedEntity) -> dict[str, Any]:
    return {k: getattr(e, k) for k in ENTITY_KEYS}


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared Content-Length) exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"must be at most {limit} bytes, got {declared}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"must be at most {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="LinkService", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10)
@serve.ingress(api)
class LinkService:
    """One replica: a `Linker` over the index folder, batching its requests."""

    def __init__(self, checkpoint: str, index: str, *, mode: str = "two-stage", candidates: int = 128,
                 max_batch_size: int = 16, batch_wait_ms: float = 5.0, threads: int = 1,
                 watch_index_s: float = 2.0, limits: dict[str, int] | None = None) -> None:
        import faiss

        torch.set_num_threads(max(1, threads))
        faiss.omp_set_num_threads(max(1, threads))  # replicas share the node's cores: no oversubscription
        self.linker = Linker.from_checkpoint(checkpoint, index, mode=mode, candidates=candidates)
        self.limits = Limits(**(limits or {}))
        self.watch_index_s, self._checked = watch_index_s, time.monotonic()
        self._link.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]  # added by @serve.batch
        self._link.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)  # type: ignore[attr-defined]
        self.batch_sizes: list[int] = []  # recent batch sizes (/info), for the bench and the tests

    # -- the batched core ------------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _link(self, queries: list[LinkQuery]) -> list[list[LinkedEntity] | LinkInputError]:
        self._follow_index()
        self.batch_sizes = [*self.batch_sizes[-255:], len(queries)]
        return await asyncio.to_thread(self.linker.link_batch, queries)

    def _follow_index(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and (self.watch_index_s <= 0 or now - self._checked < self.watch_index_s):
            return False
        self._checked = now
        before = self.linker.index.generation
        changed = self.linker.reload()
        if changed:
            log.info("index %s: generation %d -> %d", self.linker.index.path, before, self.linker.index.generation)
        return changed

    async def _answer(self, req: ParsedRequest, t0: float) -> dict[str, Any]:
        """One checked request: image decoded off the loop, then linked in a batch; `RequestError` if bad."""
        if req.image_b64 is None:  # nothing to decode: no thread hop
            query = to_query(req, self.limits)
        else:
            query = await asyncio.to_thread(to_query, req, self.limits)
        result = await self._link(query)
        if isinstance(result, LinkInputError):
            raise RequestError("request", " ".join(str(result).split())[:300])
        return {"entities": [entity_json(e) for e in result], "mode": req.mode or self.linker.mode,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000.0, 3)}

    # -- routes ----------------------------------------------------------------------------------------
    @api.post("/link")
    async def link(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            req = parse_link_request(parse_json(await read_body(request, self.limits.max_body_bytes)), self.limits)
            return JSONResponse(await self._answer(req, t0))
        except RequestError as exc:
            return _error(exc)

    @api.post("/link/batch")
    async def link_batch(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            items = parse_batch_request(parse_json(await read_body(request, self.limits.max_body_bytes)),
                                        self.limits)
        except RequestError as exc:
            return _error(exc)

        async def one(i: int, item: ParsedRequest | RequestError) -> dict[str, Any]:
            if isinstance(item, RequestError):
                return item.body()
            try:
                return await self._answer(item, t0)
            except RequestError as exc:
                return exc.at(f"items[{i}]").body()

        return JSONResponse(list(await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "generation": self.linker.index.generation})

    @api.get("/info")
    async def info(self) -> JSONResponse:
        index, loaded = self.linker.index, self.linker.loaded
        return JSONResponse({
            "checkpoint": {"path": str(loaded.path), "sha256": loaded.sha256,
                           "variant": getattr(loaded.config, "variant", None)},
            "index": {"path": str(index.path), "generation": index.generation, "entities": len(index),
                      "rows": index.rows, "ann": index.params.kind},
            "mode": self.linker.mode, "candidates": self.linker.candidates, "watch_index_s": self.watch_index_s,
            "limits": asdict(self.limits), "recent_batch_sizes": self.batch_sizes[-64:],
        })

    @api.post("/admin/reload")
    async def admin_reload(self, request: Request) -> JSONResponse:
        if not is_loopback(request.client.host if request.client else None):
            return _error(RequestError("client", ADMIN_LOOPBACK_RULE, 403))
        before = self.linker.index.generation
        changed = await asyncio.to_thread(self._follow_index, True)
        return JSONResponse({"reloaded": changed, "generation_before": before,
                             "generation": self.linker.index.generation,
                             "note": f"other replicas follow within {self.watch_index_s} s" if self.watch_index_s > 0
                             else "other replicas do not follow (watch_index_s = 0)"})

    def check_health(self) -> None:
        """Serve's periodic health check: the replica can read its index."""
        if len(self.linker.index) < 1:
            raise RuntimeError("the index holds no live entity")


def build_app(args: dict[str, Any]) -> Any:
    """The application for `serve deploy` / `serve run otmel.serve.app:build_app checkpoint=... index=...`:
    `args` holds LinkService's arguments plus `replicas`, `replica_cpus` and `access_log` (Serve's per-request
    access lines; off by default: they cost CPU on every request and hold nothing a metric does not)."""
    args = dict(args)
    replicas, cpus = int(args.pop("replicas", 1)), float(args.pop("replica_cpus", 1))
    access_log = str(args.pop("access_log", False)).lower() in ("1", "true", "yes")
    for key in ("candidates", "max_batch_size", "threads"):
        if key in args:
            args[key] = int(args[key])
    for key in ("batch_wait_ms", "watch_index_s"):
        if key in args:
            args[key] = float(args[key])
    batch = int(args.get("max_batch_size", 16))
    missing = [k for k in ("checkpoint", "index") if not args.get(k)]
    if missing:
        raise ValueError(f"the otmel service needs args {missing} (a checkpoint and an `otmel index` folder)")
    return LinkService.options(  # type: ignore[attr-defined]  # a Deployment once decorated
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=max(64, 4 * batch),
        logging_config={"enable_access_log": access_log}).bind(
        str(args.pop("checkpoint")), str(args.pop("index")), **args)


__all__ = ["ENTITY_KEYS", "LinkService", "build_app", "entity_json", "is_loopback", "read_body"]
