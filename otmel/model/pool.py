"""Sequence pooling (Eq. 13-14): SoftPool, and the mean / max of the O1 / O2 ablations.

SoftPool: w = softmax_l(u^T x_l + b) over the valid positions, out = LayerNorm(sum_l w_l x_l).
Fully masked sequences pool to exactly 0 (the LayerNorm bias is not let through).

`from_assignment(A, H, mask)` pools G = A H without materialising G for SoftPool and mean, which is what
keeps the pairwise matcher affordable: for Bm x Be pairs, G is (Bm, Be, Le, d) while the pooled result is
(Bm, Be, d). Since the rows of A sum to 1, u^T (A H)_l + b = (A (H u))_l + b, and
sum_l w_l (A H)_l = (w^T A) H.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
from torch import nn

from otmel.ot_factored import ScaledKernel


class Pool(nn.Module):
    def __init__(self, dim: int, kind: Literal["softpool", "mean", "max"] = "softpool") -> None:
        super().__init__()
        self.kind = kind
        if kind == "softpool":
            self.score = nn.Linear(dim, 1)
        self.norm = nn.LayerNorm(dim)

    def _weights(self, s: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Pooling weights (..., L): softmax of the scores s over valid positions, or uniform (mean)."""
        m = mask.to(torch.float32 if s is None else s.dtype)
        if s is None:
            return m / m.sum(-1, keepdim=True).clamp(min=1.0)
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1) * m

    def _finish(self, pooled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.norm(pooled) * mask.any(-1, keepdim=True))  # nn.Module calls are untyped

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (..., L, d), mask (..., L) bool -> (..., d)."""
        if self.kind == "max":
            pooled = x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(-2)
            pooled = pooled * mask.any(-1, keepdim=True)  # all-masked rows: 0, not finfo.min
        else:
            s = self.score(x).squeeze(-1) if self.kind == "softpool" else None
            w = self._weights(s, mask).to(x.dtype)
            pooled = torch.matmul(w.unsqueeze(-2), x).squeeze(-2)
        return self._finish(pooled, mask)

    def from_assignment(self, A: torch.Tensor | ScaledKernel, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool G = A H over its n rows: A (..., n, m) dense or factored, H (..., m, d), mask (..., n) -> (..., d)."""
        mm: Callable[[torch.Tensor], torch.Tensor]
        rmm: Callable[[torch.Tensor], torch.Tensor]
        if isinstance(A, ScaledKernel):
            mm, rmm, dtype = A.matmul, A.rmatmul, A.K.dtype
        else:
            mm, rmm, dtype = A.matmul, (lambda w: torch.matmul(w, A)), A.dtype
        if self.kind == "max":
            return self.forward(mm(H), mask)
        s = None
        if self.kind == "softpool":
            hu = torch.matmul(H, self.score.weight.t())  # (..., m, 1)
            s = mm(hu).squeeze(-1) + self.score.bias  # (..., n)
        w = self._weights(s, mask).to(dtype)  # (..., n)
        wa = rmm(w.unsqueeze(-2))  # (..., 1, m)
        pooled = torch.einsum("...im,...md->...id", wa, H).squeeze(-2)  # (..., d); einsum: H is not expanded
        return self._finish(pooled, mask)
