"""Losses (Eq. 26-29): contrastive losses over in-batch negatives and the OT -> ATT distillation.

L_X = -log softmax_e( tau * S_X(m, .) )[gold]  for X in {O, F, T, V},   L = L_O + L_F + L_T + L_V
J   = L + w * L_KD

tau is the model's learned logit scale (scores are cosines). Negatives: every column of the pool except
columns holding the *same* entity as the mention's gold (two mentions of a batch may share a gold entity:
that entity is never a negative for either). L_V only counts mentions that have an image and whose gold
entity has one, and only entities with an image compete; with no such mention it is 0.

The loss never asks the cluster anything: for a global negative pool the caller passes the gathered
entity columns and the global `targets` (see `otmel.train` for the gather).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from otmel.model.assign import Assignment


def exclusion_mask(m_gold: torch.Tensor, e_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Bm, Be) True where column j holds mention i's gold entity but is not its target column."""
    same = m_gold.unsqueeze(1) == e_ids.unsqueeze(0)
    same[torch.arange(len(targets), device=targets.device), targets] = False
    return same


def contrastive_loss(
    S: torch.Tensor,  # (Bm, Be)
    targets: torch.Tensor,  # (Bm,) the gold column of each mention
    exclude: torch.Tensor,  # (Bm, Be) bool, columns removed from the softmax
    logit_scale: torch.Tensor,
    rows: torch.Tensor | None = None,  # (Bm,) bool, mentions that count
) -> torch.Tensor:
    logits = (logit_scale * S).masked_fill(exclude, torch.finfo(S.dtype).min)
    if rows is not None:
        if not bool(rows.any()):
            return S.sum() * 0.0  # keeps the graph, contributes nothing
        logits, targets = logits[rows], targets[rows]
    return F.cross_entropy(logits, targets)


def _teacher_dist(P: torch.Tensor, valid: torch.Tensor, target: str) -> torch.Tensor:
    """Row distributions of a (detached) teacher plan over the valid columns."""
    if target == "softmax":
        return torch.softmax(P.masked_fill(~valid, torch.finfo(P.dtype).min), -1) * valid
    return P / P.sum(-1, keepdim=True).clamp(min=torch.finfo(P.dtype).tiny)


def _row_divergence(P: torch.Tensor, S: torch.Tensor, valid: torch.Tensor, kind: str, target: str) -> torch.Tensor:
    """KL(p_i || softmax(S_i)) (or the squared error) averaged over the valid rows i, then over leading dims.

    Eq. 28 sums over rows; averaging instead keeps L_KD on the scale of one contrastive term whatever the
    sequence lengths: summed over ~40 tokens x 6 assignments it outweighed the ranking loss 5-10x and the
    KD / K2 variants underfit (ablation on the synthetic benchmark, docs/results.md)."""
    p = _teacher_dist(P, valid, target)
    logq = torch.log_softmax(S.masked_fill(~valid, torch.finfo(S.dtype).min), -1)
    if kind == "mse":
        per_row = ((p - logq.exp() * valid) ** 2).sum(-1)
    else:
        per_row = torch.where(valid, torch.xlogy(p, p) - p * logq, torch.zeros_like(p)).sum(-1)
    rows = valid.any(-1)  # (..., n) rows with at least one valid cell
    per = (per_row * rows).sum(-1) / rows.sum(-1).clamp(min=1)
    return per.mean()


def distillation_loss(
    pairs: list[Assignment],
    kind: Literal["kl", "mse", "kl_row"],
    target: Literal["plan", "softmax"] = "plan",
) -> torch.Tensor:
    """Eq. 28-29 summed over the given assignments: 1/2 [ KL(rows) + KL(columns) ], each averaged over its
    valid rows / columns (kl_row: rows only). Teacher plans carry no gradient."""
    total = torch.zeros(())
    for a in pairs:
        assert a.student_logits is not None
        P, S = a.raw.detach(), a.student_logits
        valid = (a.mask_x.unsqueeze(-1) & a.mask_y.unsqueeze(-2)).expand_as(S)
        row = _row_divergence(P, S, valid, kind, target)
        if kind == "kl_row":
            total = total + row
        else:
            col = _row_divergence(P.transpose(-1, -2), S.transpose(-1, -2), valid.transpose(-1, -2), kind, target)
            total = total + 0.5 * (row + col)
    return total


class OTMELLoss(nn.Module):
    def __init__(self, kd: str = "none", kd_weight: float = 1.0, kd_target: str = "plan") -> None:
        super().__init__()
        self.kd, self.kd_weight, self.kd_target = kd, kd_weight, kd_target

    def forward(
        self,
        S_O: torch.Tensor,
        S_F: torch.Tensor | None,
        S_T: torch.Tensor | None,
        S_V: torch.Tensor | None,
        V_valid: torch.Tensor | None,
        logit_scale: torch.Tensor,
        m_gold: torch.Tensor,
        e_ids: torch.Tensor,
        kd_pairs: list[Assignment] | None = None,
        targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns `loss` (J) and each term (`L_O`, `L_F`, `L_T`, `L_V`, `L_KD`) for logging."""
        if targets is None:
            targets = torch.arange(S_O.shape[0], device=S_O.device)
        scale = logit_scale.exp().clamp(max=100.0)
        exclude = exclusion_mask(m_gold, e_ids, targets)
        out: dict[str, torch.Tensor] = {"L_O": contrastive_loss(S_O, targets, exclude, scale)}
        if S_F is not None:
            out["L_F"] = contrastive_loss(S_F, targets, exclude, scale)
        if S_T is not None:
            out["L_T"] = contrastive_loss(S_T, targets, exclude, scale)
        if S_V is not None and V_valid is not None:
            rows = V_valid[torch.arange(len(targets), device=targets.device), targets]
            out["L_V"] = contrastive_loss(S_V, targets, exclude | ~V_valid, scale, rows)
        loss = sum(out.values())
        if self.kd != "none" and kd_pairs:
            out["L_KD"] = distillation_loss(kd_pairs, self.kd, self.kd_target)  # type: ignore[arg-type]
            loss = loss + self.kd_weight * out["L_KD"]
        out["loss"] = loss  # type: ignore[assignment]
        return out
