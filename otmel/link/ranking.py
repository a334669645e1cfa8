"""Ranking a KG for encoded mentions: the one implementation of both linking modes.

`Linker` (and so `otmel link`, the Python API and the service) and `otmel eval` rank through these functions
only, so what `otmel eval` measures is what the service answers.

- two-stage: `retrieve` the K best live rows per mention by the index's first stage (exact or faiss; see
  `otmel.model.first_stage`), then `rerank` those K with the full model (`OTMEL.score`); `two_stage` does both.
- exhaustive: `score_all` streams every stored row through the full model, chunk by chunk from the store;
  `exhaustive_top_k` keeps the best k.

Ties, one rule everywhere: by S_O, then by KG row (lower first). Candidates are held in ascending row order and
`stable_topk` keeps the lower column among equal scores, so an exact tie goes to the lower row in both modes
(`otmel eval`'s gold ranks are pessimistic: a gold tied with another entity counts that entity above it).

Where float noise can still reorder near-ties: a pair's score does not depend on the thread count (checked in the
tests) nor on the other candidates of its mention, but it can differ in the last bits (~1e-7 relative) with the
*batch* it was computed in: the encoder's matrix products for a batch of B mentions, and Sinkhorn's choice of its
kernel or log path, made for a whole batch of plans (`otmel.ot.sinkhorn`, method "auto"). Two entities whose scores
differ by less than that may swap between a lone `Linker.link` and a served batch; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from otmel.link.index import EntityIndex
from otmel.model import OTMEL, EntityFeatures, MentionFeatures
from otmel.model.first_stage import FirstStage, FirstStageQuery, full_scores, mention_queries, stable_topk

MODES: tuple[str, ...] = ("exhaustive", "two-stage")
_PAD = torch.iinfo(torch.long).max


@dataclass
class Candidates:
    """The retrieved rows of a batch of mentions, in ascending row order."""

    rows: torch.Tensor  # (B, K) long: KG rows, ascending; -1 (at the end) where fewer than K live rows exist
    first_stage: torch.Tensor  # (B, K) float: their first-stage scores (-inf at the padding)
    query: FirstStageQuery  # the mentions' first-stage queries (what the index was searched with)

    @property
    def valid(self) -> torch.Tensor:
        return self.rows >= 0  # (B, K) bool


def retrieve(model: OTMEL, index: EntityIndex, m: MentionFeatures, candidates: int,
             first_stage: FirstStage = "summary", search: dict[str, Any] | None = None) -> Candidates:
    """The `candidates` best live rows per mention by the index's first stage (`search`: ANN parameters)."""
    q = mention_queries(model, m, first_stage)
    cheap, rows = index.search(q, candidates, **(search or {}))  # (B, K) best first
    order = torch.where(rows < 0, _PAD, rows).sort(1).indices  # ascending rows, the padding last
    return Candidates(rows.gather(1, order), cheap.gather(1, order), q)


_FILL: dict[str, Any] = {"S_O": float("-inf"), "V_valid": False}


@torch.no_grad()
def rerank(model: OTMEL, index: EntityIndex, m: MentionFeatures, cand: Candidates) -> dict[str, torch.Tensor]:
    """Full scores (B, K) of each mention against its own candidates: {"S_O", "S_F", "S_T", "S_V", "V_valid"} (the
    terms the model has), column j = `cand.rows[:, j]`; padding columns have S_O = -inf (other terms NaN).
    The candidates' features are read from the store once per batch; each mention is scored against its own
    candidates alone (its scores do not depend on the other mentions of the batch)."""
    device = m.t.device
    valid = cand.valid
    unique = torch.unique(cand.rows[valid])  # ascending
    e = index.gather(unique).to(device)
    out: dict[str, torch.Tensor] = {}
    for i in range(len(m)):
        n = int(valid[i].sum())
        if n == 0:
            continue
        pos = torch.searchsorted(unique, cand.rows[i, :n]).to(device)
        for term, v in full_scores(model, m.select(slice(i, i + 1)), e.select(pos)).items():
            if term not in out:
                out[term] = torch.full(cand.rows.shape, _FILL.get(term, float("nan")), dtype=v.dtype)
            out[term][i, :n] = v[0].cpu()
    if not out:  # no live row for any mention
        out["S_O"] = torch.full(cand.rows.shape, float("-inf"))
    return out


