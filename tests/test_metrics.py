"""Tests of otmel.metrics: pessimistic ranks, H@k / MRR / MR, chunked whole-KG ranking, NaN handling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otmel.metrics import DEFAULT_KS, gold_ranks, metrics_from_ranks, rank_chunked, rank_metrics


def brute_force_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Reference: python loops, pessimistic ties, NaN competitor = +inf, NaN gold = -inf."""
    out = []
    for i in range(scores.shape[0]):
        g = scores[i, gold[i]].item()
        g = -math.inf if math.isnan(g) else g
        count = 0
        for j in range(scores.shape[1]):
            s = scores[i, j].item()
            if j != gold[i] and (math.isnan(s) or s >= g):
                count += 1
        out.append(1 + count)
    return torch.tensor(out)


def test_known_small_example_by_hand() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.3, 0.2],  # gold 0: best -> rank 1
            [0.5, 0.5, 0.1, 0.0],  # gold 1: tied with entity 0 -> pessimistic rank 2
            [0.4, 0.4, 0.4, 0.4],  # gold 3: all tied -> rank 4
            [0.1, 0.7, 0.3, 0.2],  # gold 2: below entity 1 only -> rank 2
            [0.3, 0.2, 0.1, 0.0],  # gold 3: worst -> rank 4
        ]
    )
    gold = torch.tensor([0, 1, 3, 2, 3])
    ranks = gold_ranks(scores, gold)
    assert ranks.tolist() == [1, 2, 4, 2, 4]
    m = rank_metrics(scores, gold, ks=(1, 3))
    assert m["H@1"] == pytest.approx(1 / 5)
    assert m["H@3"] == pytest.approx(3 / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 2 + 1 / 4) / 5)
    assert m["MR"] == pytest.approx((1 + 2 + 4 + 2 + 4) / 5)
    assert set(m) == {"H@1", "H@3", "MRR", "MR"}


def test_tie_counts_against_gold() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    assert gold_ranks(scores, torch.tensor([0])).item() == 2
    assert gold_ranks(scores, torch.tensor([1])).item() == 2
    assert gold_ranks(scores, torch.tensor([2])).item() == 3
    # order of the entities does not matter
    assert gold_ranks(scores.flip(-1), torch.tensor([2])).item() == 2


def test_metrics_from_ranks_formulas_and_default_keys() -> None:
    ranks = torch.tensor([1, 2, 3, 5, 10, 20, 21, 100])
    m = metrics_from_ranks(ranks)
    assert list(m) == [f"H@{k}" for k in DEFAULT_KS] + ["MRR", "MR"]
    r = ranks.double()
    for k in DEFAULT_KS:
        assert m[f"H@{k}"] == pytest.approx(float((r <= k).double().mean()))
    assert m["H@1"] == pytest.approx(1 / 8) and m["H@20"] == pytest.approx(6 / 8)
    assert m["MRR"] == pytest.approx(float((1 / r).mean()))
    assert m["MR"] == pytest.approx(162 / 8)
    assert all(0.0 <= m[f"H@{k}"] <= 1.0 for k in DEFAULT_KS)


