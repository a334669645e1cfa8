"""Losses (Eq. 26-29): in-batch contrastive terms, duplicate gold entities, distillation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from otmel.loss import OTMELLoss, contrastive_loss, distillation_loss, exclusion_mask
from otmel.model.assign import Assignment
from otmel.ot import sinkhorn


def test_contrastive_loss_is_cross_entropy_over_the_pool() -> None:
    torch.manual_seed(0)
    S = torch.randn(4, 4)
    scale = torch.tensor(5.0)
    none = torch.zeros(4, 4, dtype=torch.bool)
    got = contrastive_loss(S, torch.arange(4), none, scale)
    want = -torch.log_softmax(5 * S, -1).diagonal().mean()
    assert torch.allclose(got, want, atol=1e-6)


def test_shared_gold_entity_is_never_a_negative() -> None:
    """Mentions 0 and 1 share a gold entity (row 7): column 1 must not be a negative of mention 0 and
    column 0 not of mention 1; everything else competes."""
    m_gold = torch.tensor([7, 7, 3])
    ex = exclusion_mask(m_gold, e_ids=m_gold, targets=torch.arange(3))
    assert ex.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    S = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 0.5]])
    out = OTMELLoss()(S_O=S, S_F=None, S_T=None, S_V=None, V_valid=None, logit_scale=torch.tensor(0.0),
                      m_gold=m_gold, e_ids=m_gold)
    # mention 0 sees columns {0, 2} only: -log(e^0.1 / (e^0.1 + e^0))
    l0 = -torch.log_softmax(torch.tensor([0.1, 0.0]), 0)[0]
    l2 = -torch.log_softmax(S[2], 0)[2]
    assert torch.allclose(out["L_O"], (2 * l0 + l2) / 3, atol=1e-6)
    naive = F.cross_entropy(S, torch.arange(3))
    assert out["L_O"] < naive  # the duplicate no longer pushes the gold down


def test_visual_loss_skips_mentions_and_entities_without_images() -> None:
    S = torch.randn(3, 3)
    valid = torch.tensor([[True, True, False], [False, False, False], [True, True, False]])
    kw = dict(S_O=S, S_F=None, S_T=None, logit_scale=torch.tensor(0.0), m_gold=torch.arange(3), e_ids=torch.arange(3))
    out = OTMELLoss()(S_V=S, V_valid=valid, **kw)
    # only mention 0 counts (mention 1 has no image, mention 2's gold entity has none); column 2 is out
    want = -torch.log_softmax(S[0, :2], 0)[0]
    assert torch.allclose(out["L_V"], want, atol=1e-6)
    out = OTMELLoss()(S_V=S, V_valid=torch.zeros(3, 3, dtype=torch.bool), **kw)
    assert out["L_V"] == 0


def _plan_pair(student_logits: torch.Tensor | None, P: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> Assignment:
    return Assignment(A=P, raw=P, student_logits=student_logits, mask_x=mx, mask_y=my)


@pytest.mark.parametrize("kind", ["kl", "mse", "kl_row"])
def test_kd_is_zero_when_the_student_reproduces_the_teacher(kind: str) -> None:
    torch.manual_seed(0)
    mx = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    my = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    P = sinkhorn(torch.rand(2, 4, 3), mx, my, reg=0.1, n_iters=50)
    perfect = torch.log(P.clamp(min=1e-30))  # softmax over valid cells of log P == P's own row/col distribution
    zero = distillation_loss([_plan_pair(perfect, P, mx, my)], kind)  # type: ignore[arg-type]
    other = distillation_loss([_plan_pair(torch.randn(2, 4, 3), P, mx, my)], kind)  # type: ignore[arg-type]
    assert abs(zero.item()) < 1e-5
    assert other.item() > 1e-3


def test_kd_softmax_target_and_teacher_gets_no_gradient() -> None:
    mx, my = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    P = torch.rand(1, 3, 4, requires_grad=True)
    zero = distillation_loss([_plan_pair(P.detach().clone(), P, mx, my)], "kl", target="softmax")
    assert abs(zero.item()) < 1e-6
    S = torch.randn(1, 3, 4, requires_grad=True)
    distillation_loss([_plan_pair(S, P, mx, my)], "kl").backward()
    assert P.grad is None and S.grad is not None and S.grad.abs().sum() > 0


def test_kd_row_only_differs_from_bidirectional() -> None:
    torch.manual_seed(1)
    mx, my = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    P = sinkhorn(torch.rand(1, 3, 5), mx, my, reg=0.1, n_iters=20)
    pair = _plan_pair(torch.randn(1, 3, 5), P, mx, my)
    assert not torch.allclose(distillation_loss([pair], "kl"), distillation_loss([pair], "kl_row"))
