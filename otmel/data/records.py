"""The record types every reader produces and every packer / loader consumes, and a dataset as read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from otmel.data.images import ImageRef


@dataclass
class EntityRecord:
    """One knowledge-graph entity."""

    qid: str  # KG id (a Wikidata QID or the user's own id); unique within a KG
    name: str  # the entity's name
    attrs: str  # attributes joined with ". " ("" when the KG has none)
    image: bytes | None = None  # encoded image bytes (RGB JPEG after packing); None = no image


@dataclass
class MentionRecord:
    """One mention to link: a surface form in a sentence, optionally with an image."""

    id: str  # unique within the dataset
    mention: str  # surface form
    sentence: str  # context sentence
    answer: str  # QID of the gold entity (readers skip "nil" mentions)
    image: bytes | None = None  # encoded image bytes; None = no image


Format = Literal["cleaned", "melbench", "jsonl"]
SPLITS = ("train", "dev", "test")
NIL = "nil"


@dataclass(frozen=True)
class BadRecord:
    """A record left out by a reader: the file it is in, its id (or position) and why."""

    file: str
    id: str
    reason: str


class BadRecordsError(ValueError):
    """Raised (by `pack`, or `RawDataset.raise_if_bad`) when the input holds bad records."""

    def __init__(self, bad: list[BadRecord], limit: int = 100) -> None:
        self.bad, self.limit = list(bad), limit
        by_file: dict[str, list[BadRecord]] = {}
        for rec in self.bad:
            by_file.setdefault(rec.file, []).append(rec)
        parts = []
        for file, recs in by_file.items():
            shown = ", ".join(f"{r.id!r} ({r.reason})" for r in recs[:limit])
            more = f", ... and {len(recs) - limit} more" if len(recs) > limit else ""
            parts.append(f"{file}: {len(recs)} bad record(s): {shown}{more}")
        super().__init__(
            f"{len(self.bad)} bad record(s) (fix them, or pass --skip-bad / skip_bad=True to skip and count "
            "them):\n  " + "\n  ".join(parts)
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (a Ray worker's error reaches the driver whole)
        return type(self), (self.bad, self.limit)


@dataclass
class RawDataset:
    """A dataset as read: the KG's entities in row order (`e_index` = position) and the mention splits."""

    entities: list[EntityRecord]
    splits: dict[str, list[MentionRecord]]
    stats: Counter = field(default_factory=Counter)
    source: str = ""
    bad: list[BadRecord] = field(default_factory=list)
    entity_images: list[ImageRef] = field(default_factory=list)
    mention_images: dict[str, list[ImageRef]] = field(default_factory=dict)
    split_files: dict[str, str] = field(default_factory=dict)  # split -> the file it was read from

    def __post_init__(self) -> None:
        if not self.entity_images:
            self.entity_images = [None] * len(self.entities)
        for split, mentions in self.splits.items():
            self.mention_images.setdefault(split, [None] * len(mentions))

    def qid_to_index(self) -> dict[str, int]:
        """QID → row index (`e_index`)."""
        return {e.qid: i for i, e in enumerate(self.entities)}

    def raise_if_bad(self) -> None:
        """Raise `BadRecordsError` when any record was left out as bad."""
        if self.bad:
            raise BadRecordsError(self.bad)
