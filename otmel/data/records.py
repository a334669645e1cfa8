"""The two record types every reader produces and every packer / loader consumes."""

from __future__ import annotations

from dataclasses import dataclass


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
