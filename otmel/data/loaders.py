"""Loaders over packed shards: the training stream, the evaluation stream and the KG stream.

All three are `webdataset` pipelines run in torch DataLoader workers (decode + `Preprocessor` there) and
yield dict batches with the keys of docs/design.md (`m_*`, `e_*`, `e_index`, `m_index`).

- `train_loader`: shards split by rank (then by DataLoader worker), resampled forever, sample-shuffled in the
  workers (and, with `mix_workers`, again after re-batching in the main process); exactly
  `steps_per_epoch` batches of `batch_size` per rank. Every random choice is seeded from
  (seed, epoch, rank, worker), so the same arguments give the same batches (a resumed run can replay an
  epoch).
- `eval_loader` / `kg_loader`: every mention / entity exactly once across ranks × workers, in shard order,
  no shuffling; ranks may get uneven counts (gather with `m_index` / `e_index`).

Rank and world size are arguments, never read from the environment. A shard whose size or sample count
disagrees with the manifest raises `ShardError` naming it. Unreadable images become masked zeros; the
returned `StreamLoader` counts them in `image_stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from otmel.data.manifest import KG, read_manifest, shard_infos
from otmel.data.shards import ShardError, ShardInfo, ShardIntegrityError, iter_shard
from otmel.data.transforms import Preprocessor

Batch = dict[str, torch.Tensor]
_STAT_KEYS = ("_missing_images", "_unreadable_images")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# -------------------------------------------------------------------------------- pipeline stages


class ShardList(IterableDataset):
    """The pipeline's source: `{"url": path}` for each shard, in manifest order (may be empty)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__()
        self.urls = list(urls)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([{"url": url} for url in self.urls])


