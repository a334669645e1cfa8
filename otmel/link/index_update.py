"""Live KG updates of an index folder: add entities, hide (tombstone) entities, compact.

Each change takes the folder's lock (`.lock`, `fcntl.flock`: one writer at a time), writes new files only
(a new segment `seg-NNNN/` under a temporary name then renamed, a new `tombstones-GGGGGG.npy`), then switches
`index.json` atomically to the next generation. Interrupted anywhere before that switch, the folder still holds
the previous generation whole (the new files are not named by any manifest and are removed by the next
change). Readers of the old generation keep working: on POSIX a removed file stays readable while mapped.

- `add_to_index`: encode a new packed KG (new rows after the existing ones, the same checkpoint: its sha256 must
  match) into a new segment; no existing entity is re-encoded. IVF-PQ segments reuse the trained quantizer.
- `remove_from_index`: tombstone live entities by QID (searches and exhaustive ranking skip them).
- `compact_index`: rewrite the live rows into one segment (no re-encoding: the stored features are copied)
  and rebuild its ANN index; rows are renumbered, tombstones dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from otmel.checkpoints import LoadedCheckpoint, load_checkpoint_model
from otmel.io import atomic_json
from otmel.link.ann import AnnParams
from otmel.link.index import META_FILE, EntityIndex, EntityIndexError, IndexMismatchError, kg_fingerprint
from otmel.link.index_build import encode_kg_segment, finish_segment, share_files
from otmel.link.store import SegmentWriter


@contextlib.contextmanager
def index_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on an index folder for the duration of one change (EntityIndexError if another holds it)."""
    fd = os.open(path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise EntityIndexError(f"{path} is being changed by another process (lock {path / '.lock'})") from exc
        yield
    finally:
        os.close(fd)


def _next_segment_dir(path: Path, meta: dict[str, Any]) -> str:
    used = [int(s["dir"].split("-")[1]) for s in meta["segments"]]
    on_disk = [int(p.name.split("-")[1]) for p in path.glob("seg-*") if p.name.split("-")[1].isdigit()]
    return f"seg-{max(used + on_disk) + 1:04d}"


def _switch(path: Path, meta: dict[str, Any]) -> None:
    """Write the next generation's manifest atomically, then remove every file no manifest names."""
    meta = {**meta, "generation": int(meta["generation"]) + 1}
    live = sum(s["rows"] for s in meta["segments"]) - int(meta["counts"].get("removed", 0))
    meta["counts"] = {**meta["counts"], "rows": sum(s["rows"] for s in meta["segments"]), "entities": live}
    atomic_json(path / META_FILE, meta, ensure_ascii=False)
    collect_garbage(path, meta)


def collect_garbage(path: Path, meta: dict[str, Any]) -> list[str]:
    """Remove segments, tombstone files and temporaries the manifest does not name (under the lock)."""
    keep = {s["dir"] for s in meta["segments"]} | ({meta["tombstones"]} if meta.get("tombstones") else set())
    keep |= {META_FILE, ".lock"}
    removed = []
    for p in path.iterdir():
        if p.name in keep:
            continue
        if p.name.startswith(("seg-", "tombstones-", ".seg-", f".{META_FILE}.tmp-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def _open(path: str | Path, loaded: LoadedCheckpoint | None) -> tuple[Path, EntityIndex]:
    path = Path(path)
    index = EntityIndex.load(path)
    if loaded is not None:
        index.check_checkpoint(loaded.sha256, loaded.path)
    return path, index


def add_to_index(into: str | Path, kg: str | Path, checkpoint: str | Path | LoadedCheckpoint | None = None, *,
                 workers: int = 0, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Append the entities of the packed KG `kg` to the index `into` as a new segment (module docstring).
    `checkpoint`: the index's checkpoint (default: the path it records); its sha256 must match."""
    path = Path(into)
    t0 = time.perf_counter()
    index = EntityIndex.load(path)
    ck = checkpoint if checkpoint is not None else index.meta["checkpoint"]["path"]
    loaded = ck if isinstance(ck, LoadedCheckpoint) else load_checkpoint_model(ck)
    index.check_checkpoint(loaded.sha256, loaded.path)
    kg = Path(kg)
    fp = kg_fingerprint(kg)
    if any(s["kg"]["fingerprint"] == fp for s in index.meta["segments"]):
        raise EntityIndexError(f"{kg}: this KG is already in the index {path} (same fingerprint)")
    with index_lock(path):
        meta = index.meta
        name = _next_segment_dir(path, meta)
        tmp = path / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            seg = encode_kg_segment(loaded, kg, tmp, workers=workers, batch_size=batch_size,
                                    store_dtype=meta["layout"]["dtype"], progress=progress,
                                    vector_dtype=str(index.segments[0].vectors.dtype))
            if seg["layout"] != meta["layout"]:
                raise EntityIndexError(f"{kg}: features of layout {seg['layout']} do not fit the index's "
                                       f"{meta['layout']}")
            _refuse_duplicates(index, tmp)
            templates = index.searchers[0].templates() if index.params.kind == "ivfpq" else None
            ann = finish_segment(tmp, index.params, templates)
            share_files(tmp)
            tmp.rename(path / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        new = {**meta, "segments": [*meta["segments"], {"dir": name, "rows": seg["rows"], "kg": seg["kg"],
                                                          "ann": ann}]}
        new["counts"] = {**meta["counts"], "with_image": meta["counts"]["with_image"] + seg["with_image"]}
        _switch(path, new)
    return {"added": seg["rows"], "segment": name, "seconds": time.perf_counter() - t0}


def _refuse_duplicates(index: EntityIndex, seg_dir: Path) -> None:
    from otmel.link.store import Segment

    new = Segment(seg_dir).qids()
    clash = []
    for q in new:
        try:
            index.row_of(q)
            clash.append(q)
        except KeyError:
            pass
    if len(set(new)) != len(new):
        raise EntityIndexError(f"{seg_dir}: the added KG repeats QIDs")
    if clash:
        raise EntityIndexError(f"{len(clash)} added entities are already in the index (e.g. {clash[:3]}): "
                               "remove them first (`otmel index --remove QID... --into INDEX`)")


def remove_from_index(into: str | Path, qids: Sequence[str], *, missing_ok: bool = False) -> dict[str, Any]:
    """Tombstone the live entities `qids` (KeyError naming the first unknown one unless `missing_ok`)."""
    path, index = _open(into, None)
    with index_lock(path):
        rows, unknown = [], []
        for q in qids:
            try:
                rows.append(index.row_of(q))
            except KeyError:
                unknown.append(q)
        if unknown and not missing_ok:
            raise KeyError(f"not in the index {path} (or already removed): {unknown[:5]}")
        dead = np.union1d(index.dead, np.asarray(rows, dtype=np.int64)).astype(np.int64)
        meta = index.meta
        name = f"tombstones-{int(meta['generation']) + 1:06d}.npy"
        np.save(path / name, dead, allow_pickle=False)
        (path / name).chmod(0o644)
        _switch(path, {**meta, "tombstones": name, "counts": {**meta["counts"], "removed": len(dead)}})
    return {"removed": len(rows), "unknown": unknown, "tombstones": len(dead)}


def compact_index(into: str | Path, *, ann: AnnParams | None = None, chunk: int = 4096) -> dict[str, Any]:
    """Rewrite the live rows into one new segment (order kept) with a rebuilt first-stage index (`ann`: other
    ANN parameters, default the index's own); the old segments and tombstones go."""
    path, index = _open(into, None)
    t0 = time.perf_counter()
    params = (ann or index.params).resolve(len(index))
    with index_lock(path):
        meta = index.meta
        live = np.setdiff1d(np.arange(index.rows), index.dead)
        name = _next_segment_dir(path, meta)
        tmp = path / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            writer = SegmentWriter(tmp, len(live), meta["layout"]["dtype"], str(index.segments[0].vectors.dtype))
            for s in range(0, len(live), chunk):
                rows = live[s:s + chunk]
                f = index.gather(rows)
                ids = index.input_id_rows(rows)
                writer.write(np.arange(s, s + len(rows)), f, index.vectors(rows), ids,
                             [index.qid(int(r)) for r in rows], [index.name(int(r)) for r in rows])
            writer.close()
            ann_meta = finish_segment(tmp, params)
            share_files(tmp)
            tmp.rename(path / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        segs = [{"dir": name, "rows": len(live), "kg": meta["segments"][0]["kg"], "ann": ann_meta,
                 "from": [s["dir"] for s in meta["segments"]]}]
        new = {**meta, "segments": segs, "tombstones": None, "compacted": True, "ann": params.to_json(),
               "counts": {**meta["counts"], "removed": 0, "with_image": int(writer.has_image.sum())}}
        _switch(path, new)
    return {"rows": len(live), "dropped": len(index.dead), "seconds": time.perf_counter() - t0}


__all__ = ["IndexMismatchError", "add_to_index", "collect_garbage", "compact_index", "index_lock",
           "remove_from_index"]
