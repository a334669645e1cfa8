"""Plan capture (hooks on both OT paths), plan statistics, and the learned regulariser."""

from __future__ import annotations

import math

import pytest
import torch

from otmel.analysis.plans import capture_plans, ot_modules, problem_stats
from otmel.loss import OTMELLoss
from otmel.model import OTMEL
from otmel.model.assign import LearnedReg, PlanRecord
from otmel.model.matching import UnimodalMatcher
from otmel.model.testing import entity_batch, random_batch, tiny_cfg
from otmel.ot import sinkhorn

MODULES = {"fusion.v2t", "fusion.t2v", "match_t.ca", "match_v.ca"}


def _record(plan: torch.Tensor, cost: torch.Tensor, reg: float, mx: torch.Tensor, my: torch.Tensor) -> PlanRecord:
    return PlanRecord(plan, cost, reg, mx, my, "dense")


def test_problem_stats_of_known_plans() -> None:
    n, m = 3, 4
    mx, my = torch.ones(2, n, dtype=torch.bool), torch.ones(2, m, dtype=torch.bool)
    uniform = torch.full((n, m), 1.0 / (n * m))
    onehot = torch.zeros(n, m)
    onehot[0, 0] = 1.0
    cost = torch.stack([torch.zeros(n, m), torch.linspace(0, 0.6, n * m).view(n, m)])
    st = problem_stats(_record(torch.stack([uniform, onehot]), cost, 0.1, mx, my))
    assert st["entropy"][0].item() == pytest.approx(math.log(12)) and st["entropy_norm"][0].item() == pytest.approx(1)
    assert st["entropy"][1].item() == pytest.approx(0.0, abs=1e-9)
    assert st["cost_range"].tolist() == pytest.approx([0.0, 0.6]) and st["range_over_reg"][1] == pytest.approx(6.0)
    # a constant cost: attention is uniform, equal to the uniform plan's rows; the one-hot plan's rows are not
    assert st["tv_att"][0].item() == pytest.approx(0.0, abs=1e-7) and st["row_max_att"][0] == pytest.approx(0.25)
    assert st["row_max_ot"][1].item() == pytest.approx(1 / 3)  # rows 1, 2 carry no mass: only valid rows count,
    # and an empty row renormalises to 0 (its max is 0), so the mean over 3 rows is 1/3


def test_problem_stats_respects_masks() -> None:
    n, m = 3, 4
    my = torch.tensor([[True, True, False, False], [False] * 4])
    cost = torch.rand(2, n, m)
    cost[0, :, 2:] = 5.0  # padded columns must not enter the cost range
    plan = torch.full((2, n, m), 1.0 / 6)
    plan[:, :, 2:] = 0
    st = problem_stats(_record(plan, cost, 0.5, torch.ones(2, n, dtype=torch.bool), my))
    assert st["entropy"].shape == (1,) and st["entropy"][0].item() == pytest.approx(math.log(6))
    assert st["cost_range"][0].item() <= 1.0


def test_a_sinkhorn_plan_is_flatter_than_attention_of_the_same_scores() -> None:
    """The column constraint spreads mass: for costs with a shared best column, attention piles every row on it
    while the plan cannot (each column carries 1 / m)."""
    n = m = 6
    cost = 0.1 + torch.rand(1, n, m) * 0.1
    cost[..., 0] = 0.0  # every row's best column is column 0
    mx, my = torch.ones(1, n, dtype=torch.bool), torch.ones(1, m, dtype=torch.bool)
    plan = sinkhorn(cost, mx, my, reg=0.02, n_iters=200)
    st = problem_stats(_record(plan, cost, 0.02, mx, my))
    assert st["row_max_att"][0] > 0.9 and st["row_max_ot"][0] < 0.6 and st["tv_att"][0] > 0.4


@pytest.mark.parametrize("reg", [0.5, 0.01])  # 0.5: factored inference path; 0.01: below its range, dense
def test_capture_counts_the_plans_of_every_ot_module(reg: float) -> None:
    """The Fig. 3 probe must see the matcher's plans whichever path computes them (the old probe wrapped
    `assign` and missed the factored path, so its x axis changed meaning at reg = 1/30)."""
    model = OTMEL(tiny_cfg("OT", reg=reg)).eval()
    b = random_batch(6)
    with torch.no_grad(), capture_plans(model) as cap:
        m, e = model.encode_mentions(b), model.encode_entities(entity_batch(b, slice(None)))
        model.score(m, e)
    assert set(cap.stats) == MODULES == set(ot_modules(model))
    path = "factored" if reg >= 1 / 30 else "dense"
    assert dict(cap.calls["match_t.ca"]) == {path: 1} and dict(cap.calls["match_v.ca"]) == {path: 1}
    assert cap.problems("match_t.ca") == 6 * 6  # one problem per (mention, entity) pair
    # visual matching: only pairs where both sides have an image have valid cells (one mention, one entity lack one)
    assert cap.problems("match_v.ca") == 5 * 5
    # fusion: one text<->image problem per mention and per entity that has an image
    assert cap.problems("fusion.v2t") == 10 and cap.problems("fusion.t2v") == 10
    assert not any(mod.plan_hooks for mod in ot_modules(model).values())  # removed on exit