def test_metrics_from_ranks_rejects_empty_and_invalid() -> None:
    with pytest.raises(ValueError):
        metrics_from_ranks(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        metrics_from_ranks(torch.tensor([0, 1]))


def test_gold_ranks_validates_inputs() -> None:
    with pytest.raises(ValueError):
        gold_ranks(torch.rand(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError):
        gold_ranks(torch.rand(3, 4), torch.tensor([0, 1]))


def test_nan_never_helps_the_gold() -> None:
    scores = torch.tensor(
        [
            [0.9, float("nan"), 0.1],  # NaN competitor counts against gold 0 -> rank 2
            [float("nan"), 0.5, 0.1],  # NaN gold -> -inf -> rank 3
            [float("nan"), float("nan"), float("nan")],  # all NaN -> rank 3
        ]
    )
    gold = torch.tensor([0, 0, 1])
    assert gold_ranks(scores, gold).tolist() == [2, 3, 3]
    assert torch.equal(gold_ranks(scores, gold), brute_force_ranks(scores, gold))


def test_infinite_scores() -> None:
    inf = float("inf")
    scores = torch.tensor([[inf, inf, 0.0], [-inf, -inf, -inf], [inf, 1.0, 2.0]])
    gold = torch.tensor([0, 2, 0])
    assert gold_ranks(scores, gold).tolist() == [2, 3, 1]


def _scorer(scores: torch.Tensor, calls: list[tuple[slice, slice]]):  # noqa: ANN202
    def score_fn(ms: slice, es: slice) -> torch.Tensor:
        calls.append((ms, es))
        return scores[ms, es].clone()

    return score_fn


@pytest.mark.parametrize("mention_chunk,entity_chunk", [(1, 1), (3, 7), (16, 5), (100, 100), (7, 64)])
def test_chunked_equals_unchunked_with_ties(mention_chunk: int, entity_chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (37, 61), generator=g).float()  # many exact ties
    scores[3, 10] = float("nan")
    scores[5, :] = float("nan")
    gold = torch.randint(0, 61, (37,), generator=g)
    calls: list[tuple[slice, slice]] = []
    ranks = rank_chunked(_scorer(scores, calls), 37, 61, gold, mention_chunk=mention_chunk, entity_chunk=entity_chunk)
    expected = brute_force_ranks(scores, gold)
    assert torch.equal(ranks, expected)
    assert torch.equal(gold_ranks(scores, gold), expected)
    # every block is scored exactly once, and never more than one mention chunk x one entity chunk
    n_blocks = math.ceil(37 / mention_chunk) * math.ceil(61 / entity_chunk)
    assert len(calls) == n_blocks == len(set((c[0].start, c[1].start) for c in calls))
    assert all(c[0].stop - c[0].start <= mention_chunk and c[1].stop - c[1].start <= entity_chunk for c in calls)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(1, 40),
    st.integers(1, 12),
    st.integers(1, 15),
    st.integers(0, 2**31 - 1),
)
def test_property_chunked_equals_brute_force(m: int, e: int, mc: int, ec: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (m, e), generator=g).float()
    scores[torch.rand(m, e, generator=g) < 0.05] = float("nan")
    gold = torch.randint(0, e, (m,), generator=g)
    ranks = rank_chunked(_scorer(scores, []), m, e, gold, mention_chunk=mc, entity_chunk=ec)
    assert torch.equal(ranks, brute_force_ranks(scores, gold))
    assert ((ranks >= 1) & (ranks <= e)).all()


def test_chunked_random_continuous_scores_match_full_metrics() -> None:
    scores = torch.randn(50, 300)
    gold = torch.randint(0, 300, (50,))
    ranks = rank_chunked(_scorer(scores, []), 50, 300, gold, mention_chunk=8, entity_chunk=64)
    assert metrics_from_ranks(ranks) == rank_metrics(scores, gold)


def test_chunked_rejects_bad_arguments() -> None:
    scores = torch.rand(4, 5)
    fn = _scorer(scores, [])
    with pytest.raises(ValueError):
        rank_chunked(fn, 4, 5, torch.tensor([0, 1, 2, 5]), mention_chunk=2, entity_chunk=2)
    with pytest.raises(ValueError):
        rank_chunked(fn, 4, 5, torch.tensor([0, 1, 2, 3]), mention_chunk=0, entity_chunk=2)

    def wrong_shape(ms: slice, es: slice) -> torch.Tensor:
        return torch.zeros(1, 1)

    with pytest.raises(ValueError):
        rank_chunked(wrong_shape, 4, 5, torch.tensor([0, 1, 2, 3]), mention_chunk=2, entity_chunk=2)
