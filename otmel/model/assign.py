"""Correlation assignment (CA), Eq. 6-12: one interface for attention (ATT) and optimal transport (OT).

Given queries X (..., n, dim) and keys/values Y (..., m, dim), with Q = X Wq, K = Y Wk (width `hidden`)
and H = Y Wv (width `dim`):

- ATT: S = Q K^T / sqrt(hidden), A = softmax_row(S) over the valid keys.
- OT:  C = (1 - cos(Q_i, K_j)) / 2, Pi* = Sinkhorn(C) with uniform marginals over the valid elements,
       A = n_valid * Pi* (each valid row sums to 1: a barycentric average like attention).

Either way G = A H (..., n, dim). Masked query rows of A are 0, so their G is 0, never NaN.

Distillation (Sec. 3.4) gives an OT module a *student*: its own Wq', Wk' (sharing Wv) whose attention
replaces the plan at inference. `mode` selects what runs:
- "teacher": the configured kind (OT or ATT);
- "student": the student attention (the KD model at inference);
- "both":    the teacher's A for G, plus the student's logits for the distillation loss (KD training).

Projections are split from the assignment so that the entity side (queries of the pairwise matcher) can
be computed once per KG and cached.

The regulariser of an OT module is a number, or learned (`LearnedReg`). Every plan an OT module computes, on the
dense path or the factored inference path, is reported to the module's plan hooks (`register_plan_hook`): that
is how probes (plan entropy, sharpness) see the plans without touching the computation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from otmel.ot import reg_number, sinkhorn
from otmel.ot_costs import cosine_cost, pairwise_dot, plan_to_assignment
from otmel.ot_factored import ScaledKernel, cosine_ot_assignment, factored_ok

Mode = Literal["teacher", "student", "both"]


@dataclass
class Assignment:
    A: torch.Tensor  # (..., n, m) row-stochastic over valid keys; 0 on masked rows/columns
    raw: torch.Tensor  # (..., n, m) the raw scores: the OT plan Pi*, or the attention logits S
    student_logits: torch.Tensor | None  # (..., n, m) student attention logits ("both" only)
    mask_x: torch.Tensor  # (..., n) bool
    mask_y: torch.Tensor  # (..., m) bool


@dataclass
class PlanRecord:
    """One batch of OT problems as a plan hook sees it (dense tensors; built only when a hook is registered).

    plan (..., n, m): the transport plans (mass 1 per non-empty problem; 0 on padding); cost (..., n, m): the
    cost C they solve; reg: the regulariser used; mask_x (..., n) / mask_y (..., m) broadcast against them;
    path: "dense" (``assign``) or "factored" (``assign_factored``)."""

    plan: torch.Tensor
    cost: torch.Tensor
    reg: float
    mask_x: torch.Tensor
    mask_y: torch.Tensor
    path: str


PlanHook = Callable[["CorrelationAssignment", PlanRecord], None]


class LearnedReg(nn.Module):
    """A learned entropic regulariser, log-parameterised and bounded:

        log reg = log reg_min + (log reg_max - log reg_min) * sigmoid(gain * theta),

    so reg stays in [reg_min, reg_max] (where Sinkhorn stays finite) for every theta, and the gradient fades at
    the bounds instead of pushing past them. theta starts where reg = `init`. `gain` scales the step Adam takes
    on log reg (see `ModelConfig.reg_gain`). theta has shape (1,): DeepSpeed cannot broadcast 0-dim parameters.
    """

    def __init__(self, init: float, lo: float, hi: float, gain: float) -> None:
        super().__init__()
        if not 0 < lo < hi or not lo <= init <= hi:
            raise ValueError(f"learned reg needs 0 < reg_min <= reg_init <= reg_max, got {lo}, {init}, {hi}")
        self.log_lo, self.log_hi, self.gain = math.log(lo), math.log(hi), gain
        frac = min(max((math.log(init) - self.log_lo) / (self.log_hi - self.log_lo), 1e-6), 1 - 1e-6)
        self.theta = nn.Parameter(torch.full((1,), math.log(frac / (1 - frac)) / gain))

    def forward(self) -> torch.Tensor:
        """reg as a 0-dim tensor (differentiable in theta)."""
        frac = torch.sigmoid(self.theta[0] * self.gain)
        return torch.exp(self.log_lo + (self.log_hi - self.log_lo) * frac)


def masked_softmax(logits: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> torch.Tensor:
    """Row softmax over valid columns; masked rows and columns are exactly 0 (no NaN when all masked).

    logits (..., n, m), mask_x (..., n), mask_y (..., m). The key mask enters as an additive (..., 1, m) bias
    (finfo.min on padding, so exp underflows to exactly 0) and the row mask as one (..., n, 1) factor: no
    broadcast (..., n, m) mask is ever built (that made the softmax 5-7x slower than a plain one). A row whose
    keys are all padded (a mention without an image) is 0.
    """
    neg = torch.finfo(logits.dtype).min
    bias = torch.zeros(mask_y.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~mask_y, neg)
    A = torch.softmax(logits + bias.unsqueeze(-2), dim=-1)  # (..., n, m)
    rows = (mask_x.unsqueeze(-1) & mask_y.any(-1, keepdim=True).unsqueeze(-1)).to(A.dtype)  # (..., n, 1)
    return A.mul_(rows) if not torch.is_grad_enabled() else A * rows  # in place when no autograd needs A


class CorrelationAssignment(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        kind: Literal["ot", "att"],
        *,
        reg: float | LearnedReg = 0.05,
        n_iters: int = 3,
        stop_thr: float | None = None,
        student: bool = False,
        detach_cost: bool = False,
    ) -> None:
        super().__init__()
        self.kind, self.n_iters, self.stop_thr = kind, n_iters, stop_thr
        # a LearnedReg is a submodule (its theta is trained); a number is a constant
        self.learned_reg: LearnedReg | None = reg if isinstance(reg, LearnedReg) and kind == "ot" else None
        self._reg = float(reg) if isinstance(reg, int | float) else 0.05
        self.plan_hooks: OrderedDict[int, PlanHook] = OrderedDict()
        self.detach_cost = detach_cost
        self.scale = 1.0 / math.sqrt(hidden)
        self.wq, self.wk, self.wv = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(dim, dim)
        self.student = student
        if student:
            self.wq_s, self.wk_s = nn.Linear(dim, hidden), nn.Linear(dim, hidden)

    # -- regulariser and plan hooks ------------------------------------------------------------------
    @property
    def reg(self) -> float:
        """The regulariser's current value as a number (for reports and static checks)."""
        return reg_number(self.learned_reg()) if self.learned_reg is not None else self._reg

    def reg_value(self) -> float | torch.Tensor:
        """The regulariser to compute with: a number, or a differentiable 0-dim tensor when learned."""
        return self.learned_reg() if self.learned_reg is not None else self._reg

    def register_plan_hook(self, hook: PlanHook) -> RemovableHandle:
        """Call ``hook(module, PlanRecord)`` for every batch of plans this (OT) module computes, on either path.
        Returns a handle whose ``remove()`` unregisters it. No hook: nothing extra is computed."""
        handle = RemovableHandle(self.plan_hooks)
        self.plan_hooks[handle.id] = hook
        return handle

    def _report(self, make: Callable[[], PlanRecord]) -> None:
        if self.plan_hooks:
            rec = make()
            for hook in list(self.plan_hooks.values()):
                hook(self, rec)

    # -- projections --------------------------------------------------------------------------------
    def queries(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-side projections of X (..., n, dim): `q` and, with a student, `q_s` (..., n, hidden)."""
        out = {"q": self.wq(x)}
        if self.student:
            out["q_s"] = self.wq_s(x)
        return out

    def keys(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Key/value-side projections of Y (..., m, dim): `k` (..., m, hidden), `h` (..., m, dim), `k_s`."""
        out = {"k": self.wk(y), "h": self.wv(y)}
        if self.student:
            out["k_s"] = self.wk_s(y)
        return out

    # -- assignment -----------------------------------------------------------------------------------
    def assign(
        self,
        qx: dict[str, torch.Tensor],
        ky: dict[str, torch.Tensor],
        mask_x: torch.Tensor,
        mask_y: torch.Tensor,
        mode: Mode = "teacher",
    ) -> Assignment:
        """The assignment matrix of projected queries to keys; leading dims broadcast."""
        if mode == "student":
            if not self.student:
                raise ValueError("mode='student' on a CA module built without a student")
            S = pairwise_dot(qx["q_s"] * self.scale, ky["k_s"])
            return Assignment(masked_softmax(S, mask_x, mask_y), S, None, mask_x, mask_y)
        if self.kind == "att":
            raw = pairwise_dot(qx["q"] * self.scale, ky["k"])
            A = masked_softmax(raw, mask_x, mask_y)
        else:
            cost = cosine_cost(qx["q"], ky["k"])  # (..., n, m) in [0, 1]
            if self.detach_cost:
                cost = cost.detach()
            reg = self.reg_value()
            raw = sinkhorn(cost, mask_x, mask_y, reg=reg, n_iters=self.n_iters, stop_thr=self.stop_thr)
            A = plan_to_assignment(raw, mask_x)
            self._report(lambda: PlanRecord(raw.detach(), cost.detach(), reg_number(reg), mask_x, mask_y, "dense"))
        student_logits = None
        if mode == "both" and self.student:
            student_logits = pairwise_dot(qx["q_s"] * self.scale, ky["k_s"])
        return Assignment(A, raw, student_logits, mask_x, mask_y)

    def assign_factored(
        self, qx: dict[str, torch.Tensor], ky: dict[str, torch.Tensor], mask_x: torch.Tensor, mask_y: torch.Tensor
    ) -> ScaledKernel | None:
        """The teacher OT assignment in factored form (inference: no plan written, see `otmel.ot_factored`);
        None where that path does not apply (attention, a convergence threshold, or reg below its safe range)."""
        if self.kind != "ot" or self.stop_thr is not None:
            return None
        reg = self.reg_value()
        if not factored_ok(reg_number(reg), qx["q"].dtype):
            return None
        A = cosine_ot_assignment(qx["q"], ky["k"], mask_x, mask_y, reg=reg, n_iters=self.n_iters)
        self._report(lambda: _factored_record(A, reg_number(reg), mask_x, mask_y))
        return A

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor, mode: Mode = "teacher"
    ) -> tuple[torch.Tensor, Assignment]:
        """G = A H: the features of Y transported to each query of X. Returns (G (..., n, dim), Assignment)."""
        ky = self.keys(y)
        a = self.assign(self.queries(x), ky, mask_x, mask_y, mode)
        return torch.matmul(a.A, ky["h"]), a


def _factored_record(A: ScaledKernel, reg: float, mask_x: torch.Tensor, mask_y: torch.Tensor) -> PlanRecord:
    """The dense plan and cost behind a factored assignment: A = n_valid * Pi and K = exp(-C / reg) (unclamped),
    so Pi = A / n_valid and C = -reg * log K."""
    dense = A.dense().detach()  # (..., n, m)
    n_valid = mask_x.sum(-1, keepdim=True).unsqueeze(-1).clamp_min(1).to(dense.dtype)  # (..., 1, 1)
    cost = -reg * A.K.detach().clamp_min(torch.finfo(A.K.dtype).tiny).log()
    return PlanRecord(dense / n_valid, cost, reg, mask_x, mask_y, "factored")
