"""The entity index: a KG's entity features computed once by a checkpoint, on disk, searched without reading it.

Folder layout (schema `otmel-entity-index` v2):
- `index.json`, the **manifest**: schema, generation, the checkpoint (path, weight file, **sha256 of the weight
  file**), the model config, the base KG (shard folder, fingerprint = sha256 over its KG shards' sha256), the
  store layout, the ANN kind and parameters, the list of segments and the tombstone file;
- `seg-NNNN/`: immutable segments (`otmel.link.store`: memory-mapped vectors, per-entity records trimmed to
  their valid tokens, QIDs and names) with their faiss files (`otmel.link.ann`); rows of segment j follow those
  of segment j-1 (global row = offset + local row);
- `tombstones-GGGGGG.npy`: the global rows hidden by `--remove` until the next `--compact`.

Every change (build, `--add`, `--remove`, `--compact`; `otmel.link.index_update`) writes new files and then
switches `index.json` atomically (temporary name + rename), so an interrupted change leaves the previous
generation whole; files no manifest names are removed by the next change. A reader (`EntityIndex.load`) maps
the files of the generation it opened; `reopen()` gives a reader of the current one.

Loading with a checkpoint hash that differs from the recorded one raises `IndexMismatchError` naming both.
Nothing is unpickled: `.npy` with `allow_pickle=False`, raw arrays, faiss's binary format, JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmel.data.manifest import KG, shard_infos
from otmel.link.ann import AnnParams, SegmentSearcher, merge_topk, torch_query
from otmel.link.store import Segment, StoreError
from otmel.model import EntityFeatures
from otmel.model.first_stage import FirstStageQuery

SCHEMA, SCHEMA_VERSION = "otmel-entity-index", 2
META_FILE = "index.json"


class EntityIndexError(RuntimeError):
    """An index folder is missing, incomplete or of another schema."""


class IndexMismatchError(EntityIndexError):
    """The index was built by another checkpoint (or over another KG) than the one given."""


def kg_fingerprint(shard_dir: str | Path) -> str:
    """sha256 over the names and sha256 of a packed folder's KG shards, in order (identifies the KG)."""
    h = hashlib.sha256()
    for s in shard_infos(Path(shard_dir), KG):
        h.update(f"{s.name}:{s.sha256}:{s.samples}\n".encode())
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    if not (path / META_FILE).is_file():
        raise EntityIndexError(f"{path} is not an entity index (no {META_FILE}; build one with `otmel index`)")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise EntityIndexError(f"{path / META_FILE}: not valid JSON ({exc})") from exc
    if meta.get("schema") != SCHEMA or meta.get("schema_version") != SCHEMA_VERSION:
        raise EntityIndexError(f"{path}: schema {meta.get('schema')!r} v{meta.get('schema_version')!r}, expected "
                               f"{SCHEMA!r} v{SCHEMA_VERSION} (rebuild it with `otmel index`)")
    return meta


