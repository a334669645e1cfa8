"""Scoring mentions against a cached KG: the full model, the cheap first-stage score, and re-ranking.

Exhaustive linking scores every entity with `OTMEL.score` (pairwise OT for every mention x entity pair).
Two-stage linking ranks the KG by a *first-stage* score computed from cached vectors only (matrix products,
no correlation assignment), keeps the top K candidates and re-ranks them with `OTMEL.score` (both modes are
implemented once, over an entity index, in `otmel.link.ranking`; this module holds the scores they use).

First-stage scores (all L2-normalised vectors of `MentionFeatures` / `EntityFeatures`):
- ``"summary"`` (default): the model's own score with each unimodal CA term replaced by an entity-independent
  mention summary. In S_T = (cos(pool(A H_m), t_e) + <t_m, t_e>) / 2 the mention representation correlated to
  the entity is approximated by the one a *uniform* assignment gives, u_m = pool(mean_valid(H_m)) (computed
  with the matcher's own pooling, so LayerNorm included): S_T ~ <(norm(u_m) + t_m) / 2, t_e>; S_V likewise
  with patches. S_F is exact. Then S ~ (S_F + S_T~ + valid * S_V~) / (2 + valid), as `OTMEL.score` averages.
- ``"cls"``: the CA terms replaced by the pooled-embedding cosines (S_T ~ <t_m, t_e>, S_V ~ <v_m, v_e>).
- ``"fusion"``: S_F alone.
For a model without unimodal matching (M2) every first stage is exact; for the CLS-only baseline the model's
score itself is cheap and is used.

As one inner product (for a nearest-neighbour index): every first stage is
``S(m, e) = <q_m, x_e> / (base_m + image_m * has_image_e)`` with one entity vector ``x_e = [g_e | t_e | v_e]``
(the parts the model has; ``v_e = 0`` without an image) for every kind, and a per-mention query ``q_m``, ``base_m``
(the count of always-present terms) and ``image_m`` (1 when the image term applies). Within the entities that have
an image (or those that do not) the denominator is a per-mention constant, so an inner-product index per
``has_image`` partition, merged after dividing, gives exactly `first_stage_scores` (`entity_vectors`,
`mention_queries`, `scores_from_vectors`).

Ties: candidates and top-k lists are ordered by score, then by KG row (a stable sort), so results do not
depend on the order in which chunks were scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from otmel.model import OTMEL, EntityFeatures, MentionFeatures
from otmel.model.matching import UnimodalMatcher

FirstStage = Literal["summary", "cls", "fusion"]
FIRST_STAGES: tuple[str, ...] = ("summary", "cls", "fusion")
SCORE_TERMS: tuple[str, ...] = ("S_O", "S_F", "S_T", "S_V")


def _uniform_summary(matcher: UnimodalMatcher, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """norm(pool(A H)) for the uniform assignment A over the valid mention elements: (Bm, d)."""
    w = mask.to(h.dtype)
    A = (w / w.sum(-1, keepdim=True).clamp(min=1.0)).unsqueeze(1)  # (Bm, 1, Lm): one query row
    one = torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)
    return F.normalize(matcher.pool.from_assignment(A, h, one), dim=-1)


def _query(matcher: UnimodalMatcher, h: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The mention vector whose inner product with an entity's pooled embedding stands for S_T (or S_V)."""
    return (_uniform_summary(matcher, h, mask) + x) / 2 if kind == "summary" else x


@torch.no_grad()
def first_stage_scores(
    model: OTMEL, m: MentionFeatures, e: EntityFeatures, kind: FirstStage = "summary"
) -> torch.Tensor:
    """Cheap scores (Bm, Be) of every mention against every entity (a few matrix products)."""
    if kind not in FIRST_STAGES:
        raise ValueError(f"unknown first-stage score {kind!r}; known: {list(FIRST_STAGES)}")
    cfg = model.cfg
    if cfg.cls_only:
        return model.score(m, e).S_O
    valid = (m.has_image.unsqueeze(1) & e.has_image.unsqueeze(0)).to(m.t.dtype) if cfg.use_images else None
    total: torch.Tensor | float = 0.0
    count: torch.Tensor | float = 0.0
    if cfg.use_fusion:
        assert m.g is not None and e.g is not None  # use_fusion: both sides carry the fusion vector g
        total, count = total + m.g @ e.g.t(), count + 1
    if cfg.use_matching and kind != "fusion":
        assert m.h_t is not None and m.mask_t is not None  # set by OTMEL.encode_mentions under use_matching
        total, count = total + _query(model.match_t, m.h_t, m.mask_t, m.t, kind) @ e.t.t(), count + 1
        if cfg.use_images:
            assert valid is not None
            # use_images: OTMEL.encode_mentions / encode_entities set these
            assert m.h_v is not None and m.mask_v is not None and m.v is not None and e.v is not None
            q_v = _query(model.match_v, m.h_v, m.mask_v, m.v, kind)
            total, count = total + (q_v @ e.v.t()) * valid, count + valid
    if isinstance(total, float):  # fusion-only first stage of a model without fusion: fall back to "cls"
        return first_stage_scores(model, m, e, "cls")
    return total / count


