"""First-stage retrieval over an index segment: exact (torch, over the memory-mapped vectors) or faiss ANN.

Every first stage is an inner product divided by a per-pair count that depends only on whether the entity has
an image (`otmel.model.first_stage`, `S = <q, x_e> / (base + image * has_image_e)`). So each segment keeps one
inner-product index per `has_image` partition; a query searches both, divides each partition's scores by its
count and merges — the exact first-stage ranking when the index is exact.

Kinds (`AnnParams.kind`):
- ``exact``: a chunked matrix product over `vectors.npy` (mapped) + top-k; no extra file.
- ``hnsw``: `faiss.IndexHNSWFlat` (M, efConstruction at build; efSearch at query time).
- ``ivfpq``: `faiss.IndexIVFPQ` (nlist lists, m sub-quantizers of `bits` bits; trained on a sample of at most
  `train_size` vectors; nprobe at query time). Segments added later reuse the first segment's trained quantizer.
  A partition with fewer than 39 x nlist vectors gets ~4 sqrt(n) lists; one under 1,000 vectors an exact
  `IndexFlatIP`.

HNSW (`IndexHNSWFlat` keeps the full vectors) returns exact scores of approximate neighbours; IVF-PQ scores are
approximate: with `refine` > 1 a query fetches `refine` x K neighbours and keeps the K best by their exact score
(recomputed from `vectors.npy`), as `faiss.IndexRefine` does; with `refine` 1 its scores are the PQ estimates.
Files are faiss's own binary
format (`faiss.read_index`; no pickle), read into RAM (the ANN is what a linker keeps resident: HNSW searches
were 2-4x slower from a mapped file, docs/benchmarks.md) or, with `mmap_ann=True`, mapped (`IO_FLAG_MMAP_IFC`)
for an index larger than RAM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ANN_KINDS = ("exact", "hnsw", "ivfpq")
# `auto` (the default of `otmel index`): exact below AUTO_EXACT_BELOW entities (its scan then costs about what the
# re-rank of K = 128 does: ~12 ms per mention at 250k, 49 ms at 1M), HNSW below AUTO_HNSW_BELOW (fastest, but it
# keeps the vectors: ~1.25 GB in RAM per million), IVF-PQ above (100 MB per million). Figures: bench/index.py,
# docs/linking.md "Choosing exact, HNSW or IVF-PQ".
AUTO_EXACT_BELOW = 250_000
AUTO_HNSW_BELOW = 2_000_000
SEARCH_KEYS = ("ef_search", "nprobe", "refine")


class AnnError(RuntimeError):
    """faiss missing, bad ANN parameters, or an ANN file that does not match its segment."""


@dataclass
class AnnParams:
    """Build and search parameters (search ones can be overridden per query: `with_search`)."""

    kind: str = "exact"
    hnsw_m: int = 32  # HNSW graph degree (memory ~ 4 * 2M bytes per vector on top of the vectors)
    ef_construction: int = 40  # HNSW build beam (faiss's default)
    ef_search: int = 128  # HNSW query beam: recall vs latency
    nlist: int = 0  # IVF lists; 0 = about 4 sqrt(n), at most n / 39
    nprobe: int = 32  # IVF lists visited per query
    pq_m: int = 0  # PQ sub-quantizers (bytes per vector at 8 bits); 0 = D / 4; must divide D
    pq_bits: int = 8
    train_size: int = 200_000  # IVF-PQ training sample
    refine: int = 1  # fetch refine * K by the ANN, keep K by the exact score
    threads: int = 0  # faiss OpenMP threads (0 = faiss's default)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in (*ANN_KINDS, "auto"):
            raise AnnError(f"unknown ANN kind {self.kind!r}; choose one of {list(ANN_KINDS)}")
        for k in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "pq_bits", "train_size", "refine"):
            if int(getattr(self, k)) < 1:
                raise AnnError(f"ANN parameter {k} must be >= 1, got {getattr(self, k)}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnnParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known)

    def resolve(self, n: int) -> AnnParams:
        """`auto` made concrete for a KG of n entities (exact below AUTO_EXACT_BELOW)."""
        if self.kind != "auto":
            return self
        kind = "exact" if n < AUTO_EXACT_BELOW else "hnsw" if n < AUTO_HNSW_BELOW else "ivfpq"
        return replace(self, kind=kind)

    def with_search(self, **overrides: Any) -> AnnParams:
        bad = [k for k, v in overrides.items() if v is not None and k not in SEARCH_KEYS]
        if bad:
            raise AnnError(f"{bad} are build parameters; at query time only {list(SEARCH_KEYS)} can change")
        changes: dict[str, Any] = {k: int(v) for k, v in overrides.items() if v is not None}
        return replace(self, **changes)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise AnnError("the ANN index needs faiss (pip install faiss-cpu)") from exc
    return faiss


def _auto_nlist(n: int) -> int:
    return int(max(1, min(4 * math.sqrt(max(n, 1)), n // 39)))


IVFPQ_MIN_VECTORS = 1000  # a partition with fewer vectors gets a flat (exact) index instead


def ivfpq_shape(n: int, D: int, p: AnnParams) -> tuple[int, int, int]:
    """(lists, PQ sub-quantizers, bits per code) of the IVF-PQ index of `n` vectors of width `D` under `p` (also what
    `otmel plan` sizes the index by)."""
    nlist = p.nlist or _auto_nlist(n)
    if n < 39 * nlist:  # a small partition (e.g. the entities without an image): fewer lists
        nlist = _auto_nlist(n)
    m = p.pq_m or max(1, D // 4)
    if D % m:
        raise AnnError(f"pq_m = {m} does not divide the vector dimension {D}")
    bits = min(p.pq_bits, max(1, int(math.log2(max(2, n // 39)))))  # faiss wants >= 39 * 2^bits points
    return nlist, m, bits


def _build_one(x: np.ndarray, rows: np.ndarray, p: AnnParams, template: Any | None, chunk: int = 65_536) -> Any:
    """An index over `x[rows]` (x mapped: read chunk by chunk, never copied whole)."""
    faiss = _faiss()
    n, D = len(rows), x.shape[1]
    if p.kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p.ef_construction
    elif template is not None:
        index = faiss.clone_index(template)
        index.reset()
    elif n < IVFPQ_MIN_VECTORS:
        index = faiss.IndexFlatIP(D)  # too few vectors to train IVF-PQ on (a small partition): exact, and tiny
    else:
        nlist, m, bits = ivfpq_shape(n, D, p)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        take = np.sort(rng.choice(rows, size=min(n, p.train_size), replace=False))
        index.train(np.ascontiguousarray(x[take], dtype=np.float32))
    for s in range(0, n, chunk):
        r = rows[s:s + chunk]
        block = x[r[0]:r[-1] + 1]  # one contiguous read, then the partition's rows of it
        index.add(np.ascontiguousarray(block[r - r[0]], dtype=np.float32))
    return index


def _ann_name(kind: str, part: int) -> str:
    return f"ann-{kind}-p{part}.faiss"


def build_segment_ann(folder: Path, vectors: np.ndarray, has_image: np.ndarray, p: AnnParams,
                      templates: dict[int, Any] | None = None) -> dict[str, Any]:
    """Build and write the ANN files of a segment (nothing for `exact`). `templates`: trained IVF-PQ indexes per
    partition to reuse (segments added to an index). Returns what the manifest records."""
    if p.kind == "exact":
        return {}
    faiss = _faiss()
    if p.threads:
        faiss.omp_set_num_threads(p.threads)
    files = {}
    for part in (0, 1):
        rows = np.flatnonzero(has_image == bool(part))
        np.save(folder / f"ann-p{part}-rows.npy", rows.astype(np.int64), allow_pickle=False)
        if len(rows) == 0:
            continue
        index = _build_one(vectors, rows, p, (templates or {}).get(part))
        faiss.write_index(index, str(folder / _ann_name(p.kind, part)))
        files[str(part)] = _ann_name(p.kind, part)
    return {"kind": p.kind, "files": files}


class SegmentSearcher:
    """First-stage top-k over one segment (`vectors` mapped; faiss indexes opened mapped where faiss can)."""

    def __init__(self, folder: Path, vectors: np.ndarray, has_image: np.ndarray, p: AnnParams,
                 ann: dict[str, Any] | None, mmap_ann: bool = False) -> None:
        self.folder, self.vectors, self.has_image, self.params = folder, vectors, has_image, p
        self.parts: dict[int, tuple[Any, np.ndarray]] = {}
        if p.kind != "exact":
            faiss = _faiss()
            for part in (0, 1):
                rows = np.load(folder / f"ann-p{part}-rows.npy", allow_pickle=False)
                name = (ann or {}).get("files", {}).get(str(part))
                if len(rows) and name is None:
                    raise AnnError(f"{folder}: no {p.kind} file for partition {part} ({len(rows)} rows)")
                if name is not None:
                    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", 512) if mmap_ann else 0
                    index = faiss.read_index(str(folder / name), flag)
                    if index.ntotal != len(rows):
                        raise AnnError(f"{folder / name}: {index.ntotal} vectors for {len(rows)} rows (corrupt)")
                    self.parts[part] = (index, rows)

    def templates(self) -> dict[int, Any]:
        return {part: ix for part, (ix, _) in self.parts.items()}

    def exact_scores(self, q: np.ndarray, base: np.ndarray, image: np.ndarray, rows: np.ndarray | slice
                     ) -> np.ndarray:
        """Exact first-stage scores of `rows` of this segment for the queries (Bm, n)."""
        x, has = self.vectors[rows], self.has_image[rows]
        num = q @ np.asarray(x, dtype=np.float32).T  # (Bm, n)
        return num / (base[:, None] + image[:, None] * has[None, :].astype(np.float32))

    def search(self, q: np.ndarray, base: np.ndarray, image: np.ndarray, k: int, dead: np.ndarray,
               p: AnnParams | None = None, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
        """(scores, local rows) (Bm, k'), best first, k' = min(k, live rows); `dead` sorted local tombstones."""
        p = p or self.params
        n = len(self.vectors)
        if p.kind == "exact":
            best_s = np.full((len(q), 0), -np.inf, np.float32)
            best_r = np.zeros((len(q), 0), np.int64)
            for s in range(0, n, chunk):
                sc = self.exact_scores(q, base, image, slice(s, min(n, s + chunk)))
                if len(dead):
                    d = dead[(dead >= s) & (dead < s + chunk)] - s
                    sc[:, d] = -np.inf
                best_s, best_r = merge_topk(best_s, best_r, sc, np.arange(s, s + sc.shape[1])[None, :], k)
            return _drop_dead(best_s, best_r)
        return self._ann_search(q, base, image, k, dead, p)

    def _ann_search(self, q: np.ndarray, base: np.ndarray, image: np.ndarray, k: int, dead: np.ndarray,
                    p: AnnParams) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if p.threads:
            faiss.omp_set_num_threads(p.threads)
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_r = np.zeros((len(q), 0), np.int64)
        fetch = k * p.refine
        for index, rows in self.parts.values():
            if isinstance(index, faiss.IndexFlat):
                params = faiss.SearchParameters()
            elif p.kind == "hnsw":
                params = faiss.SearchParametersHNSW()
                params.efSearch = max(p.ef_search, fetch)
            else:
                params = faiss.SearchParametersIVF()
                params.nprobe = p.nprobe
            dead_p = np.flatnonzero(np.isin(rows, dead)) if len(dead) else np.zeros(0, np.int64)
            if len(dead_p):
                sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead_p.astype(np.int64)))
                params.sel = sel
            sims, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), min(fetch, index.ntotal),
                                     params=params)
            local = np.where(ids >= 0, rows[np.clip(ids, 0, None)], -1)  # (Bm, fetch) segment rows, -1 = none
            if p.kind == "ivfpq" and p.refine > 1 and not isinstance(index, faiss.IndexFlat):
                exact = np.full(local.shape, -np.inf, np.float32)
                for i in range(len(q)):  # refine: exact scores of the fetched rows, the best K kept below
                    ok = local[i] >= 0
                    if ok.any():
                        exact[i, ok] = self.exact_scores(q[i:i + 1], base[i:i + 1], image[i:i + 1], local[i, ok])[0]
            else:  # the index's own inner products (exact for HNSW-Flat and Flat), divided by the pair count
                has = self.has_image[np.clip(local, 0, None)].astype(np.float32)
                exact = np.where(local >= 0, sims / (base[:, None] + image[:, None] * has), -np.inf)
            best_s, best_r = merge_topk(best_s, best_r, exact, local, k)
        return _drop_dead(best_s, best_r)


def merge_topk(s1: np.ndarray, r1: np.ndarray, s2: np.ndarray, r2: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of two (Bm, *) candidate lists, best first; equal scores: lower row first (every entry
    tied with the k-th is considered, so the result does not depend on the order candidates came in)."""
    r2 = np.broadcast_to(r2, s2.shape)
    s, r = np.concatenate([s1, s2], 1), np.concatenate([r1, r2], 1)
    s = np.where((r < 0) | np.isnan(s), -np.inf, s)  # (np.nan_to_num would turn -inf into a finite float)
    kk = min(k, s.shape[1])
    out_s, out_r = np.empty((len(s), kk), np.float32), np.empty((len(s), kk), np.int64)
    kth = (torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).topk(kk, dim=1).values[:, -1].numpy()
           if s.shape[1] > kk else None)  # the k-th best per row (one vectorised top-k)
    for i in range(len(s)):
        si, ri = s[i], r[i]
        if kth is not None:
            keep = np.flatnonzero(si >= kth[i])
            si, ri = si[keep], ri[keep]
        order = np.lexsort((ri, -si))[:kk]
        out_s[i], out_r[i] = si[order], ri[order]
    return out_s, out_r


def _drop_dead(s: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scored -inf (tombstones, missing) are marked -1."""
    return s, np.where(np.isneginf(s), -1, r)


def torch_query(q: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(q.detach().float().cpu().numpy())
