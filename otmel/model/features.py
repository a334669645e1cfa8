"""Feature bundles: what the model keeps of a batch of mentions or entities between encoding and scoring.

`EntityFeatures` holds everything that depends on the entity alone, so a KG is encoded once and reused
(evaluation, linking); bundles can be sliced, concatenated (over batches or workers) and moved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Self

import torch


@dataclass
class FeatureBundle:
    """A dataclass of tensors sharing the leading (batch) dimension; None fields are absent terms."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def map(self, fn) -> Self:  # type: ignore[no-untyped-def]
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def select(self, idx: torch.Tensor | slice) -> Self:
        return self.map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> Self:
        return self.map(lambda t: t.to(device))

    def detach(self) -> Self:
        return self.map(lambda t: t.detach())

    def __len__(self) -> int:
        return len(next(iter(self.tensors().values())))

    @classmethod
    def cat(cls, parts: list[Self]) -> Self:
        first = parts[0]
        fields = {}
        for f in dataclasses.fields(first):
            vals = [getattr(p, f.name) for p in parts]
            fields[f.name] = torch.cat(vals, 0) if isinstance(vals[0], torch.Tensor) else vals[0]
        return type(first)(**fields)


@dataclass
class EntityFeatures(FeatureBundle):
    t: torch.Tensor  # (Be, d) normalised pooled text embedding
    ids: torch.Tensor  # (Be,) long, the entities' rows in the KG (e_index)
    has_image: torch.Tensor  # (Be,) bool
    v: torch.Tensor | None = None  # (Be, d) normalised pooled image embedding (0 when no image)
    g: torch.Tensor | None = None  # (Be, 2d) normalised fusion vector
    mask_t: torch.Tensor | None = None  # (Be, Lt) bool
    q_t: torch.Tensor | None = None  # (Be, Lt, hidden) text-matching queries
    q_t_s: torch.Tensor | None = None  # (Be, Lt, hidden) student queries (KD)
    mask_v: torch.Tensor | None = None  # (Be, Lv) bool
    q_v: torch.Tensor | None = None  # (Be, Lv, hidden) visual-matching queries
    q_v_s: torch.Tensor | None = None


@dataclass
class MentionFeatures(FeatureBundle):
    t: torch.Tensor  # (Bm, d)
    has_image: torch.Tensor  # (Bm,) bool
    v: torch.Tensor | None = None  # (Bm, d)
    g: torch.Tensor | None = None  # (Bm, 2d)
    mask_t: torch.Tensor | None = None  # (Bm, Lt)
    k_t: torch.Tensor | None = None  # (Bm, Lt, hidden) text-matching keys
    h_t: torch.Tensor | None = None  # (Bm, Lt, d) text-matching values
    k_t_s: torch.Tensor | None = None
    mask_v: torch.Tensor | None = None
    k_v: torch.Tensor | None = None
    h_v: torch.Tensor | None = None
    k_v_s: torch.Tensor | None = None


@dataclass
class Scores:
    S_O: torch.Tensor  # (Bm, Be) overall score (Eq. 25), the mean of the available terms
    S_F: torch.Tensor | None = None  # fusion score
    S_T: torch.Tensor | None = None  # textual matching score
    S_V: torch.Tensor | None = None  # visual matching score (0 where V_valid is False)
    V_valid: torch.Tensor | None = None  # (Bm, Be) bool: both sides have an image


__all__ = ["EntityFeatures", "FeatureBundle", "MentionFeatures", "Scores"]