@dataclass
class FirstStageQuery:
    """`S(m, e) = <q, x_e> / (base + image * has_image_e)` for each mention of a batch."""

    q: torch.Tensor  # (Bm, D) query vectors, D = entity_vectors(...).shape[1]
    base: torch.Tensor  # (Bm,) float: terms present for every entity
    image: torch.Tensor  # (Bm,) float: 1 where the visual term counts for entities that have an image

    def __len__(self) -> int:
        return len(self.q)

    def select(self, idx: torch.Tensor | slice) -> FirstStageQuery:
        return FirstStageQuery(self.q[idx], self.base[idx], self.image[idx])


def _vector_parts(model: OTMEL) -> tuple[str, ...]:
    """Which pooled vectors make up an entity's first-stage vector, in order."""
    cfg = model.cfg
    if cfg.cls_only:
        return ("t", "v") if cfg.use_images else ("t",)
    parts: tuple[str, ...] = ("g",) if cfg.use_fusion else ()
    if cfg.use_matching:
        parts += ("t", "v") if cfg.use_images else ("t",)
    return parts


@torch.no_grad()
def entity_vectors(model: OTMEL, e: EntityFeatures) -> torch.Tensor:
    """x_e = [g | t | v] (the parts the model scores with): (Be, D) float32, one per entity, for every kind."""
    return torch.cat([getattr(e, p).float() for p in _vector_parts(model)], dim=1)


@torch.no_grad()
def mention_queries(model: OTMEL, m: MentionFeatures, kind: FirstStage = "summary") -> FirstStageQuery:
    """The query side of `first_stage_scores(model, m, ., kind)` as an inner product (module docstring)."""
    if kind not in FIRST_STAGES:
        raise ValueError(f"unknown first-stage score {kind!r}; known: {list(FIRST_STAGES)}")
    cfg, parts = model.cfg, _vector_parts(model)
    has = m.has_image.float() if cfg.use_images else torch.zeros(len(m), device=m.t.device)
    if not cfg.cls_only and kind == "fusion" and not cfg.use_fusion:
        kind = "cls"  # as first_stage_scores: fusion-only first stage of a model without fusion
    pieces, base = [], torch.zeros(len(m), device=m.t.device)
    for p in parts:
        if p == "g":
            assert m.g is not None
            pieces.append(m.g.float())
            base = base + 1
        elif kind == "fusion" and not cfg.cls_only:
            pieces.append(torch.zeros_like(getattr(m, p)).float())
        elif p == "t":
            assert m.h_t is not None or cfg.cls_only
            q = m.t if cfg.cls_only else _query(model.match_t, m.h_t, m.mask_t, m.t, kind)  # type: ignore[arg-type]
            pieces.append(q.float())
            base = base + 1
        else:  # "v": zero for a mention without an image (the term is then not counted)
            assert m.v is not None
            q = m.v if cfg.cls_only else _query(model.match_v, m.h_v, m.mask_v, m.v, kind)  # type: ignore[arg-type]
            pieces.append(q.float() * has.unsqueeze(1))
    image = has if ("v" in parts and (cfg.cls_only or kind != "fusion")) else torch.zeros_like(has)
    return FirstStageQuery(torch.cat(pieces, dim=1), base, image)


def scores_from_vectors(query: FirstStageQuery, x: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
    """First-stage scores (Bm, Be) from the query side and entity vectors x (Be, D) with their has_image (Be,)."""
    num = query.q @ x.t()  # (Bm, Be)
    return num / (query.base.unsqueeze(1) + query.image.unsqueeze(1) * has_image.float().unsqueeze(0))


@torch.no_grad()
def full_scores(model: OTMEL, m: MentionFeatures, e: EntityFeatures) -> dict[str, torch.Tensor]:
    """`OTMEL.score` of every mention against every entity: {"S_O", "S_F", "S_T", "S_V", "V_valid"} (Bm, Be)
    (absent terms left out). The model chunks the pairwise matcher over entities (`match_chunk`)."""
    s = model.score(m, e)
    out = {k: getattr(s, k) for k in SCORE_TERMS if getattr(s, k) is not None}
    if s.V_valid is not None:
        out["V_valid"] = s.V_valid
    return out


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k best columns per row, best first; equal scores: lower column first.

    NaN scores rank last."""
    k = min(k, scores.shape[-1])
    clean = torch.nan_to_num(scores, nan=float("-inf"))
    if clean.dim() != 2:
        raise ValueError(f"scores must be (rows, columns), got shape {tuple(scores.shape)}")
    if 4 * k >= clean.shape[-1]:
        idx = torch.sort(clean, dim=-1, descending=True, stable=True).indices[:, :k]
        return scores.gather(-1, idx), idx
    # partial selection (topk is O(E)); every column tied with the k-th value is kept, in column order, so the
    # stable sort below decides ties by column whatever topk picked
    kth = clean.topk(k, dim=-1).values[:, -1]  # (R,)
    out = []
    for r in range(clean.shape[0]):
        keep = (clean[r] >= kth[r]).nonzero().squeeze(1)  # ascending columns
        out.append(keep[torch.sort(clean[r, keep], descending=True, stable=True).indices[:k]])
    idx = torch.stack(out)
    return scores.gather(-1, idx), idx
