"""Readers: the three input formats → `EntityRecord` / `MentionRecord` (see docs/data.md).

One entry point, `read_dataset(src, fmt)`. Readers never raise on a bad record: they leave it out and list
it in `RawDataset.bad`; `pack` then fails with `BadRecordsError` unless told to skip them.

Images are lazy by default for large KGs: with `load_images=False` every record's `image` stays `None` and
`RawDataset.entity_images` / `mention_images` hold where the image is (an `ImageRef`), for `pack` to load,
normalise and write one at a time. `load_images=True` (the default, for small data) fills `image` with the
original bytes of the first readable candidate.
"""

from __future__ import annotations

from pathlib import Path

from otmel.data.formats import join_attrs, read_cleaned, read_jsonl, read_melbench
from otmel.data.images import IMAGE_OK, read_first_readable
from otmel.data.records import (
    NIL,
    SPLITS,
    BadRecord,
    BadRecordsError,
    EntityRecord,
    Format,
    MentionRecord,
    RawDataset,
)

__all__ = ["NIL", "SPLITS", "BadRecord", "BadRecordsError", "EntityRecord", "Format", "MentionRecord", "RawDataset",
           "check_answers", "join_attrs", "read_dataset"]


def read_dataset(
    src: Path,
    fmt: Format,
    *,
    split_seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    load_images: bool = True,
) -> RawDataset:
    """Read a dataset folder (cleaned, jsonl) or file (melbench) into records.

    `split_seed` / `split_ratios` only apply to `melbench`, which has no split of its own.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"dataset source {src} does not exist")
    if fmt == "cleaned":
        ds = read_cleaned(src)
    elif fmt == "melbench":
        ds = read_melbench(src, split_seed, split_ratios)
    elif fmt == "jsonl":
        ds = read_jsonl(src)
    else:
        raise ValueError(f"unknown format {fmt!r}: expected one of cleaned, melbench, jsonl")
    ds.source = str(src.resolve())
    check_answers(ds)
    _count_declared_images(ds)
    if load_images:
        _load_images(ds)
    return ds


def check_answers(ds: RawDataset) -> None:
    """Leave out (listed in `ds.bad`) the mentions whose answer is not a KG entity. Idempotent."""
    known = {e.qid for e in ds.entities}
    for split, mentions in ds.splits.items():
        keep = [i for i, m in enumerate(mentions) if m.answer in known]
        if len(keep) == len(mentions):
            continue
        for m in mentions:
            if m.answer not in known:
                file = ds.split_files.get(split, f"{split} split")
                ds.bad.append(BadRecord(file, m.id, f"unknown answer QID {m.answer!r}"))
        ds.splits[split] = [mentions[i] for i in keep]
        ds.mention_images[split] = [ds.mention_images[split][i] for i in keep]


def _count_declared_images(ds: RawDataset) -> None:
    groups = [("kg", ds.entity_images)] + [(s, refs) for s, refs in ds.mention_images.items()]
    for name, refs in groups:
        prefix = "kg" if name == "kg" else "mention"
        for ref in refs:
            if ref is None:
                ds.stats[f"{prefix}_no_image"] += 1
            elif not ref:
                ds.stats[f"{prefix}_missing_image"] += 1
    ds.stats["bad_records"] = len(ds.bad)


def _load_images(ds: RawDataset) -> None:
    """Fill `image` with the original bytes of the first readable candidate (small datasets)."""
    pairs: list[tuple[str, EntityRecord | MentionRecord, tuple[str, ...] | None]] = [
        ("kg", e, r) for e, r in zip(ds.entities, ds.entity_images, strict=True)
    ]
    for split, mentions in ds.splits.items():
        pairs += [("mention", m, r) for m, r in zip(mentions, ds.mention_images[split], strict=True)]
    for prefix, rec, ref in pairs:
        if ref:
            data, status = read_first_readable(ref)
            rec.image = data
            if status != IMAGE_OK:
                ds.stats[f"{prefix}_{status}_image"] += 1
