"""Building an entity index: encode a packed KG shard by shard (Ray actors, or this process) and stream the
features into a store segment, then build the segment's first-stage index and write the manifest.

A shard's features are the only ones in RAM at a time (per actor, plus the one being written): the KG's
features are never held whole. `workers=0` encodes in this process; the result is the same. `load_or_build`
gives a linker its index: read from a folder, or built from the KG shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from otmel.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint_model
from otmel.data.manifest import KG, read_manifest, shard_infos
from otmel.data.shards import ShardInfo, iter_shard
from otmel.io import atomic_json
from otmel.link.ann import AnnParams, build_segment_ann
from otmel.link.index import META_FILE, SCHEMA, SCHEMA_VERSION, EntityIndex, EntityIndexError, kg_fingerprint
from otmel.link.store import SegmentWriter, StoreError
from otmel.model import EntityFeatures
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import entity_vectors
from otmel.version import __version__


def _batches(samples: Iterator[dict[str, Any]], pre: Any, batch_size: int) -> Iterator[tuple[dict, list[dict]]]:
    buf: list[dict[str, torch.Tensor]] = []
    metas: list[dict] = []
    for sample in samples:
        meta = json.loads(sample["json"])
        item = pre.entity({**meta, "image": sample.get("jpg")})
        item["e_index"] = torch.tensor(meta["e_index"], dtype=torch.long)
        buf.append(item)
        metas.append(meta)
        if len(buf) == batch_size:
            yield default_collate(buf), metas
            buf, metas = [], []
    if buf:
        yield default_collate(buf), metas


@torch.no_grad()
def encode_shard(loaded: LoadedCheckpoint, pre: Any, path: Path, info: ShardInfo, batch_size: int = 64
                 ) -> dict[str, Any]:
    """Entity features of one KG shard: {"features": {name: tensor}, "vectors", "qid", "name", "input_ids"}."""
    parts, qids, names, ids = [], [], [], []
    samples = iter_shard(path, expected_samples=info.samples, expected_bytes=info.bytes)
    for batch, metas in _batches(samples, pre, batch_size):
        parts.append(loaded.model.encode_entities(batch))
        qids += [str(m["qid"]) for m in metas]
        names += [str(m.get("name", "")) for m in metas]
        ids.append(batch["e_input_ids"].to(torch.int32))
    if not parts:
        return {"features": {}, "vectors": None, "qid": [], "name": [], "input_ids": None}
    feats = EntityFeatures.cat(parts)
    return {"features": feats.tensors(), "vectors": entity_vectors(loaded.model, feats).numpy(), "qid": qids,
            "name": names, "input_ids": torch.cat(ids).numpy()}


class ShardEncoder:
    """Loads a checkpoint once and encodes KG shards (run as a Ray actor, or in-process)."""

    def __init__(self, checkpoint: str, threads: int = 1, batch_size: int = 64) -> None:
        torch.set_num_threads(max(1, threads))
        torch.set_flush_denormal(True)
        self.loaded = load_checkpoint_model(checkpoint)
        self.pre = build_preprocessor(self.loaded.config)
        self.batch_size = batch_size

    def encode(self, job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        path, info = job
        return encode_shard(self.loaded, self.pre, Path(path), ShardInfo(**info), self.batch_size)


def _run_ray(checkpoint: str, jobs: list[tuple[str, dict]], workers: int, batch_size: int,
             on_done: Callable[[dict[str, Any]], None]) -> None:
    import ray
    from ray.util import ActorPool

    from otmel.ray_runtime import start_ray

    started = start_ray(cpus=workers, env_vars={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                        dashboard=False)
    try:
        actor = ray.remote(num_cpus=1)(ShardEncoder)
        pool = ActorPool([actor.remote(checkpoint, 1, batch_size) for _ in range(min(workers, len(jobs)))])
        for res in pool.map_unordered(lambda a, job: a.encode.remote(job), jobs):
            on_done(res)  # written to the store as it arrives; only this shard's features are held
    finally:
        if started:
            ray.shutdown()


def encode_kg_segment(loaded: LoadedCheckpoint, kg: Path, folder: Path, *, workers: int, batch_size: int,
                      store_dtype: str, progress: bool, vector_dtype: str = "float32") -> dict[str, Any]:
    """Encode every entity of the packed KG `kg` into a new segment folder. Rows = the KG's e_index (0..n-1)."""
    manifest = read_manifest(kg)
    infos = shard_infos(kg, KG, manifest)
    n = sum(s.samples for s in infos)
    if not infos or n == 0:
        raise EntityIndexError(f"{kg}: the KG is empty")
    jobs = [(str((kg / s.name).resolve()), s.to_json()) for s in infos]
    writer = SegmentWriter(folder, n, store_dtype, vector_dtype)
    from tqdm import tqdm

    bar = tqdm(total=n, unit="entity", desc="otmel index", disable=not progress)

    def on_done(res: dict[str, Any]) -> None:
        if not res["qid"]:
            return
        feats = EntityFeatures(**res["features"])
        rows = feats.ids.numpy()
        if rows.min() < 0 or rows.max() >= n:
            raise EntityIndexError(f"{kg}: e_index {int(rows.max())} outside 0..{n - 1} (KG rows must be 0..n-1)")
        try:
            writer.write(rows, feats, res["vectors"], res["input_ids"], res["qid"], res["name"])
        except StoreError as exc:
            raise EntityIndexError(f"{kg}: {exc} (KG rows must be 0..{n - 1}, each once)") from exc
        bar.update(len(rows))

    try:
        if workers > 0:
            _run_ray(str(loaded.path), jobs, workers, batch_size, on_done)
        else:
            pre = build_preprocessor(loaded.config)
            for path, info in jobs:
                on_done(encode_shard(loaded, pre, Path(path), ShardInfo(**info), batch_size))
        try:
            layout = writer.close()
        except StoreError as exc:
            raise EntityIndexError(f"{kg}: {exc} (e_index gaps or duplicates)") from exc
    finally:
        bar.close()
    return {"rows": n, "layout": layout.to_json(), "with_image": int(writer.has_image.sum()),
            "kg": {"shards": str(kg.resolve()), "fingerprint": kg_fingerprint(kg), "source": manifest.get("source")}}


