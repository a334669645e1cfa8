"""The entity index: every entity-only feature of a KG computed once by a checkpoint, stored, reloaded.

Folder layout (schema `otmel-entity-index` v1):
- `entities.safetensors`: every tensor field of `EntityFeatures` (`f.t`, `f.ids`, `f.has_image`, `f.g`,
  `f.q_t`, ...), rows in KG order (row i = `e_index` i), plus `input_ids` (E, L) int32, the entity's tokens
  (name + attributes) for explanations;
- `index.json`: schema, the checkpoint (path, weight file, **sha256 of the weight file**), the model config,
  the KG (shard folder, fingerprint = sha256 over its KG shards' sha256), counts, tensor shapes, the retrieval
  set-up, and the QID and name of each row.

The folder is written under a temporary name and renamed into place. Loading with a checkpoint hash that
differs from the recorded one raises `IndexMismatchError` naming both.

Retrieval: the first-stage scores (`otmel.model.first_stage`) are products of the cached pooled vectors
(`g`, `t`, `v`); they are computed exactly with one pass of matrix products + `topk` in torch. No approximate
nearest-neighbour structure is built: the "summary" score divides by a per-pair count (2 + both-have-image),
so it is not a single inner product, and an exact pass over 50k entities costs a few ms per mention, a small
fraction of re-ranking K candidates with OT (docs/linking.md, docs/benchmarks.md).

Encoding runs as parallel Ray tasks (one actor per worker, one task per KG shard) or, with `workers=0`, in
this process; the result is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from otmel import __version__
from otmel.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint_model
from otmel.data.manifest import KG, read_manifest, shard_infos
from otmel.data.shards import ShardInfo, iter_shard
from otmel.model import EntityFeatures
from otmel.model.encoder import build_preprocessor

SCHEMA, SCHEMA_VERSION = "otmel-entity-index", 1
FEATURES_FILE, META_FILE = "entities.safetensors", "index.json"
_PREFIX = "f."


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


@dataclass
class EntityIndex:
    """A KG's cached entity features (row i = KG row i) and what each row is."""

    features: EntityFeatures
    qids: list[str]
    names: list[str]
    input_ids: torch.Tensor  # (E, L) int32 token ids of `name [SEP] attrs`
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.qids)

    @property
    def checkpoint_sha256(self) -> str:
        return str(self.meta["checkpoint"]["sha256"])

    def check_checkpoint(self, sha256: str, checkpoint: str | Path = "the checkpoint") -> None:
        """Raise `IndexMismatchError` unless this index was built by weights with this sha256."""
        if sha256 != self.checkpoint_sha256:
            raise IndexMismatchError(
                f"index {self.path or '(in memory)'} was built from checkpoint "
                f"{self.meta['checkpoint'].get('path')} (weights sha256 {self.checkpoint_sha256}), but "
                f"{checkpoint} has weights sha256 {sha256}: rebuild it with "
                f"`otmel index --checkpoint {checkpoint} --kg {self.meta.get('kg', {}).get('shards', 'KG')}`"
            )

    def check_kg(self, shard_dir: str | Path) -> None:
        """Raise `IndexMismatchError` unless this index covers the KG shards of `shard_dir`."""
        mine, theirs = self.meta.get("kg", {}).get("fingerprint"), kg_fingerprint(shard_dir)
        if mine != theirs:
            raise IndexMismatchError(f"index {self.path} covers KG {self.meta.get('kg', {}).get('shards')} "
                                     f"(fingerprint {mine}), not the KG of {shard_dir} (fingerprint {theirs})")

    def row_of(self, qid: str) -> int:
        """The KG row of an entity id (KeyError naming it when absent)."""
        if not hasattr(self, "_rows"):
            self._rows = {q: i for i, q in enumerate(self.qids)}
        if qid not in self._rows:
            raise KeyError(f"entity {qid!r} is not in the index ({len(self)} entities)")
        return self._rows[qid]

    # -- storage ----------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        """Write the index folder atomically: a temporary folder beside `out`, then renamed onto it."""
        out = Path(out)
        if out.exists() and not (out / META_FILE).exists() and any(out.iterdir()):
            raise EntityIndexError(f"{out} exists and is not an entity index: not overwriting it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            tensors = {_PREFIX + k: v.contiguous().cpu() for k, v in self.features.tensors().items()}
            tensors["input_ids"] = self.input_ids.to(torch.int32).contiguous()
            save_file(tensors, str(tmp / FEATURES_FILE), metadata={"schema": SCHEMA})
            meta = {**self.meta, "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "otmel_version": __version__,
                    "fields": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()},
                    "rows": {"qid": self.qids, "name": self.names}}
            (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))
            for f in (FEATURES_FILE, META_FILE):
                (tmp / f).chmod(0o644)  # safetensors writes 0600; an index is shared like a checkpoint
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path, checkpoint_sha256: str | None = None, checkpoint: str | Path | None = None
             ) -> EntityIndex:
        """Read an index folder; with `checkpoint_sha256`, refuse one built from other weights."""
        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / FEATURES_FILE).is_file():
            raise EntityIndexError(f"{path} is not an entity index (expected {META_FILE} and {FEATURES_FILE}; "
                                   "build one with `otmel index`)")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("schema") != SCHEMA or meta.get("schema_version") != SCHEMA_VERSION:
            raise EntityIndexError(f"{path}: schema {meta.get('schema')!r} v{meta.get('schema_version')!r}, "
                                   f"expected {SCHEMA!r} v{SCHEMA_VERSION}")
        rows = meta.pop("rows")
        tensors = load_file(str(path / FEATURES_FILE))
        feats = EntityFeatures(**{k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)})
        index = cls(feats, rows["qid"], rows["name"], tensors["input_ids"], meta, path)
        if len(feats) != len(index.qids):
            raise EntityIndexError(f"{path}: {len(feats)} feature rows but {len(index.qids)} ids (corrupt index)")
        if checkpoint_sha256 is not None:
            index.check_checkpoint(checkpoint_sha256, checkpoint or "the checkpoint")
        return index


