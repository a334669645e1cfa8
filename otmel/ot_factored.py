"""The OT assignment of a cosine cost in factored form: the inference path of the pairwise matcher.

At a fixed budget of ``n_iters`` iterations the kernel path of :func:`otmel.ot.sinkhorn` returns the plan

.. math::

    \\Pi = \\mathrm{diag}(u)\\, K\\, \\mathrm{diag}(v), \\qquad
    K_{ij} = \\exp(-C_{ij} / \\mathrm{reg}), \\qquad
    C_{ij} = (1 - \\cos(x_i, y_j)) / 2,

and the correlation assignment is :math:`A = n_{valid}\\,\\Pi` (:func:`otmel.ot_costs.plan_to_assignment`). Everything
the matcher needs from A is a product with it: :math:`A H` (``matmul``) and :math:`w^\\top A` (``rmatmul``). Kept
as the triple :math:`(r = n_{valid} u,\\; K,\\; c = v)`, each product is one pass over K, and the dense
(..., n, m) plan, its column-scaled copy and the assignment are never written. The kernel is built in two
passes: the cosine matrix from pre-scaled unit vectors (one matrix product, :math:`\\cos / (2\\,\\mathrm{reg})`),
then one in-place ``exp`` of it minus :math:`1 / (2\\,\\mathrm{reg})`, which is :math:`-C / \\mathrm{reg}` without
the clamp and per-plan shift of the training path (they cancel in the plan; see below).

**Equivalence.** Sinkhorn's plan does not change when K is multiplied by a constant per plan (u and v absorb it),
so dropping the training path's per-plan shift ``exp(min C / reg)`` leaves A unchanged up to rounding; the
iterations are those of the kernel path of :func:`otmel.ot.sinkhorn` (column update first, uniform marginals over the
valid elements, padded rows / columns with zero marginal and exactly zero in A). Tested equal to the dense path
to float32 rounding, masks included.

**Range.** Without the shift, :math:`K \\in [e^{-1/\\mathrm{reg}}, 1]`; the path is taken only when
:math:`1 / \\mathrm{reg}` is within the kernel path's safe range (:data:`otmel.ot.KERNEL_MAX_RANGE`, 30 in
float32: reg >= 1/30), a static check with no host synchronisation (the training path's ``method="auto"`` checks
the data). :func:`factored_ok` says whether it applies; the matcher falls back to the dense path otherwise.

No gradients are needed at inference, but the path is differentiable (plain tensor ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from otmel.ot import KERNEL_MAX_RANGE, Marginals, reg_number
from otmel.ot_costs import pairwise_dot

__all__ = ["ScaledKernel", "cosine_ot_assignment", "factored_ok"]


@dataclass(frozen=True)
class ScaledKernel:
    """The matrix ``diag(r) K diag(c)`` in factored form: r (..., n, 1), K (..., n, m), c (..., 1, m)."""

    r: Tensor
    K: Tensor
    c: Tensor

    def matmul(self, x: Tensor) -> Tensor:
        """A @ x for x (..., m, k) -> (..., n, k)."""
        return self.r * (self.K @ (self.c.transpose(-1, -2) * x))

    def rmatmul(self, w: Tensor) -> Tensor:
        """w @ A for w (..., k, n) -> (..., k, m)."""
        return ((w * self.r.transpose(-1, -2)) @ self.K) * self.c

    def dense(self) -> Tensor:
        """The (..., n, m) matrix itself (tests and plots; the inference path never needs it)."""
        return self.r * self.K * self.c


def factored_ok(reg: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`cosine_ot_assignment` is safe for this ``reg``: costs lie in [0, 1], so the kernel's
    dynamic range is exp(1 / reg), which must stay within the kernel path's bound."""
    return dtype in KERNEL_MAX_RANGE and 1.0 / reg <= KERNEL_MAX_RANGE[dtype]


def cosine_ot_assignment(
    x: Tensor, y: Tensor, mask_x: Tensor | None, mask_y: Tensor | None, *, reg: float | Tensor, n_iters: int
) -> ScaledKernel:
    """A = n_valid * Sinkhorn(C) for C = (1 - cos(x_i, y_j)) / 2, factored (see the module docstring).

    Args:
        x: (..., n, d) queries; y: (..., m, d) keys; leading dims broadcast.
        mask_x: (..., n) / mask_y: (..., m) bool, True = valid; ``None``: all valid.
        reg: entropic regularisation (POT's convention: K = exp(-C / reg)); must satisfy :func:`factored_ok`.
        n_iters: the fixed number of (column, row) update pairs, as in :func:`otmel.ot.sinkhorn`.

    Returns:
        :class:`ScaledKernel` with ``dense()`` (..., n, m) equal to ``plan_to_assignment(sinkhorn(C, ...))``.
    """
    if not factored_ok(reg_number(reg), x.dtype):
        raise ValueError(f"reg={reg} is below the factored path's safe range for {x.dtype} (see factored_ok)")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    half = 0.5 / reg
    xn = F.normalize(x, dim=-1, eps=1e-8) * half  # cos / (2 reg) straight out of the product
    yn = F.normalize(y, dim=-1, eps=1e-8)
    cos_half = pairwise_dot(xn, yn)  # (..., n, m) = cos / (2 reg)
    # exp(-C / reg), unclamped; in place unless a tensor reg needs autograd through it
    K = (cos_half - half).exp() if isinstance(reg, Tensor) else cos_half.sub_(half).exp_()
    n, m = K.shape[-2:]
    marg = Marginals(mask_x, mask_y, n, m, K)
    a, b, u0 = marg.a, marg.b, marg.u0
    zero_a, zero_b = marg.zero_a, marg.zero_b
    col = K.sum(-2, keepdim=True) if u0 is None else u0.transpose(-1, -2) @ K  # (..., 1, m)
    u = v = K  # placeholders, overwritten in the first iteration
    for it in range(n_iters):
        v = b / (col + zero_b)  # (..., 1, m)
        u = a / (K @ v.transpose(-1, -2) + zero_a)  # (..., n, 1)
        if it + 1 < n_iters:
            col = u.transpose(-1, -2) @ K
    n_valid = float(n) if mask_x is None else mask_x.sum(-1, keepdim=True).unsqueeze(-1).to(K.dtype)
    return ScaledKernel(u * n_valid, K, v)