def finish_segment(folder: Path, params: AnnParams, templates: dict[int, Any] | None = None) -> dict[str, Any]:
    """Build a written segment's first-stage index; the manifest entry's `ann` part."""
    from otmel.link.store import Segment

    seg = Segment(folder)
    t0 = time.perf_counter()
    ann = build_segment_ann(folder, seg.vectors, seg.has_image, params, templates)
    ann["seconds"] = time.perf_counter() - t0
    return ann


def build_index(
    checkpoint: str | Path | LoadedCheckpoint,
    kg: str | Path,
    out: str | Path | None = None,
    *,
    workers: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    ann: AnnParams | None = None,
    store_dtype: str = "float32",
    vector_dtype: str = "float32",
) -> EntityIndex:
    """Encode every entity of the packed KG `kg` with `checkpoint` (one task per KG shard: Ray actors when
    `workers` > 0, this process when 0), build the first-stage index `ann` (default `auto`: exact below
    `AUTO_EXACT_BELOW` entities, HNSW up to `AUTO_HNSW_BELOW`, then IVF-PQ) and write the index folder `out`
    (replaced atomically: built under a temporary name, then renamed). `store_dtype`: the re-rank records on
    disk; `vector_dtype`: the first-stage vectors (float16 halves them; exact search then converts). Without
    `out` the index lives in a temporary folder removed when the returned object is garbage-collected."""
    t0 = time.perf_counter()
    params = ann or AnnParams("auto")
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint_model(checkpoint)
    kg = Path(kg)
    read_manifest(kg)  # a bad shard folder fails before anything is written
    if out is None:
        target = Path(tempfile.mkdtemp(prefix="otmel-index-")) / "index"
    else:
        target = Path(out)
        if target.exists() and not (target / META_FILE).exists() and any(target.iterdir()):
            raise EntityIndexError(f"{target} exists and is not an entity index: not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        seg = encode_kg_segment(loaded, kg, tmp / "seg-0000", workers=workers, batch_size=batch_size,
                                store_dtype=store_dtype, progress=progress, vector_dtype=vector_dtype)
        t_enc = time.perf_counter() - t0
        params = params.resolve(seg["rows"])
        ann_meta = finish_segment(tmp / "seg-0000", params)
        meta = new_manifest(loaded, seg, params)
        meta["segments"] = [{"dir": "seg-0000", "rows": seg["rows"], "kg": seg["kg"], "ann": ann_meta}]
        meta["build"] = {"workers": workers, "batch_size": batch_size, "seconds": time.perf_counter() - t0,
                         "encode_seconds": t_enc, "ann_seconds": ann_meta["seconds"]}
        atomic_json(tmp / META_FILE, meta, ensure_ascii=False)
        share_files(tmp)
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = EntityIndex.load(target)
    if out is None:
        index.remove_when_unused(target.parent)
    return index


def load_or_build(index: str | Path | None, kg: str | Path | None, loaded: LoadedCheckpoint, *, workers: int = 0,
                  progress: bool = False) -> EntityIndex:
    """An index for `loaded`: read from `index` (hash checked) or encoded from the KG shards `kg`."""
    if index is not None:
        return EntityIndex.load(index, loaded.sha256, loaded.path)
    if kg is None:
        raise CheckpointError("give an index (`otmel index` output) or the KG shards to encode")
    return build_index(loaded, kg, workers=workers, progress=progress)


def new_manifest(loaded: LoadedCheckpoint, seg: dict[str, Any], params: AnnParams) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "otmel_version": __version__, "generation": 1,
        "checkpoint": {"path": str(loaded.path.resolve()), "weights": loaded.weights.name, "sha256": loaded.sha256},
        "model_config": loaded.config.to_dict(),
        "kg": seg["kg"],
        "layout": seg["layout"],
        "ann": params.to_json(),
        "counts": {"entities": seg["rows"], "rows": seg["rows"], "with_image": seg["with_image"], "removed": 0},
        "tombstones": None,
        "retrieval": {"first_stage": "summary", "scores": "inner product / per-pair count, per has_image partition"},
    }


def share_files(folder: Path) -> None:
    """Index files readable like a checkpoint (some writers create 0600 files)."""
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)

