"""Multimodal feature fusion (Sec. 3.2-3.3, Eq. 13-18), shared by mentions and entities.

image->text: G^{v->t} = CA(queries = text tokens T, keys = patches V)   (B, Lt, d)
text->image: G^{t->v} = CA(queries = patches V, keys = text tokens T)   (B, Lv, d)
g_t = pool({T, G^{v->t}}),  g_v = pool({V, G^{t->v}})   (pooling over the concatenated sequence)
The fusion vector is [g_t ; g_v] (each half L2-normalised, then the whole): S_F is its inner product.
A missing image masks all its patches: G^{v->t} = 0, g_v = 0, and the image contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from otmel.config import ModelConfig
from otmel.model.assign import Assignment, CorrelationAssignment, LearnedReg, Mode
from otmel.model.pool import Pool


def make_ca(cfg: ModelConfig, dim: int, kind: str, *, detach_cost: bool = False) -> CorrelationAssignment:
    """A CA module as the config says; OT modules get a student when the config distils, and a regulariser
    of their own when it is learned."""
    reg: float | LearnedReg = (LearnedReg(cfg.reg_init, cfg.reg_min, cfg.reg_max, cfg.reg_gain)
                               if cfg.reg == "learned" and kind == "ot" else
                               (cfg.reg_init if cfg.reg == "learned" else cfg.reg))
    return CorrelationAssignment(
        dim, cfg.hidden_dim, kind,  # type: ignore[arg-type]
        reg=reg, n_iters=cfg.n_iters, stop_thr=cfg.stop_thr,
        student=cfg.kd != "none" and kind == "ot", detach_cost=detach_cost,
    )


class Fusion(nn.Module):
    def __init__(self, cfg: ModelConfig, dim: int) -> None:
        super().__init__()
        self.use_images = cfg.use_images
        self.pool_t = Pool(dim, cfg.pooling)
        if cfg.use_images:
            self.v2t = make_ca(cfg, dim, cfg.fusion_ca)
            self.t2v = make_ca(cfg, dim, cfg.fusion_ca)
            self.pool_v = Pool(dim, cfg.pooling)

    def forward(
        self,
        T: torch.Tensor,  # (B, Lt, d)
        mask_t: torch.Tensor,  # (B, Lt) bool
        V: torch.Tensor | None,  # (B, Lv, d)
        mask_v: torch.Tensor | None,  # (B, Lv) bool, all False for a missing image
        mode: Mode,
    ) -> tuple[torch.Tensor, list[Assignment]]:
        """Returns the normalised fusion vector g (B, 2d) (text-only: (B, d)) and the assignments (for KD)."""
        if not self.use_images or V is None or mask_v is None:
            return F.normalize(self.pool_t(T, mask_t), dim=-1), []
        G_vt, a_vt = self.v2t(T, V, mask_t, mask_v, mode)  # (B, Lt, d)
        G_tv, a_tv = self.t2v(V, T, mask_v, mask_t, mode)  # (B, Lv, d)
        g_t = self.pool_t(torch.cat([T, G_vt], 1), torch.cat([mask_t, mask_t & mask_v.any(-1, keepdim=True)], 1))
        g_v = self.pool_v(torch.cat([V, G_tv], 1), torch.cat([mask_v, mask_v], 1))  # (B, d); 0 if no image
        g = torch.cat([F.normalize(g_t, dim=-1), F.normalize(g_v, dim=-1)], -1)  # (B, 2d)
        return F.normalize(g, dim=-1), [a_vt, a_tv]