class EntityIndex:
    """An index folder opened for reading: search, gather features of rows, QIDs and names by row."""

    def __init__(self, path: Path, meta: dict[str, Any], mmap_ann: bool = False) -> None:
        self.path, self.meta, self.mmap_ann = Path(path), meta, mmap_ann
        self.params = AnnParams.from_json(meta["ann"])
        try:
            self.segments = [Segment(self.path / s["dir"]) for s in meta["segments"]]
        except StoreError as exc:
            raise EntityIndexError(str(exc)) from exc
        self.searchers = [SegmentSearcher(seg.folder, seg.vectors, seg.has_image, self.params, s.get("ann"), mmap_ann)
                          for seg, s in zip(self.segments, meta["segments"], strict=True)]
        if self.params.kind != "exact":  # vectors are then only read row by row (re-scoring): no readahead
            for seg in self.segments:
                seg.advise_random(vectors=True)
        self.offsets = np.cumsum([0] + [len(s) for s in self.segments])  # (S+1,) first global row of each
        tomb = meta.get("tombstones")
        self.dead = (np.sort(np.load(self.path / tomb, allow_pickle=False)) if tomb
                     else np.zeros(0, dtype=np.int64))
        self._rows: dict[str, int] | None = None
        self._cleanup: Any = None  # the finalizer of `remove_when_unused`

    def remove_when_unused(self, folder: Path) -> None:
        """Delete `folder` (a temporary one holding this index) once this object is garbage-collected."""
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(folder), True)

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, checkpoint_sha256: str | None = None, checkpoint: str | Path | None = None,
             *, mmap_ann: bool = False) -> EntityIndex:
        """Open an index folder; with `checkpoint_sha256`, refuse one built from other weights. `mmap_ann`: map
        the faiss files instead of reading them into RAM (an ANN index larger than RAM)."""
        path = Path(path)
        index = cls(path, read_manifest(path), mmap_ann)
        if checkpoint_sha256 is not None:
            index.check_checkpoint(checkpoint_sha256, checkpoint or "the checkpoint")
        return index

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    def reopen(self) -> EntityIndex:
        """The folder's current generation as a new reader (this one is left as it is: callers still using it
        keep a consistent view). Refuses an index of another checkpoint."""
        meta = read_manifest(self.path)
        if meta["generation"] == self.generation:
            return self
        if meta["checkpoint"]["sha256"] != self.checkpoint_sha256:
            raise IndexMismatchError(f"{self.path} now holds an index of another checkpoint "
                                     f"({meta['checkpoint']['sha256']}): load it with that checkpoint")
        return EntityIndex(self.path, meta, self.mmap_ann)

    # -- identity -----------------------------------------------------------------------------------------
    @property
    def checkpoint_sha256(self) -> str:
        return str(self.meta["checkpoint"]["sha256"])

    def check_checkpoint(self, sha256: str, checkpoint: str | Path = "the checkpoint") -> None:
        """Raise `IndexMismatchError` unless this index was built by weights with this sha256."""
        if sha256 != self.checkpoint_sha256:
            raise IndexMismatchError(
                f"index {self.path} was built from checkpoint {self.meta['checkpoint'].get('path')} (weights "
                f"sha256 {self.checkpoint_sha256}), but {checkpoint} has weights sha256 {sha256}: rebuild it with "
                f"`otmel index --checkpoint {checkpoint} --kg {self.meta.get('kg', {}).get('shards', 'KG')}`")

    def check_kg(self, shard_dir: str | Path) -> None:
        """Raise `IndexMismatchError` unless this index was built over the KG shards of `shard_dir`."""
        mine, theirs = self.meta.get("kg", {}).get("fingerprint"), kg_fingerprint(shard_dir)
        if mine != theirs:
            raise IndexMismatchError(f"index {self.path} covers KG {self.meta.get('kg', {}).get('shards')} "
                                     f"(fingerprint {mine}), not the KG of {shard_dir} (fingerprint {theirs})")

    @property
    def pristine(self) -> bool:
        """Rows are still the base KG's e_index (no add, remove or compaction since the build)."""
        return len(self.segments) == 1 and not len(self.dead) and not self.meta.get("compacted")

    # -- rows ---------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows, tombstoned ones included (global row numbers run 0..rows-1)."""
        return int(self.offsets[-1])

    def __len__(self) -> int:
        """Live entities (rows minus tombstones)."""
        return self.rows - len(self.dead)

    def _locate(self, row: int) -> tuple[Segment, int]:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} outside the index's 0..{self.rows - 1}")
        j = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.segments[j], row - int(self.offsets[j])

    def qid(self, row: int) -> str:
        seg, r = self._locate(row)
        return seg.qid(r)

    def name(self, row: int) -> str:
        seg, r = self._locate(row)
        return seg.name(r)

    def is_live(self, row: int) -> bool:
        i = int(np.searchsorted(self.dead, row))
        return not (i < len(self.dead) and self.dead[i] == row)

    @property
    def qids(self) -> list[str]:
        """Every row's QID (tombstoned rows included): builds a list, for small KGs and tools."""
        return [q for seg in self.segments for q in seg.qids()]

    @property
    def names(self) -> list[str]:
        return [seg.name(i) for seg in self.segments for i in range(len(seg))]

    def row_of(self, qid: str) -> int:
        """The live row of an entity id (KeyError naming it when absent). Builds a QID map on first use."""
        if self._rows is None:
            self._rows = {}
            for j, seg in enumerate(self.segments):
                base = int(self.offsets[j])
                for i, q in enumerate(seg.qids()):
                    if self.is_live(base + i):
                        self._rows[q] = base + i
        if qid not in self._rows:
            raise KeyError(f"entity {qid!r} is not in the index ({len(self)} entities)")
        return self._rows[qid]

    def input_ids(self, row: int) -> torch.Tensor:
        seg, r = self._locate(row)
        return torch.from_numpy(np.array(seg.input_ids[r]))

    # -- features -----------------------------------------------------------------------------------------
    def gather(self, rows: torch.Tensor | np.ndarray | list[int]) -> EntityFeatures:
        """Features of global `rows` (K,) read from the store (K contiguous reads), in that order."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if len(rows) == 0:
            raise ValueError("gather needs at least one row")
        seg_of = np.searchsorted(self.offsets, rows, side="right") - 1
        parts, order = [], []
        for j in np.unique(seg_of):
            sel = np.flatnonzero(seg_of == j)
            parts.append(self.segments[j].gather(rows[sel] - self.offsets[j], rows[sel]))
            order.append(sel)
        feats = EntityFeatures.cat(parts) if len(parts) > 1 else parts[0]
        pos = np.concatenate(order)
        if len(parts) > 1 or not np.array_equal(pos, np.arange(len(rows))):
            feats = feats.select(torch.from_numpy(np.argsort(pos)))
        return feats

    @property
    def features(self) -> EntityFeatures:
        """Every row's features in RAM (small KGs: evaluation, reports). Tombstoned rows included."""
        chunk = 8192
        return EntityFeatures.cat([self.gather(np.arange(s, min(s + chunk, self.rows)))
                                   for s in range(0, self.rows, chunk)])

    def _per_segment(self, rows: np.ndarray, get: Any, width: tuple[int, ...], dtype: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        seg_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *width), dtype)
        for j in np.unique(seg_of):
            sel = np.flatnonzero(seg_of == j)
            out[sel] = get(self.segments[j])[rows[sel] - self.offsets[j]]
        return out

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """First-stage vectors (K, D) float32 of global rows."""
        return self._per_segment(rows, lambda s: s.vectors, (self.segments[0].layout.vector_dim,), np.float32)

    def has_image(self, rows: np.ndarray) -> np.ndarray:
        return self._per_segment(rows, lambda s: s.has_image, (), bool)

    def input_id_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._per_segment(rows, lambda s: s.input_ids, (self.segments[0].layout.input_len,), np.int32)

    # -- search -------------------------------------------------------------------------------------------
    def search(self, query: FirstStageQuery, k: int, **search: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best live rows per mention by the first-stage score: (scores, rows) (Bm, k), best first, rows -1
        (scores -inf) where fewer than k live rows exist. Scores are exact for `exact` and `hnsw` (and `ivfpq`
        with refine > 1, re-scored from the vectors); IVF-PQ with refine 1 gives its PQ estimates.
        `search`: `ef_search`, `nprobe`, `refine` for this query."""
        p = self.params.with_search(**search)
        q, base, image = torch_query(query.q), torch_query(query.base), torch_query(query.image)
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_r = np.zeros((len(q), 0), np.int64)
        for j, searcher in enumerate(self.searchers):
            off = int(self.offsets[j])
            dead = self.dead[(self.dead >= off) & (self.dead < self.offsets[j + 1])] - off
            s, r = searcher.search(q, base, image, k, dead, p)
            best_s, best_r = merge_topk(best_s, best_r, s, np.where(r >= 0, r + off, -1), k)
        best_r = np.where(np.isneginf(best_s), -1, best_r)
        return torch.from_numpy(best_s), torch.from_numpy(best_r)
