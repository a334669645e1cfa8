"""What the Sinkhorn solver of `otmel.ot` is fed and what its plans become: the cosine cost, the plan →
row-stochastic assignment map, and the batched pairwise product every correlation assignment uses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cosine_cost", "pairwise_dot", "plan_to_assignment"]


def plan_to_assignment(plan: Tensor, mask_x: Tensor | None = None) -> Tensor:
    """Rescale each row of a Sinkhorn plan to sum to 1: ``A = n_valid * plan`` (barycentric weights).

    ``sinkhorn`` ends every iteration with the row update, so each valid row of its plan sums to
    exactly ``1 / n_valid`` and ``n_valid * plan`` has rows summing to 1, like an attention matrix:
    ``G = A @ H`` is then a barycentric average of the values. Rows that are padded (``mask_x``
    False), or belong to an empty problem, are 0 in the plan and stay exactly 0 (never NaN).

    Args:
        plan: (..., n, m) transport plans from :func:`sinkhorn`.
        mask_x: optional (..., n) bool row mask used for the plan (True = valid); ``None``: all n
            rows are valid.

    Returns:
        (..., n, m) assignment matrix.
    """
    if mask_x is None:
        return plan * plan.shape[-2]
    n_valid = mask_x.to(torch.bool).sum(-1, keepdim=True).unsqueeze(-1)
    return plan * n_valid.to(plan.dtype)


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine cost ``C_ij = (1 - cos(x_i, y_j)) / 2`` in [0, 1] (batched over leading dims).

    Args:
        x: (..., n, d) queries.
        y: (..., m, d) keys; leading dims broadcast against ``x``.
        eps: lower bound on the norms; a zero vector has cosine 0 with everything (cost 0.5), with
            finite gradients.

    Returns:
        (..., n, m) cost, clamped to [0, 1] against rounding.
    """
    xn = torch.nn.functional.normalize(x, dim=-1, eps=eps)
    yn = torch.nn.functional.normalize(y, dim=-1, eps=eps)
    cos = pairwise_dot(xn, yn)
    return ((1.0 - cos) * 0.5).clamp(0.0, 1.0)


def pairwise_dot(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y.transpose(-1, -2)``: (..., n, d) x (..., m, d) -> (..., n, m), leading dims broadcast.

    Through ``einsum``, which folds a leading dim that is 1 on one side into a single matrix product instead of
    expanding and copying both operands as ``matmul`` does: for the pairwise matcher's (1, Be, n, d) entities
    against (Bm, 1, m, d) mentions, one (Be n, d) x (d, Bm m) GEMM rather than two (Bm, Be, ., .) copies and Bm Be
    tiny products (measured ~10x faster on CPU). The einsum's output is a permuted view; it is made contiguous
    once here, since every later pass over it (softmax, the Sinkhorn mat-vecs) would otherwise copy it again.
    """
    return torch.einsum("...nd,...md->...nm", x, y).contiguous()