def two_stage(model: OTMEL, index: EntityIndex, m: MentionFeatures, candidates: int,
              first_stage: FirstStage = "summary", search: dict[str, Any] | None = None
              ) -> tuple[Candidates, dict[str, torch.Tensor]]:
    """`retrieve` then `rerank`: the candidates and their full scores (B, K)."""
    cand = retrieve(model, index, m, candidates, first_stage, search)
    return cand, rerank(model, index, m, cand)


@torch.no_grad()
def score_all(model: OTMEL, index: EntityIndex, m: MentionFeatures, chunk: int = 4096
              ) -> Iterator[tuple[torch.Tensor, EntityFeatures, dict[str, torch.Tensor]]]:
    """(rows (C,), their features, full scores {"S_O", ...} (B, C)) for each chunk of C stored rows, in row order;
    removed rows have S_O = -inf."""
    device = m.t.device
    for s in range(0, index.rows, chunk):
        rows = torch.arange(s, min(s + chunk, index.rows))
        e = index.gather(rows).to(device)
        sc = full_scores(model, m, e)
        if len(index.dead):
            dead = torch.from_numpy(np.isin(rows.numpy(), index.dead)).to(sc["S_O"].device)
            sc["S_O"] = sc["S_O"].masked_fill(dead.unsqueeze(0), float("-inf"))
        yield rows, e, {t: v.cpu() for t, v in sc.items()}


def first_stage_chunks(index: EntityIndex, query: FirstStageQuery, chunk: int = 262_144
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows (C,), exact first-stage scores (B, C)) for each chunk of stored rows, in row order, computed as the
    exact index searches them; removed rows score -inf. For measurements over the whole KG (`otmel eval`)."""
    q = query.q.detach().float().cpu().numpy()
    base, image = query.base.float().cpu().numpy(), query.image.float().cpu().numpy()
    for j, searcher in enumerate(index.searchers):
        off, n = int(index.offsets[j]), len(searcher.vectors)
        for a in range(0, n, chunk):
            rows = torch.arange(off + a, off + min(n, a + chunk))
            sc = torch.from_numpy(searcher.exact_scores(q, base, image, slice(a, a + chunk)))
            if len(index.dead):
                sc[:, torch.from_numpy(np.isin(rows.numpy(), index.dead))] = float("-inf")
            yield rows, sc


def exhaustive_top_k(model: OTMEL, index: EntityIndex, m: MentionFeatures, k: int, chunk: int = 4096
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The k best rows (B, k) of every mention over all live rows by S_O, and their scores (B, k)."""
    best: dict[str, torch.Tensor] = {}
    for rows, _, sc in score_all(model, index, m, chunk):
        sc["row"] = rows.expand(len(m), -1)
        if best:
            sc = {t: torch.cat([best[t], sc[t]], 1) for t in sc}
        _, pos = stable_topk(sc["S_O"], k)  # best's columns (lower rows) first: ties keep the lower row
        best = {t: v.gather(1, pos) for t, v in sc.items()}
    return best.pop("row"), best


def top_k(cand: Candidates, scores: dict[str, torch.Tensor], k: int
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The k best re-ranked candidates by S_O (ties: lower row): rows (B, k), their scores and first-stage scores.
    Padding (no live row) stays at the end with row -1."""
    _, pos = stable_topk(scores["S_O"], min(k, cand.rows.shape[1]))
    return cand.rows.gather(1, pos), {t: v.gather(1, pos) for t, v in scores.items()}, cand.first_stage.gather(1, pos)


__all__ = ["MODES", "Candidates", "exhaustive_top_k", "first_stage_chunks", "rerank", "retrieve", "score_all", "top_k",
           "two_stage"]
