"""The OT-MEL model, top to bottom: encode -> fuse -> match -> score (Eq. 1-25).

    m = model.encode_mentions(batch)      # MentionFeatures
    e = model.encode_entities(batch)      # EntityFeatures: depends on the entity alone -> cache per KG
    s = model.score(m, e)                 # Scores: S_O, S_F, S_T, S_V of shape (Bm, Be)
    out = model(batch)                    # training: a dict whose keys are OTMELLoss's argument names

Every Table-2 variant is this model under a different `ModelConfig` (see `otmel.config.VARIANTS`).
Which CA runs is decided by `ca_mode()`: the configured one ("teacher"); for a distilling config, "both"
while training (teacher plans + student logits) and "student" (attention only) at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from otmel.config import ModelConfig
from otmel.model.assign import Assignment, Mode
from otmel.model.encoder import Encoder
from otmel.model.features import EntityFeatures, MentionFeatures, Scores
from otmel.model.fusion import Fusion
from otmel.model.matching import UnimodalMatcher, valid_prefix


class OTMEL(nn.Module):
    def __init__(self, cfg: ModelConfig, random_init: bool = False) -> None:
        """`random_init`: pretrained towers built from their configs with random weights (`otmel plan`)."""
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, random_init)
        d = self.encoder.dim
        if cfg.use_fusion:
            self.fusion = Fusion(cfg, d)
        if cfg.use_matching:
            self.match_t = UnimodalMatcher(cfg, d)
            if cfg.use_images:
                self.match_v = UnimodalMatcher(cfg, d)
        # shape (1,), not a 0-dim scalar: DeepSpeed 0.19.8 cannot broadcast 0-dim parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale_init)))

    def ca_mode(self) -> Mode:
        if self.cfg.kd == "none":
            return "teacher"
        return "both" if self.training else "student"

    # -- encoding ----------------------------------------------------------------------------------------
    def _encode(self, batch: dict[str, torch.Tensor], p: str) -> tuple[dict[str, Any], list[Assignment]]:
        """Shared by both sides (p = "m" or "e"): CLIP states, pooled embeddings, fusion."""
        mask_t = batch[f"{p}_attention_mask"].bool()  # (B, Lt)
        # The text tower sees only the columns up to the batch's longest text (right padding): entity names are
        # often a few tokens of a 40-token budget. Its states are padded back with zeros (masked everywhere).
        keep = valid_prefix(mask_t)
        T, t = self.encoder.encode_text(batch[f"{p}_input_ids"][:, :keep], mask_t[:, :keep].long())  # (B, keep, d)
        T = F.pad(T, (0, 0, 0, mask_t.shape[1] - keep))  # (B, Lt, d)
        has_image = batch[f"{p}_image_mask"].bool() if self.cfg.use_images else torch.zeros_like(mask_t[:, 0])
        out: dict[str, Any] = {"T": T, "mask_t": mask_t, "t": F.normalize(t, dim=-1), "has_image": has_image}
        V = mask_v = None
        if self.cfg.use_images:
            V, v = self.encoder.encode_image(batch[f"{p}_pixel_values"], has_image)  # (B, Lv, d), (B, d)
            mask_v = has_image.unsqueeze(1).expand(-1, V.shape[1])  # (B, Lv): a missing image masks all patches
            out.update(V=V, v=F.normalize(v, dim=-1), mask_v=mask_v)
        kd: list[Assignment] = []
        if self.cfg.use_fusion:
            out["g"], kd = self.fusion(T, mask_t, V, mask_v, self.ca_mode())
        return out, kd

    def _entity_features(self, batch: dict[str, torch.Tensor]) -> tuple[EntityFeatures, list[Assignment]]:
        x, kd = self._encode(batch, "e")
        f = EntityFeatures(t=x["t"], ids=batch["e_index"].long(), has_image=x["has_image"], v=x.get("v"),
                           g=x.get("g"), mask_t=x["mask_t"], mask_v=x.get("mask_v"))
        if self.cfg.use_matching:
            q = self.match_t.entity_side(x["T"])
            f.q_t, f.q_t_s = q["q"], q.get("q_s")
            if self.cfg.use_images:
                q = self.match_v.entity_side(x["V"])
                f.q_v, f.q_v_s = q["q"], q.get("q_s")
        return f, kd

    def _mention_features(self, batch: dict[str, torch.Tensor]) -> tuple[MentionFeatures, list[Assignment]]:
        x, kd = self._encode(batch, "m")
        f = MentionFeatures(t=x["t"], has_image=x["has_image"], v=x.get("v"), g=x.get("g"),
                            mask_t=x["mask_t"], mask_v=x.get("mask_v"))
        if self.cfg.use_matching:
            k = self.match_t.mention_side(x["T"])
            f.k_t, f.h_t, f.k_t_s = k["k"], k["h"], k.get("k_s")
            if self.cfg.use_images:
                k = self.match_v.mention_side(x["V"])
                f.k_v, f.h_v, f.k_v_s = k["k"], k["h"], k.get("k_s")
        return f, kd

    def encode_entities(self, batch: dict[str, torch.Tensor]) -> EntityFeatures:
        return self._entity_features(batch)[0]

    def encode_mentions(self, batch: dict[str, torch.Tensor]) -> MentionFeatures:
        return self._mention_features(batch)[0]

    # -- scoring --------------------------------------------------------------------------------------
    @staticmethod
    def _side(f: EntityFeatures | MentionFeatures, names: dict[str, str]) -> dict[str, torch.Tensor]:
        return {k: getattr(f, a) for k, a in names.items() if getattr(f, a) is not None}

    def score(self, m: MentionFeatures, e: EntityFeatures) -> Scores:
        """Scores of every mention against every entity: (Bm, Be) each."""
        cfg, mode = self.cfg, self.ca_mode()
        valid = (m.has_image.unsqueeze(1) & e.has_image.unsqueeze(0)) if cfg.use_images else None  # (Bm, Be)
        n_valid = valid.to(m.t.dtype) if valid is not None else 0.0
        if cfg.cls_only:  # the CLS-only baseline: pooled text (+ image) embeddings, no CA
            S = m.t @ e.t.t()
            if valid is not None:
                assert m.v is not None and e.v is not None  # use_images: _encode sets v on both sides
                S = (S + (m.v @ e.v.t()) * n_valid) / (1 + n_valid)
            return Scores(S_O=S, V_valid=valid)
        s = Scores(S_O=m.t.new_zeros(()), V_valid=valid)
        total: torch.Tensor | float
        count: torch.Tensor | float
        total, count = 0.0, 0.0
        if cfg.use_fusion:
            assert m.g is not None and e.g is not None  # use_fusion: _encode sets g on both sides
            s.S_F = m.g @ e.g.t()
            total, count = total + s.S_F, count + 1
        if cfg.use_matching:
            qt = self._side(e, {"q": "q_t", "q_s": "q_t_s"})
            kt = self._side(m, {"k": "k_t", "h": "h_t", "k_s": "k_t_s"})
            assert e.mask_t is not None and m.mask_t is not None  # _encode always sets mask_t
            s.S_T = self.match_t.scores(qt, e.mask_t, e.t, kt, m.mask_t, m.t, mode)
            total, count = total + s.S_T, count + 1
            if cfg.use_images:
                qv = self._side(e, {"q": "q_v", "q_s": "q_v_s"})
                kv = self._side(m, {"k": "k_v", "h": "h_v", "k_s": "k_v_s"})
                # use_images: _encode sets v and mask_v on both sides
                assert e.mask_v is not None and e.v is not None and m.mask_v is not None and m.v is not None
                s.S_V = self.match_v.scores(qv, e.mask_v, e.v, kv, m.mask_v, m.v, mode) * n_valid
                total, count = total + s.S_V, count + n_valid
        s.S_O = cast(torch.Tensor, total / count)  # a tensor: every config has fusion or matching
        return s

    # -- training forward -------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        entity_pool: Callable[[EntityFeatures], tuple[EntityFeatures, int]] | None = None,
    ) -> dict[str, Any]:
        """Mentions of the batch against the batch's gold entities (in-batch negatives).

        `entity_pool` widens the negatives: it maps this batch's entity features to the pool's (e.g. the
        global batch gathered from every worker, `otmel.train.worker.distributed.gather_features`) and returns
        the column offset of this batch's entities in it. The batch may carry more entity rows than mentions
        (hard negatives, `otmel.data.hard_negatives`): the first Bm are the golds, in mention order.
        Returns the keyword arguments of `otmel.loss.OTMELLoss`."""
        m, kd_m = self._mention_features(batch)
        e_local, kd_e = self._entity_features(batch)  # (Be_local >= Bm) golds first
        e, offset = entity_pool(e_local) if entity_pool is not None else (e_local, 0)
        s = self.score(m, e)
        kd_pairs = [a for a in kd_m + kd_e if a.student_logits is not None]
        if self.cfg.kd != "none" and self.cfg.use_matching:
            kd_pairs += self._gold_pair_assignments(m, e_local.select(slice(0, len(m))))
        return {
            "S_O": s.S_O, "S_F": s.S_F, "S_T": s.S_T, "S_V": s.S_V, "V_valid": s.V_valid,
            "logit_scale": self.logit_scale,
            "m_gold": batch["e_index"][: len(m)].long(),  # (Bm,) each mention's gold entity row
            "e_ids": e.ids,  # (Be,) the entity row of each column
            "kd_pairs": kd_pairs,
            "targets": offset + torch.arange(len(m), device=m.t.device),  # (Bm,) gold columns
        }

    def _gold_pair_assignments(self, m: MentionFeatures, e: EntityFeatures) -> list[Assignment]:
        """Teacher plans + student logits of the unimodal CA on the gold pairs (mention i, entity i)."""
        out = []
        specs = [(self.match_t, ("q_t", "q_t_s"), ("k_t", "h_t", "k_t_s"), "mask_t")]
        if self.cfg.use_images:
            specs.append((self.match_v, ("q_v", "q_v_s"), ("k_v", "h_v", "k_v_s"), "mask_v"))
        for matcher, (q, qs), (k, h, ks), mk in specs:
            qe = self._side(e, {"q": q, "q_s": qs})
            km = self._side(m, {"k": k, "h": h, "k_s": ks})
            a = matcher.paired_assignment(qe, getattr(e, mk), km, getattr(m, mk), "both")
            if a.student_logits is not None:
                out.append(a)
        return out

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
