"""The tiered string-match baseline: each tier, pessimistic ties, and the indexed / blocked paths against a
brute-force reference over all pairs."""

from __future__ import annotations

import random

import pytest
import torch

from otmel.data.baselines import (
    StringMatcher,
    normalise,
    string_match_metrics,
    string_match_ranks,
    tokens,
)
from otmel.data.records import EntityRecord, MentionRecord
from otmel.metrics import gold_ranks


def _kg(names: list[str]) -> list[EntityRecord]:
    return [EntityRecord(f"Q{i + 1}", n, "") for i, n in enumerate(names)]


def _mentions(surfaces: list[str], answers: list[str] | None = None) -> list[MentionRecord]:
    answers = answers or ["Q1"] * len(surfaces)
    pairs = zip(surfaces, answers, strict=True)
    return [MentionRecord(f"m{i}", s, f"about {s}", a) for i, (s, a) in enumerate(pairs)]


def _reference(surface: str, name: str) -> float:
    """Brute-force score of one pair, written straight from the tier table."""
    if normalise(surface) == normalise(name):
        return 3.0
    a, b = tokens(surface), tokens(name)
    if a and b:
        short, long_ = (a, b) if len(a) <= len(b) else (b, a)
        if long_[: len(short)] == short or long_[-len(short):] == short:
            return 2.0
        sa, sb = set(a), set(b)
        if sa & sb:
            return float(torch.tensor(len(sa & sb) / len(sa | sb), dtype=torch.float32)) * 0.99
    return 0.0


NAMES = ["Barack Obama", "Michelle Obama", "Obama Foundation Center", "New York City", "York",
         "Tim Berners-Lee"]
SURFACES = ["Barack  OBAMA", "Obama", "New York City Marathon", "City of New York", "Berners-Lee", "Lutetia"]


def test_each_tier_on_a_hand_made_kg() -> None:
    s = StringMatcher(_kg(NAMES)).scores(_mentions(SURFACES))
    assert s.shape == (6, 6) and s.dtype == torch.float32
    exp = torch.zeros(6, 6)
    exp[0, 0] = 3.0  # exact after case folding and whitespace normalisation
    exp[0, 1] = 0.99 / 3  # {barack, obama} vs {michelle, obama}: overlap only
    exp[0, 2] = 0.99 / 4
    exp[1, :3] = 2.0  # "obama" is a suffix of two names and a prefix of the third
    exp[2, 3] = 2.0  # the name is a prefix of the mention
    exp[2, 4] = 0.99 / 4  # "york" sits inside the mention: overlap only
    exp[3, 3] = 0.99 * 3 / 4  # same tokens but not in prefix/suffix order
    exp[3, 4] = 2.0  # the name is a suffix of the mention
    exp[4, 5] = 2.0  # "berners-lee" tokenises to a suffix of "tim berners lee"
    assert torch.allclose(s, exp, atol=1e-6), s
    # row 5 ("Lutetia") shares nothing: tier 0 everywhere


def test_tiers_never_overlap() -> None:
    rng = random.Random(1)
    vocab = ["al", "bo", "cy", "di", "ed", "fu"]
    names = [" ".join(rng.choices(vocab, k=rng.randint(1, 4))) for _ in range(60)]
    s = StringMatcher(_kg(names)).scores(_mentions(names[:30]))
    vals = set(s.unique().tolist())
    assert {0.0, 2.0, 3.0} <= vals
    tier1 = s[(s > 0) & (s < 2)]
    assert tier1.numel() > 0 and float(tier1.max()) <= 0.99 + 1e-6


def test_pessimistic_ties_count_against_gold() -> None:
    kg = _kg(["Paris", "Paris", "Paris Hilton", "Lyon"])
    ms = _mentions(["paris", "paris", "Marseille"], answers=["Q1", "Q2", "Q4"])
    ranks = string_match_ranks(ms, kg)
    # both homonyms score 3: each is beaten by the other under pessimistic ties
    assert ranks.tolist() == [2, 2, 4]  # all-zero row: the gold is last
    s = StringMatcher(kg).scores(ms)
    assert s[0].tolist() == [3.0, 3.0, 2.0, 0.0]


def test_metrics_of_the_matcher() -> None:
    kg = _kg(["Paris", "Paris", "Lyon", "Nice"])
    ms = _mentions(["paris", "Lyon", "Nice", "Nice town"], answers=["Q1", "Q3", "Q4", "Q4"])
    m = string_match_metrics(ms, kg)  # ranks 2, 1, 1, 1
    assert m["H@1"] == pytest.approx(0.75) and m["H@3"] == 1.0
    assert m["MRR"] == pytest.approx((0.5 + 3) / 4) and m["MR"] == pytest.approx(1.25)


def _random_dataset(seed: int, n_ent: int, n_men: int) -> tuple[list[EntityRecord], list[MentionRecord]]:
    rng = random.Random(seed)
    vocab = ["Ka", "Lo", "mi", "NU", "pe", "Ro", "su", "ti"]
    names = [" ".join(rng.choices(vocab, k=rng.randint(1, 3))) for _ in range(n_ent)]
    kg = _kg(names)
    ms = []
    for i in range(n_men):
        gold = rng.randrange(n_ent)
        toks = names[gold].split()
        surface = rng.choice([names[gold], names[gold].lower(), toks[-1], " ".join(rng.choices(vocab, k=2)),
                              names[gold] + " " + rng.choice(vocab), "zz-top"])
        ms.append(MentionRecord(f"m{i}", surface, "", kg[gold].qid))
    return kg, ms


@pytest.mark.parametrize("seed", [0, 1])
def test_indexed_scores_equal_brute_force(seed: int) -> None:
    kg, ms = _random_dataset(seed, 40, 50)
    s = StringMatcher(kg).scores(ms)
    ref = torch.tensor([[_reference(m.mention, e.name) for e in kg] for m in ms])
    assert torch.allclose(s, ref, atol=1e-6)


def test_blocked_ranks_equal_dense_path() -> None:
    kg, ms = _random_dataset(3, 120, 200)
    dense = StringMatcher(kg).scores(ms)
    gold = torch.tensor([int(m.answer[1:]) - 1 for m in ms])
    expected = gold_ranks(dense, gold)
    assert torch.equal(string_match_ranks(ms, kg, block=7), expected)
    assert torch.equal(string_match_ranks(ms, kg, gold=gold.tolist(), block=64), expected)
    blocks = [s for _, s in StringMatcher(kg).iter_scores(ms, block=33)]
    assert torch.equal(torch.cat(blocks), dense)
    assert expected.min() >= 1 and expected.max() <= len(kg)


def test_unknown_answer_is_an_error() -> None:
    with pytest.raises(KeyError):
        string_match_ranks(_mentions(["x"], answers=["Q999"]), _kg(["x"]))