def test_factored_and_dense_paths_report_the_same_plans() -> None:
    model = OTMEL(tiny_cfg("OT", reg=0.2)).eval()
    b = random_batch(5)
    sums = []
    for factored in (True, False):
        UnimodalMatcher.factored_inference = factored
        try:
            with torch.no_grad(), capture_plans(model) as cap:
                model.score(model.encode_mentions(b), model.encode_entities(entity_batch(b, slice(None))))
        finally:
            UnimodalMatcher.factored_inference = True
        assert set(cap.calls["match_t.ca"]) == {"factored" if factored else "dense"}
        sums.append(cap.summary())
    for mod in MODULES:
        for k in ("entropy", "cost_range", "tv_att", "row_max_ot", "row_max_att"):
            assert sums[0][mod][k] == pytest.approx(sums[1][mod][k], rel=1e-4, abs=1e-5), (mod, k)


# ------------------------------------------------------------------------------------ learned regulariser


def test_learned_reg_is_bounded_and_starts_at_init() -> None:
    r = LearnedReg(0.05, 0.01, 10.0, gain=10.0)
    assert r().item() == pytest.approx(0.05, rel=1e-5) and r.theta.shape == (1,)
    for theta in (-1e4, -3.0, 0.0, 3.0, 1e4):
        with torch.no_grad():
            r.theta.fill_(theta)
        assert 0.01 * (1 - 1e-6) <= r().item() <= 10.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="reg_min"):
        LearnedReg(0.001, 0.01, 10.0, 1.0)


def test_learned_reg_variant_trains_its_regulariser() -> None:
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg("LREG"))
    thetas = {n: p for n, p in model.named_parameters() if n.endswith("learned_reg.theta")}
    assert set(thetas) == {f"{m}.learned_reg.theta" for m in MODULES}
    before = {n: m.reg for n, m in ot_modules(model).items()}
    assert all(v == pytest.approx(0.05, rel=1e-5) for v in before.values())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    b = random_batch(8, seed=1)
    for _ in range(5):
        loss = OTMELLoss()(**model(b))["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in thetas.values())
        opt.step()
    after = {n: m.reg for n, m in ot_modules(model).items()}
    assert all(after[n] != before[n] for n in after)  # every module's reg moved, each on its own
    assert len(set(after.values())) == len(after)


def test_learned_reg_inference_paths_agree_and_state_round_trips() -> None:
    model = OTMEL(tiny_cfg("LREG")).eval()
    with torch.no_grad():
        for i, mod in enumerate(ot_modules(model).values()):
            mod.learned_reg.theta.fill_(0.05 * (i + 1))  # reg somewhere inside the factored range
    b = random_batch(5)
    with torch.no_grad():
        m, e = model.encode_mentions(b), model.encode_entities(entity_batch(b, slice(None)))
        fact = model.score(m, e).S_O
        UnimodalMatcher.factored_inference = False
        try:
            dense = model.score(m, e).S_O
        finally:
            UnimodalMatcher.factored_inference = True
    assert torch.allclose(fact, dense, atol=1e-5)
    clone = OTMEL(tiny_cfg("LREG")).eval()
    clone.load_state_dict(model.state_dict())
    assert {n: m.reg for n, m in ot_modules(clone).items()} == {n: m.reg for n, m in ot_modules(model).items()}


def test_config_accepts_learned_and_rejects_bad_bounds() -> None:
    assert tiny_cfg("OT", reg="learned").reg == "learned"
    for bad in ({"reg": "learnt"}, {"reg": 0.0}, {"reg": "learned", "reg_min": 0.1, "reg_init": 0.05}):
        with pytest.raises(ValueError, match="reg"):
            tiny_cfg("OT", **bad)
    # attention modules ignore a learned reg: A1 with reg=learned has no regulariser parameter
    assert not [n for n, _ in OTMEL(tiny_cfg("A1", reg="learned")).named_parameters() if "learned_reg" in n]
