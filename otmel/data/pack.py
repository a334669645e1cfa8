"""`pack`: a dataset → WebDataset shards per split, KG shards and `manifest.json` (format: docs/data.md).

Images are loaded, normalised (RGB JPEG, longest side ≤ 224 px) and written one at a time, optionally in a
process pool (results in input order, so the output does not depend on the number of workers). The gold
entity's fields and image go into every mention sample, so a training stream needs no access to the KG;
the normalised images of gold entities are spooled to an anonymous temporary file, not kept in memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from otmel.data.images import (
    IMAGE_MISSING,
    IMAGE_NONE,
    IMAGE_OK,
    IMAGE_UNREADABLE,
    JPEG_QUALITY,
    MAX_SIDE,
    ImageSource,
    prepare_job,
)
from otmel.data.manifest import KG, MANIFEST, SCHEMA, SCHEMA_VERSION, write_manifest
from otmel.data.readers import SPLITS, BadRecordsError, Format, RawDataset, check_answers, read_dataset
from otmel.data.shards import ShardInfo, ShardSetWriter
from otmel.version import __version__

_OWN_FILES = re.compile(
    r"^(?:(?:train|dev|test|kg)-\d{6}\.tar|\.(?:train|dev|test|kg)-\d{6}\.tar\.tmp-\d+|\.manifest\.json\.tmp-\d+)$"
)
_MAX_LISTED_BAD = 1000


def pack(
    src: Path,
    fmt: Format,
    out: Path,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    split_seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    num_workers: int = 0,
    progress: bool = True,
    max_side: int = MAX_SIDE,
    jpeg_quality: int = JPEG_QUALITY,
) -> dict[str, Any]:
    """Read `src` in format `fmt` and write shards + manifest into `out`; return the manifest.

    Raises `BadRecordsError` (naming the ids and files) when the input has bad records, unless `skip_bad`.
    `num_workers` > 0 normalises images in that many processes. Idempotent: the same input and options give
    the same shard bytes, hashes and manifest.
    """
    ds = read_dataset(Path(src), fmt, split_seed=split_seed, split_ratios=split_ratios, load_images=False)
    return write_shards(
        ds,
        out,
        fmt=fmt,
        shard_size=shard_size,
        skip_bad=skip_bad,
        split_seed=split_seed if fmt == "melbench" else None,
        split_ratios=split_ratios if fmt == "melbench" else None,
        num_workers=num_workers,
        progress=progress,
        max_side=max_side,
        jpeg_quality=jpeg_quality,
    )


def write_shards(
    ds: RawDataset,
    out: Path,
    *,
    fmt: str = "records",
    shard_size: int = 1000,
    skip_bad: bool = False,
    split_seed: int | None = None,
    split_ratios: tuple[float, float, float] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_side: int = MAX_SIDE,
    jpeg_quality: int = JPEG_QUALITY,
) -> dict[str, Any]:
    """Write an already-read `RawDataset` as shards + manifest into `out` (see `pack`)."""
    check_answers(ds)
    if ds.bad and not skip_bad:
        raise BadRecordsError(ds.bad)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    qid_index = ds.qid_to_index()
    gold = {qid_index[m.answer] for mentions in ds.splits.values() for m in mentions}
    image_counts: dict[str, Counter] = {}
    shards: dict[str, list[ShardInfo]] = {}

    pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 0 else None
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".gold-images-") as spool:
            spooled: dict[int, tuple[int, int]] = {}
            shards[KG], image_counts[KG] = _write_kg(
                ds, out, shard_size, gold, spool, spooled, pool, progress, (max_side, jpeg_quality)
            )
            for split in SPLITS:
                shards[split], image_counts[split] = _write_split(
                    ds,
                    split,
                    out,
                    shard_size,
                    qid_index,
                    spool,
                    spooled,
                    pool,
                    progress,
                    (max_side, jpeg_quality),
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    counts = {split: len(ds.splits.get(split, [])) for split in SPLITS}
    counts[KG] = len(ds.entities)
    masked = {name: c[IMAGE_MISSING] + c[IMAGE_UNREADABLE] for name, c in image_counts.items()}
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "otmel_version": __version__,
        "source": ds.source,
        "format": fmt,
        "split_seed": split_seed,
        "split_ratios": list(split_ratios) if split_ratios is not None else None,
        "shard_size": shard_size,
        "image": {"format": "jpeg", "mode": "RGB", "max_side": max_side, "quality": jpeg_quality},
        "counts": counts,
        "shards": {name: [s.to_json() for s in infos] for name, infos in shards.items()},
        "images": {
            name: {k: c[k] for k in (IMAGE_OK, IMAGE_NONE, IMAGE_MISSING, IMAGE_UNREADABLE)}
            for name, c in image_counts.items()
        },
        "masked_images": masked,
        "skipped": {"nil": ds.stats.get("nil_skipped", 0), "bad_records": len(ds.bad)},
        "bad_records": [{"file": b.file, "id": b.id, "reason": b.reason} for b in ds.bad[:_MAX_LISTED_BAD]],
        "reader_stats": {k: int(v) for k, v in sorted(ds.stats.items())},
    }
    write_manifest(out, manifest)
    _remove_stale(out, manifest)
    return manifest


def _images(
    sources: Iterable[ImageSource], pool: Any, opts: tuple[int, int]
) -> Iterator[tuple[bytes | None, str]]:
    """Normalised images for `sources`, in order (in the pool when there is one)."""
    jobs = ((s, *opts) for s in sources)
    if pool is None:
        return map(prepare_job, jobs)
    return pool.imap(prepare_job, jobs, chunksize=16)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=f"pack {desc}",
        unit="sample",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )


def _write_kg(
    ds: RawDataset,
    out: Path,
    shard_size: int,
    gold: set[int],
    spool: IO[bytes],
    spooled: dict[int, tuple[int, int]],
    pool: Any,
    progress: bool,
    opts: tuple[int, int],
) -> tuple[list[ShardInfo], Counter]:
    counts: Counter = Counter()
    writer = ShardSetWriter(out, KG, shard_size)
    sources = (
        e.image if e.image is not None else r for e, r in zip(ds.entities, ds.entity_images, strict=True)
    )
    try:
        with _bar(len(ds.entities), KG, progress) as bar:
            images = _images(sources, pool, opts)
            for index, (entity, (jpg, status)) in enumerate(zip(ds.entities, images, strict=True)):
                counts[status] += 1
                meta = {
                    "qid": entity.qid,
                    "name": entity.name,
                    "attrs": entity.attrs,
                    "e_index": index,
                    "has_image": jpg is not None,
                }
                members = {"json": _dumps(meta)}
                if jpg is not None:
                    members["jpg"] = jpg
                    if index in gold:
                        spooled[index] = (spool.tell(), len(jpg))
                        spool.write(jpg)
                writer.write(f"{KG}-{index:09d}", members)
                bar.update()
        return writer.close(), counts
    except BaseException:
        writer.abort()
        raise


def _write_split(
    ds: RawDataset,
    split: str,
    out: Path,
    shard_size: int,
    qid_index: dict[str, int],
    spool: IO[bytes],
    spooled: dict[int, tuple[int, int]],
    pool: Any,
    progress: bool,
    opts: tuple[int, int],
) -> tuple[list[ShardInfo], Counter]:
    mentions = ds.splits.get(split, [])
    refs = ds.mention_images.get(split, [None] * len(mentions))
    counts: Counter = Counter()
    writer = ShardSetWriter(out, split, shard_size)
    sources = (m.image if m.image is not None else r for m, r in zip(mentions, refs, strict=True))
    try:
        with _bar(len(mentions), split, progress) as bar:
            images = _images(sources, pool, opts)
            for m_index, (mention, (jpg, status)) in enumerate(zip(mentions, images, strict=True)):
                counts[status] += 1
                e_index = qid_index[mention.answer]
                entity = ds.entities[e_index]
                e_jpg = _read_spool(spool, spooled.get(e_index))
                meta = {
                    "id": mention.id,
                    "mention": mention.mention,
                    "sentence": mention.sentence,
                    "answer": mention.answer,
                    "m_index": m_index,
                    "e_index": e_index,
                    "has_image": jpg is not None,
                    "entity": {
                        "qid": entity.qid,
                        "name": entity.name,
                        "attrs": entity.attrs,
                        "e_index": e_index,
                        "has_image": e_jpg is not None,
                    },
                }
                members = {"json": _dumps(meta)}
                if jpg is not None:
                    members["m.jpg"] = jpg
                if e_jpg is not None:
                    members["e.jpg"] = e_jpg
                writer.write(f"{split}-{m_index:09d}", members)
                bar.update()
        return writer.close(), counts
    except BaseException:
        writer.abort()
        raise


def _read_spool(spool: IO[bytes], where: tuple[int, int] | None) -> bytes | None:
    if where is None:
        return None
    end = spool.tell()
    spool.seek(where[0])
    data = spool.read(where[1])
    spool.seek(end)
    return data


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _remove_stale(out: Path, manifest: dict[str, Any]) -> None:
    """Delete our shard / temp files that the new manifest does not list (from an earlier, bigger pack)."""
    keep = {s["name"] for shards in manifest["shards"].values() for s in shards}
    for entry in os.scandir(out):
        if entry.is_file() and _OWN_FILES.match(entry.name) and entry.name not in keep:
            os.unlink(entry.path)
