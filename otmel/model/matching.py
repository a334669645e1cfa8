"""Unimodal matching (Eq. 19-24) for every mention x entity pair of a candidate pool.

For one modality (text tokens, or image patches) and a pair (m, e):
queries = the entity's states X_e (Le, d), keys/values = the mention's states Y_m (Lm, d);
CA gives the mention representation correlated to that entity, G (Le, d), pooled to g_m (d); then

    S(m, e) = ( <g_m, x_e> + <x_m, x_e> ) / 2

with x the pooled CLS embeddings (all L2-normalised). For Bm mentions x Be entities this is
O(Bm * Be * Le * Lm * hidden): the entity side is projected once (cacheable), the pairs are processed in
chunks of `chunk` entities, and G itself is never materialised (see `Pool.from_assignment`), so memory per
chunk is O(Bm * chunk * Le * Lm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from otmel.config import ModelConfig
from otmel.model.assign import Assignment, Mode
from otmel.model.fusion import make_ca
from otmel.model.pool import Pool
from otmel.ot_factored import ScaledKernel


def valid_prefix(mask: torch.Tensor) -> int:
    """1 + the last column that is valid in some row of `mask` (B, L) (at least 1): the columns after it are
    padding in every row and can be dropped before any masked computation (one host sync)."""
    cols = mask.any(0).nonzero()
    return max(1, int(cols[-1]) + 1) if len(cols) else 1


class UnimodalMatcher(nn.Module):
    # Inference (no autograd) pools the teacher OT from its factored assignment (otmel.ot_factored): equal scores
    # to float32 rounding, without writing the plans. False (per instance or class) forces the dense path.
    factored_inference: bool = True

    def __init__(self, cfg: ModelConfig, dim: int) -> None:
        super().__init__()
        self.ca = make_ca(cfg, dim, cfg.match_ca, detach_cost=cfg.detach_match_cost)
        self.pool = Pool(dim, cfg.pooling)
        self.chunk = cfg.match_chunk
        self.checkpoint = cfg.match_checkpoint

    def entity_side(self, X_e: torch.Tensor) -> dict[str, torch.Tensor]:
        """Entity-only projections (cache these per KG): `q` (Be, Le, hidden) [+ `q_s`]."""
        return self.ca.queries(X_e)

    def mention_side(self, Y_m: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mention projections: `k` (Bm, Lm, hidden), `h` (Bm, Lm, d) [+ `k_s`]."""
        return self.ca.keys(Y_m)

    def scores(
        self,
        qe: dict[str, torch.Tensor],
        mask_e: torch.Tensor,  # (Be, Le) bool
        x_e: torch.Tensor,  # (Be, d) normalised pooled entity embedding
        km: dict[str, torch.Tensor],
        mask_m: torch.Tensor,  # (Bm, Lm) bool
        x_m: torch.Tensor,  # (Bm, d) normalised pooled mention embedding
        mode: Mode,
    ) -> torch.Tensor:
        """S (Bm, Be) for every pair, chunked over entities."""
        mode = "student" if mode == "student" else "teacher"  # the pairwise pass never needs both
        cls_term = x_m @ x_e.t()  # (Bm, Be)
        lm = valid_prefix(mask_m)  # trailing columns padded in every mention are dropped (exact: zero mass)
        km_b = {k: v[:, :lm].unsqueeze(1) for k, v in km.items()}  # (Bm, 1, Lm, .)
        mask_m_b = mask_m[:, :lm].unsqueeze(1)  # (Bm, 1, Lm)
        keys = sorted(qe)

        def chunk_scores(mask_e_c: torch.Tensor, x_e_c: torch.Tensor, *q: torch.Tensor) -> torch.Tensor:
            qe_c = {k: v.unsqueeze(0) for k, v in zip(keys, q, strict=True)}  # (1, c, Le, hidden)
            mask_e_c = mask_e_c.unsqueeze(0)  # (1, c, Le)
            A: torch.Tensor | ScaledKernel | None = (
                self.ca.assign_factored(qe_c, km_b, mask_e_c, mask_m_b) if factored else None
            )
            if A is None:
                A = self.ca.assign(qe_c, km_b, mask_e_c, mask_m_b, mode).A  # (Bm, c, Le, Lm)
            g = self.pool.from_assignment(A, km_b["h"], mask_e_c)  # (Bm, c, d)
            return (F.normalize(g, dim=-1) * x_e_c.unsqueeze(0)).sum(-1)  # (Bm, c)

        # With checkpointing, backward keeps only each chunk's inputs and (Bm, c) output and recomputes the
        # (Bm, c, Le, Lm) plans: activation memory grows with Bm * Be, not Bm * Be * Le * Lm.
        recompute = self.checkpoint and torch.is_grad_enabled()
        factored = self.factored_inference and mode == "teacher" and not torch.is_grad_enabled()
        out = []
        for s in range(0, x_e.shape[0], self.chunk):
            sl = slice(s, s + self.chunk)
            le = valid_prefix(mask_e[sl])  # likewise for the chunk's entities (short names: Le << max_len)
            args = (mask_e[sl, :le], x_e[sl], *(qe[k][sl, :le] for k in keys))
            if recompute:
                out.append(torch.utils.checkpoint.checkpoint(chunk_scores, *args, use_reentrant=False))
            else:
                out.append(chunk_scores(*args))
        return (torch.cat(out, 1) + cls_term) / 2

    def paired_assignment(
        self,
        qe: dict[str, torch.Tensor],
        mask_e: torch.Tensor,
        km: dict[str, torch.Tensor],
        mask_m: torch.Tensor,
        mode: Mode,
    ) -> Assignment:
        """The assignment of aligned pairs (entity i with mention i), e.g. the gold pairs for distillation."""
        return self.ca.assign(qe, km, mask_e, mask_m, mode)