class RankSplitter:
    """Node splitter: keeps shard `i` when `i % world_size == rank` (rank and world size are given).

    With `share_when_short`, a rank that would get no shard (fewer shards than ranks) keeps all of them
    instead: right for resampled training streams, wrong for exactly-once ones.
    """

    def __init__(self, rank: int, world_size: int, share_when_short: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size, self.share_when_short = rank, world_size, share_when_short

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        items = list(src)
        if self.share_when_short and len(items) < self.world_size:
            yield from items
            return
        yield from items[self.rank :: self.world_size]


class WorkerSplitter:
    """Worker splitter: the DataLoader worker `w` of `n` keeps shard `i` when `i % n == w`."""

    def __init__(self, share_when_short: bool = False) -> None:
        self.share_when_short = share_when_short

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        items = list(src)
        if self.share_when_short and len(items) < num_workers:
            yield from items
            return
        yield from items[worker::num_workers]


class SeededResampler:
    """Draws shards with replacement from the incoming (rank's, worker's) shards, forever, seeded."""

    def __init__(self, seed: int, epoch: int, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        items = list(src)
        if not items:
            return
        rng = random.Random(derive_seed("shards", self.seed, self.epoch, self.rank, _worker()[0]))
        while True:
            yield dict(items[rng.randrange(len(items))])


class SeededShuffle:
    """Shuffle buffer seeded from (seed, epoch, rank, where, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int, where: str) -> None:
        self.bufsize, self.seed, self.epoch, self.rank, self.where = bufsize, seed, epoch, rank, where

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rng = random.Random(derive_seed(self.where, self.seed, self.epoch, self.rank, _worker()[0]))
        buf: list[Any] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            k = rng.randrange(len(buf))
            buf[k], sample = sample, buf[k]
            yield sample
        rng.shuffle(buf)
        yield from buf


Integrity = Literal["fail", "skip", "off"]


class ShardReader:
    """Reads the samples of each incoming shard, checking its size, sha256 and sample count against the manifest
    before the first sample is yielded. `integrity`: "fail" raises `ShardError` naming the shard; "skip" (the
    training stream's option) drops a bad shard for the rest of the stream — warned once; every sample carries
    how many distinct shards its reader has dropped so far (`StreamLoader.image_stats["skipped_shards"]` sums the
    per-reader maxima, so the count survives shuffle buffers); "off" skips the hash (benchmarks only)."""

    def __init__(self, infos: dict[str, ShardInfo], integrity: Integrity = "fail") -> None:
        self.infos, self.integrity = infos, integrity
        self.bad: set[str] = set()

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        since_good = 0
        worker = _worker()[0]
        for item in src:
            url = item["url"]
            if url in self.bad:
                since_good += 1
                if since_good > 4 * len(self.infos) + 8:  # every shard this stream can reach is bad
                    raise ShardError(f"every training shard this worker reads failed its integrity check "
                                     f"(skipped: {sorted(self.bad)})")
                continue
            info = self.infos[url]
            sha = None if self.integrity == "off" else info.sha256
            try:
                for sample in iter_shard(Path(url), expected_samples=info.samples, expected_bytes=info.bytes,
                                         expected_sha256=sha):
                    extra = cast("dict[str, Any]", sample)
                    extra["__bad__"], extra["__reader__"], since_good = len(self.bad), worker, 0
                    yield sample
            except ShardIntegrityError as exc:  # size or sha256: raised before the shard's first sample
                if self.integrity != "skip":
                    raise
                self.bad.add(url)
                warnings.warn(f"{exc}; skipping this shard for the rest of the run (data.integrity=skip)",
                              stacklevel=2)



class SampleMap:
    """Raw shard sample → tensors (in the worker): `kind` is "train" (mention + gold entity), "mention" or
    "entity". Adds `m_index` / `e_index` and per-sample image counters (removed by `StreamLoader`)."""

    def __init__(self, preprocessor: Preprocessor, kind: str) -> None:
        self.pre, self.kind = preprocessor, kind

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        for sample in src:
            yield self.convert(sample)

    def convert(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        meta = json.loads(sample["json"])
        before = Counter(self.pre.image_stats)
        out: dict[str, torch.Tensor] = {}
        if self.kind == "entity":
            out.update(self.pre.entity({**meta, "image": sample.get("jpg")}))
        else:
            out.update(self.pre.mention({**meta, "image": sample.get("m.jpg")}))
            out["m_index"] = torch.tensor(meta["m_index"], dtype=torch.long)
            if self.kind == "train":
                out.update(self.pre.entity({**meta["entity"], "image": sample.get("e.jpg")}))
        out["e_index"] = torch.tensor(meta["e_index"], dtype=torch.long)
        after = self.pre.image_stats
        out["_bad_shards"] = torch.tensor(int(sample.get("__bad__", 0)), dtype=torch.long)
        out["_reader"] = torch.tensor(int(sample.get("__reader__", 0)), dtype=torch.long)
        out["_missing_images"] = torch.tensor(after["missing"] - before["missing"], dtype=torch.long)
        out["_unreadable_images"] = torch.tensor(after["unreadable"] - before["unreadable"], dtype=torch.long)
        return out


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Stack a list of per-sample tensor dicts into a batch (in a DataLoader worker, straight into shared
    memory, which saves a copy when the batch is sent to the main process)."""
    return default_collate(samples)


def unbatch(src: Iterable[Batch]) -> Iterator[dict[str, torch.Tensor]]:
    """Batches back into per-sample dicts."""
    for batch in src:
        n = len(next(iter(batch.values())))
        for i in range(n):
            yield {k: v[i] for k, v in batch.items()}


# ----------------------------------------------------------------------------------------- loaders


class StreamLoader:
    """An iterable of batches over a `wds.WebLoader`; counts masked images in `image_stats`.

    `len()` is the number of batches one iteration yields on this rank.
    """

    def __init__(self, loader: Iterable[Batch], num_batches: int, num_samples: int) -> None:
        self.loader, self.num_batches, self.num_samples = loader, num_batches, num_samples
        self.image_stats: Counter = Counter()
        self._bad: dict[int, int] = {}  # reader (DataLoader worker) -> distinct shards it dropped

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            for key in _STAT_KEYS:
                self.image_stats[key.strip("_")] += int(batch.pop(key).sum())
            bad, reader = batch.pop("_bad_shards"), batch.pop("_reader")
            for r, b in zip(reader.tolist(), bad.tolist(), strict=True):
                self._bad[r] = max(self._bad.get(r, 0), b)
            self.image_stats["skipped_shards"] = sum(self._bad.values())
            yield batch


def _infos(shard_dir: Path, split: str) -> list[ShardInfo]:
    manifest = read_manifest(Path(shard_dir))
    return shard_infos(Path(shard_dir), split, manifest)


def _pipeline(
    infos: list[ShardInfo], shard_dir: Path, split: list[Callable], after: list[Callable],
    integrity: Integrity = "fail",
) -> wds.DataPipeline:
    """shard list → `split` stages (rank / worker / resampling) → checked tar reading → `after` stages."""
    urls = [str(Path(shard_dir) / s.name) for s in infos]
    reader = ShardReader(dict(zip(urls, infos, strict=True)), integrity)
    return wds.DataPipeline(ShardList(urls), *split, reader, *after)


def _web_loader(dataset: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
    return wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )


def train_loader(
    shard_dir: Path,
    preprocessor: Preprocessor,
    *,
    batch_size: int,
    steps_per_epoch: int,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    mix_workers: bool = False,
    integrity: Integrity = "fail",
) -> StreamLoader:
    """The training stream of rank `rank`: `steps_per_epoch` batches of `batch_size` mention + gold-entity
    samples. Deterministic in (seed, epoch, rank, world_size, num_workers, batch_size, shuffle_buffer).

    Each worker shuffles its own shard stream (buffer of `shuffle_buffer` raw samples) and yields full
    batches; the main process counts `steps_per_epoch` of them, so every rank runs the same number of
    steps. `mix_workers=True` also unbatches, shuffles and re-batches in the main process (WebDataset's
    `.unbatched().shuffle().batched().with_epoch()`), so a batch mixes samples of several workers; it costs
    one more copy of every batch in the main process (see docs/data.md).
    """
    infos = [s for s in _infos(shard_dir, "train") if s.samples > 0]
    if not infos:
        raise ValueError(f"{shard_dir}: the train split is empty")
    if batch_size < 1 or steps_per_epoch < 1:
        raise ValueError("batch_size and steps_per_epoch must be >= 1")
    mix = mix_workers and num_workers > 1
    worker_batch = min(batch_size, 64) if mix else batch_size
    dataset = _pipeline(
        infos,
        shard_dir,
        [
            RankSplitter(rank, world_size, share_when_short=True),
            WorkerSplitter(share_when_short=True),
            SeededResampler(seed, epoch, rank),
        ],
        [
            SeededShuffle(max(1, shuffle_buffer), seed, epoch, rank, "worker"),
            SampleMap(preprocessor, "train"),
            wds.batched(worker_batch, collation_fn=collate, partial=False),
        ],
        integrity,
    )
    loader = _web_loader(dataset, num_workers)
    if mix:
        # the main-process buffer holds decoded tensors (~1.2 MB a sample at 224 px): one batch at most
        main_buffer = max(1, min(shuffle_buffer, batch_size))
        loader = (
            loader.compose(unbatch)
            .compose(SeededShuffle(main_buffer, seed, epoch, rank, "main"))
            .compose(wds.batched(batch_size, collation_fn=collate, partial=False))
        )
    loader = loader.with_epoch(steps_per_epoch)
    return StreamLoader(loader, steps_per_epoch, steps_per_epoch * batch_size)


def _exactly_once(
    shard_dir: Path,
    split: str,
    preprocessor: Preprocessor,
    kind: str,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> StreamLoader:
    infos = _infos(shard_dir, split)
    dataset = _pipeline(
        infos,
        shard_dir,
        [RankSplitter(rank, world_size), WorkerSplitter()],
        [SampleMap(preprocessor, kind), wds.batched(batch_size, collation_fn=collate, partial=True)],
    )
    mine = infos[rank::world_size]
    per_worker = [sum(s.samples for s in mine[w :: max(1, num_workers)]) for w in range(max(1, num_workers))]
    num_batches = sum(math.ceil(n / batch_size) for n in per_worker)
    return StreamLoader(_web_loader(dataset, num_workers), num_batches, sum(per_worker))


def eval_loader(
    shard_dir: Path,
    split: str,
    preprocessor: Preprocessor,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> StreamLoader:
    """Mentions of `split` ("dev", "test", or "train"), each exactly once across ranks × workers, with
    `m_index` (position in the split) and `e_index` (gold row); `m_*` keys only. No shuffling."""
    return _exactly_once(shard_dir, split, preprocessor, "mention", batch_size, rank, world_size, num_workers)


def kg_loader(
    shard_dir: Path,
    preprocessor: Preprocessor,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> StreamLoader:
    """KG entities, each exactly once across ranks × workers, with `e_index` and the `e_*` keys."""
    return _exactly_once(shard_dir, KG, preprocessor, "entity", batch_size, rank, world_size, num_workers)