# ---------------------------------------------------------------------------------------- encoding


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
    """Entity features of one KG shard: {"features": {name: ndarray}, "qid", "name", "input_ids"}."""
    parts, qids, names, ids = [], [], [], []
    samples = iter_shard(path, expected_samples=info.samples, expected_bytes=info.bytes)
    for batch, metas in _batches(samples, pre, batch_size):
        parts.append(loaded.model.encode_entities(batch))
        qids += [str(m["qid"]) for m in metas]
        names += [str(m.get("name", "")) for m in metas]
        ids.append(batch["e_input_ids"].to(torch.int32))
    if not parts:
        return {"features": {}, "qid": [], "name": [], "input_ids": None}
    feats = EntityFeatures.cat(parts)
    return {"features": {k: v.numpy() for k, v in feats.tensors().items()}, "qid": qids, "name": names,
            "input_ids": torch.cat(ids).numpy()}


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
             on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    import ray
    from ray.util import ActorPool

    from otmel.ray_runtime import start_ray

    started = start_ray(cpus=workers, env_vars={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                        dashboard=False)
    try:
        actor = ray.remote(num_cpus=1)(ShardEncoder)
        pool = ActorPool([actor.remote(checkpoint, 1, batch_size) for _ in range(min(workers, len(jobs)))])
        results = []
        for res in pool.map_unordered(lambda a, job: a.encode.remote(job), jobs):
            on_done(res)
            results.append(res)
        return results
    finally:
        if started:
            ray.shutdown()


def build_index(
    checkpoint: str | Path | LoadedCheckpoint,
    kg: str | Path,
    out: str | Path | None = None,
    *,
    workers: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> EntityIndex:
    """Encode every entity of the packed KG `kg` with `checkpoint` (one task per KG shard: Ray actors when
    `workers` > 0, this process when 0) and, when `out` is given, write the index folder there.
    `checkpoint` is a checkpoint (or run) directory, or an already loaded one."""
    t0 = time.perf_counter()
    # loaded here, before any Ray start, so that a bad checkpoint fails fast
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint_model(checkpoint)
    kg = Path(kg)
    manifest = read_manifest(kg)
    infos = shard_infos(kg, KG, manifest)
    if not infos or sum(s.samples for s in infos) == 0:
        raise EntityIndexError(f"{kg}: the KG is empty")
    jobs = [(str((kg / s.name).resolve()), s.to_json()) for s in infos]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="shard", desc="otmel index", disable=not progress)
    done = [0]

    def on_done(res: dict[str, Any]) -> None:
        done[0] += len(res["qid"])
        bar.set_postfix(entities=done[0])
        bar.update(1)

    try:
        if workers > 0:
            results = _run_ray(str(loaded.path), jobs, workers, batch_size, on_done)
        else:
            pre = build_preprocessor(loaded.config)
            results = []
            for path, info in jobs:
                results.append(encode_shard(loaded, pre, Path(path), ShardInfo(**info), batch_size))
                on_done(results[-1])
    finally:
        bar.close()
    index = _assemble(results, loaded, kg, manifest)
    index.meta["build"] = {"workers": workers, "batch_size": batch_size, "seconds": time.perf_counter() - t0}
    if out is not None:
        index.save(out)
    return index


def _assemble(results: list[dict[str, Any]], loaded: LoadedCheckpoint, kg: Path, manifest: dict) -> EntityIndex:
    results = [r for r in results if r["qid"]]
    keys = results[0]["features"].keys()
    feats = EntityFeatures(**{k: torch.from_numpy(np.concatenate([r["features"][k] for r in results]))
                              for k in keys})
    qids = [q for r in results for q in r["qid"]]
    names = [n for r in results for n in r["name"]]
    input_ids = torch.from_numpy(np.concatenate([r["input_ids"] for r in results]))
    order = torch.argsort(feats.ids)
    feats, input_ids = feats.select(order), input_ids[order]
    qids, names = [qids[i] for i in order.tolist()], [names[i] for i in order.tolist()]
    if not torch.equal(feats.ids, torch.arange(len(feats))):
        raise EntityIndexError(f"{kg}: KG rows are not 0..{len(feats) - 1} (e_index gaps or duplicates)")
    meta = {
        "checkpoint": {"path": str(loaded.path.resolve()), "weights": loaded.weights.name, "sha256": loaded.sha256},
        "model_config": loaded.config.to_dict(),
        "kg": {"shards": str(kg.resolve()), "fingerprint": kg_fingerprint(kg), "source": manifest.get("source")},
        "counts": {"entities": len(feats), "with_image": int(feats.has_image.sum())},
        "retrieval": {"kind": "exact", "backend": "torch", "first_stage": "summary"},
    }
    return EntityIndex(feats, qids, names, input_ids, meta)


def load_or_build(index: str | Path | None, kg: str | Path | None, loaded: LoadedCheckpoint, *, workers: int = 0,
                  progress: bool = False) -> EntityIndex:
    """An index for `loaded`: read from `index` (hash checked) or encoded from the KG shards `kg`."""
    if index is not None:
        return EntityIndex.load(index, loaded.sha256, loaded.path)
    if kg is None:
        raise CheckpointError("give an index (`otmel index` output) or the KG shards to encode")
    return build_index(loaded, kg, workers=workers, progress=progress)
