"""Ranking metrics over the whole KG: H@k, MRR, MR with pessimistic ties, and chunked ranking.

Rank convention (rank 1 is best): the rank of the gold entity is

    rank = 1 + #{j != gold : score_j >= score_gold}

so a tie counts against the gold entity (pessimistic), which makes the result independent of the
entity order and of any sort's tie-breaking.

NaN scores never help the gold entity: a NaN competitor counts as scoring >= the gold (as +inf),
and a NaN gold score counts as -inf (every other entity outranks it, rank = num_entities).

For distributed evaluation, compute ranks per worker with :func:`gold_ranks` or
:func:`rank_chunked`, gather (all-gather / concatenate) the integer ranks, then call
:func:`metrics_from_ranks` once; the metrics are means over mentions, so they are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_KS", "gold_ranks", "metrics_from_ranks", "rank_chunked", "rank_metrics"]

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)

ScoreFn = Callable[[slice, slice], Tensor]


def _count_at_least(scores: Tensor, gold_score: Tensor, gold_col: Tensor | None) -> Tensor:
    """Per row, #{j != gold_col : score_j >= gold_score or score_j is NaN}.

    ``scores`` (R, C); ``gold_score`` (R,) with NaN already mapped to -inf; ``gold_col`` (R,) column of
    the gold entity inside ``scores``, or -1 / None when the gold is not in this block.
    """
    beats = (scores >= gold_score[:, None]) | torch.isnan(scores)
    if gold_col is not None:
        rows = torch.nonzero(gold_col >= 0).squeeze(-1)
        beats[rows, gold_col[rows]] = False
    return beats.sum(-1)


def _nan_to_neg_inf(x: Tensor) -> Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def gold_ranks(scores: Tensor, gold: Tensor) -> Tensor:
    """Rank of each mention's gold entity, pessimistic ties (see the module docstring).

    Args:
        scores: (M, E) float scores, higher is better.
        gold: (M,) long, index of the gold entity of each mention.

    Returns:
        (M,) long ranks in [1, E], on the device of ``scores``.
    """
    if scores.dim() != 2 or gold.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (M, E) and gold (M,), got {tuple(scores.shape)} and {tuple(gold.shape)}")
    gold = gold.to(device=scores.device, dtype=torch.long)
    if gold.numel() and (gold.min() < 0 or gold.max() >= scores.shape[1]):
        raise ValueError("gold index out of range")
    gold_score = _nan_to_neg_inf(scores.gather(1, gold[:, None]).squeeze(1))
    return 1 + _count_at_least(scores, gold_score, gold)


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """H@k (fractions in [0, 1], not percent), MRR (in (0, 1]) and MR (mean rank, >= 1) from ranks.

    ``H@k = mean(rank <= k)``, ``MRR = mean(1 / rank)``, ``MR = mean(rank)``.

    Args:
        ranks: (M,) integer ranks, 1 = best.
        ks: cut-offs for the hits metrics.

    Returns:
        ``{"H@1": ..., "H@3": ..., ..., "MRR": ..., "MR": ...}`` as Python floats.
    """
    if ranks.numel() == 0:
        raise ValueError("no ranks: metrics of an empty evaluation are undefined")
    r = ranks.detach().reshape(-1).to(torch.float64)
    if (r < 1).any():
        raise ValueError("ranks must be >= 1")
    out = {f"H@{k}": float((r <= k).to(torch.float64).mean()) for k in ks}
    out["MRR"] = float((1.0 / r).mean())
    out["MR"] = float(r.mean())
    return out


def rank_metrics(scores: Tensor, gold: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """H@k for k in ``ks``, MRR and MR of (M, E) ``scores`` against (M,) ``gold`` indices.

    H@k are fractions in [0, 1] (multiply by 100 for the paper's percent); ties are pessimistic (see
    the module docstring).
    """
    return metrics_from_ranks(gold_ranks(scores, gold), ks)


def rank_chunked(
    score_fn: ScoreFn,
    num_mentions: int,
    num_entities: int,
    gold: Tensor,
    *,
    mention_chunk: int,
    entity_chunk: int,
) -> Tensor:
    """Gold ranks over a KG too large to score at once, never holding the (M, E) score matrix.

    For each chunk of ``mention_chunk`` mentions: first the entity chunks holding these mentions'
    gold entities are scored, giving each mention's gold score; then every entity chunk is compared
    against the gold scores, counting ``score >= gold score`` (pessimistic ties; NaN as in
    :func:`gold_ranks`). The gold chunks are kept and reused in the counting pass, so every
    (mention chunk, entity chunk) block is scored exactly once; peak memory is at most
    ``mention_chunk x min(num_entities, (#distinct gold chunks) x entity_chunk)`` scores.

    The result equals :func:`gold_ranks` on the full matrix when ``score_fn`` is deterministic.

    Args:
        score_fn: ``score_fn(m_slice, e_slice)`` -> (len(m_slice), len(e_slice)) scores of the mentions
            ``m_slice`` against the entities ``e_slice`` (contiguous ranges, step 1).
        num_mentions: M.
        num_entities: E.
        gold: (M,) long gold entity indices.
        mention_chunk: mentions per block (>= 1).
        entity_chunk: entities per block (>= 1).

    Returns:
        (M,) long ranks in [1, E], on the device of ``gold``.
    """
    if mention_chunk < 1 or entity_chunk < 1:
        raise ValueError("mention_chunk and entity_chunk must be >= 1")
    if gold.shape != (num_mentions,):
        raise ValueError(f"gold must have shape ({num_mentions},), got {tuple(gold.shape)}")
    gold = gold.to(torch.long)
    if num_mentions and (gold.min() < 0 or gold.max() >= num_entities):
        raise ValueError("gold index out of range")
    ranks = torch.empty(num_mentions, dtype=torch.long, device=gold.device)
    n_echunks = -(-num_entities // entity_chunk)

    def block(ms: slice, c: int) -> Tensor:
        es = slice(c * entity_chunk, min((c + 1) * entity_chunk, num_entities))
        s = score_fn(ms, es)
        expected = (ms.stop - ms.start, es.stop - es.start)
        if tuple(s.shape) != expected:
            raise ValueError(f"score_fn returned shape {tuple(s.shape)} for blocks of shape {expected}")
        return s

    for m0 in range(0, num_mentions, mention_chunk):
        ms = slice(m0, min(m0 + mention_chunk, num_mentions))
        g = gold[ms]
        g_chunk = torch.div(g, entity_chunk, rounding_mode="floor")
        cache: dict[int, Tensor] = {}
        gold_score: Tensor | None = None
        for c in torch.unique(g_chunk).tolist():  # pass 1: gold scores
            s = cache[c] = block(ms, c)
            if gold_score is None:
                gold_score = torch.empty(len(g), dtype=s.dtype, device=s.device)
            rows = torch.nonzero(g_chunk == c).squeeze(-1).to(s.device)
            cols = g.to(s.device)[rows] - c * entity_chunk
            gold_score[rows] = s[rows, cols]
        assert gold_score is not None
        gold_score = _nan_to_neg_inf(gold_score)
        count = torch.zeros(len(g), dtype=torch.long, device=gold_score.device)
        for c in range(n_echunks):  # pass 2: count competitors, each block scored once
            s = cache.pop(c) if c in cache else block(ms, c)
            col = torch.where(g_chunk == c, g - c * entity_chunk, -1).to(s.device)
            count += _count_at_least(s, gold_score.to(s.dtype), col)
        ranks[ms] = 1 + count.to(ranks.device)
    return ranks
