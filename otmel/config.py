"""Model configuration and the paper's Table-2 variants as presets of one model.

Every variant is a set of overrides on `ModelConfig`: there is one model, not one fork per variant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from otmel.errors import ConfigError, UnknownKeyError, did_you_mean

CAKind = Literal["ot", "att"]
Pooling = Literal["softpool", "mean", "max"]
KDKind = Literal["none", "kl", "mse", "kl_row"]


@dataclass
class ModelConfig:
    # --- encoder -------------------------------------------------------------------------------
    # "tiny": a small random CLIP built from a config plus a tokenizer built locally (no downloads) for
    # tests, CI and the demo. Anything else is passed to `CLIPModel.from_pretrained` (a hub id such as
    # "openai/clip-vit-base-patch32", or a local directory) — the paper's encoder.
    pretrained: str = "tiny"
    # Sizes of the tiny preset only (ignored for pretrained models). Small enough for 2 CPU cores.
    tiny_width: int = 64  # transformer width of both towers and the shared projection width d
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_vocab_size: int = 2048  # the locally trained byte-level BPE
    tiny_image_size: int = 48  # pixels; patches of `tiny_patch_size` give (48/8)^2 + 1 = 37 visual tokens
    tiny_patch_size: int = 8
    # Separate towers instead of one CLIP (pretrained is then unused): an HF text encoder and, unless
    # text-only, an HF vision encoder; each an HF id, a local directory, or "package:NAME" for a model shipped
    # inside an installed Python package (resolved from site-packages, never from a hub).
    text_model: str | None = None
    vision_model: str | None = None
    tower_dim: int = 384  # the common width d that separate towers are projected to
    max_len: int = 40  # text tokens per mention / entity, as in the paper
    # False for text-only datasets (MELBench): the vision tower is never run and every visual term
    # (S_V, L_V, the image half of fusion) is switched off, instead of being averaged in as noise.
    use_images: bool = True

    # --- correlation assignment (Eq. 6-12) -------------------------------------------------------
    hidden_dim: int = 96  # width of the query/key projections Wq, Wk (the paper's hidden width 96)
    fusion_ca: CAKind = "ot"  # CA inside multimodal fusion (F1: "att")
    match_ca: CAKind = "ot"  # CA inside unimodal matching (M1: "att")
    # Entropic regularisation, POT convention K = exp(-C / reg) (release: 0.05; the paper's text K = exp(-0.6 C)
    # is reg ~ 1.67). "learned": every OT module learns its own reg (see `otmel.model.assign.LearnedReg`).
    reg: float | Literal["learned"] = 0.05
    reg_init: float = 0.05  # start value of a learned reg
    # Bounds of a learned reg. Below ~1/30 the factored inference path and the kernel path give way to the log
    # domain (still finite, slower); above ~10 every cosine-cost plan is uniform to float32 precision.
    reg_min: float = 0.01
    reg_max: float = 10.0
    # Adam moves a parameter by ~lr per step whatever its gradient's size; the raw parameter of a learned reg is
    # multiplied by this gain so that log(reg) can cross its range within a short run (lr 2e-3, ~200 steps).
    reg_gain: float = 10.0
    n_iters: int = 3  # Sinkhorn iterations (release: 3); the maximum when stop_thr is set
    stop_thr: float | None = None  # optional marginal-error tolerance for early stopping
    # The release detaches the cost of the pairwise matcher (saves backward memory); off by default so
    # gradients flow through the unrolled Sinkhorn iterations as the method describes.
    detach_match_cost: bool = False

    # --- fusion, matching, pooling (Eq. 13-24) ---------------------------------------------------
    use_fusion: bool = True  # S_F and L_F (F2: False)
    use_matching: bool = True  # S_T, S_V and their losses (M2: False)
    pooling: Pooling = "softpool"  # O1: "mean", O2: "max"
    # CLS-only baseline: score with the pooled [CLS]/EOS text and image embeddings alone, no CA at all.
    cls_only: bool = False
    # Entities scored per chunk by the pairwise matcher: peak memory is O(Bm * chunk * Le * Lm).
    match_chunk: int = 64
    # Recompute each chunk's plans in backward instead of keeping them (activation checkpointing): peak
    # training memory of the matcher then grows with Bm * Be instead of Bm * Be * Le * Lm, for ~1.3x compute.
    match_checkpoint: bool = True

    # --- scores and losses (Eq. 25-29) -----------------------------------------------------------
    # Scores are inner products of L2-normalised features (cosines) times a learned CLIP-style logit
    # scale. With raw inner products a randomly initialised encoder gives logits of arbitrary size.
    logit_scale_init: float = 10.0
    kd: KDKind = "none"  # KD: "kl" (Eq. 28-29), K1: "mse", K2: "kl_row" (one direction)
    kd_weight: float = 1.0  # weight of L_KD in J = L + w * L_KD
    # Teacher distribution of the distillation. "plan": the plan's own row/column distribution
    # Pi_i. / sum(Pi_i.). "softmax": softmax(Pi_i.) literally as Eq. 28 writes it; plan entries lie in
    # [0, 1/n], so that target is within a factor e^(1/n) of uniform and carries almost no signal.
    kd_target: Literal["plan", "softmax"] = "plan"

    variant: str = "OT"  # the Table-2 id this config was built from (recorded, not interpreted)

    def __post_init__(self) -> None:
        pos = ("tiny_width", "tiny_layers", "tiny_heads", "tiny_vocab_size", "tiny_image_size", "tiny_patch_size",
               "tower_dim", "max_len", "hidden_dim", "n_iters", "match_chunk")
        checks: dict[str, tuple[bool, str]] = {k: (isinstance(getattr(self, k), int) and getattr(self, k) >= 1,
                                                   "a whole number >= 1") for k in pos}
        checks |= {
            "fusion_ca": (self.fusion_ca in ("ot", "att"), "'ot' or 'att'"),
            "match_ca": (self.match_ca in ("ot", "att"), "'ot' or 'att'"),
            "pooling": (self.pooling in ("softpool", "mean", "max"), "'softpool', 'mean' or 'max'"),
            "kd": (self.kd in ("none", "kl", "mse", "kl_row"), "'none', 'kl', 'mse' or 'kl_row'"),
            "kd_target": (self.kd_target in ("plan", "softmax"), "'plan' or 'softmax'"),
            "reg": (self.reg == "learned" or (_number(self.reg) and 0 < self.reg < math.inf),
                    "a positive number or 'learned'"),
            "reg_init": (_number(self.reg_init) and self.reg_min <= self.reg_init <= self.reg_max,
                         "within [reg_min, reg_max]"),
            "reg_min": (_number(self.reg_min) and 0 < self.reg_min < self.reg_max < math.inf,
                        "0 < reg_min < reg_max"),
            "reg_gain": (_number(self.reg_gain) and self.reg_gain > 0, "> 0"),
            "stop_thr": (self.stop_thr is None or (_number(self.stop_thr) and self.stop_thr > 0), "> 0 or null"),
            "logit_scale_init": (_number(self.logit_scale_init) and self.logit_scale_init > 0, "> 0"),
            "kd_weight": (_number(self.kd_weight) and self.kd_weight >= 0, ">= 0"),
        }
        bad = [f"'model.{k}' must be {rule}, got {getattr(self, k)!r}" for k, (ok, rule) in checks.items() if not ok]
        if bad:
            raise ConfigError("invalid model config: " + "; ".join(bad))
        if not (self.use_fusion or self.use_matching or self.cls_only):
            raise ConfigError("model config: at least one of use_fusion / use_matching / cls_only must be on")
        if self.kd != "none" and "ot" not in (self.fusion_ca, self.match_ca):
            raise ConfigError("model config: distillation (kd) needs an OT teacher (fusion_ca or match_ca = 'ot')")

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> ModelConfig:
        """Build the config of a Table-2 variant (`OT`, `F1`, ..., `K2`, or `CLS`), then apply overrides."""
        key = str(variant).upper()
        if key not in VARIANTS:
            hint = did_you_mean(key, VARIANTS)
            raise UnknownKeyError(f"unknown variant {variant!r}{hint}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[key], "variant": key, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Strict construction: an unknown key is an error that names the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hints = "".join(did_you_mean(k, names).replace("'", "'model.", 1) for k in unknown)
            raise UnknownKeyError(f"unknown model config key(s) {['model.' + k for k in unknown]}{hints}; known: "
                                  f"{sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# Table 2 / Table 6 of the paper, as overrides of the full model (OT).
VARIANTS: dict[str, dict[str, Any]] = {
    "OT": {},
    "F1": {"fusion_ca": "att"},
    "F2": {"use_fusion": False},
    "M1": {"match_ca": "att"},
    "M2": {"use_matching": False},
    "A1": {"fusion_ca": "att", "match_ca": "att"},
    "O1": {"pooling": "mean"},
    "O2": {"pooling": "max"},
    "LREG": {"reg": "learned"},  # not in the paper: OT with a learned regulariser per module
    "KD": {"kd": "kl"},
    "K1": {"kd": "mse"},
    "K2": {"kd": "kl_row"},
    "CLS": {"cls_only": True, "use_fusion": False, "use_matching": False},
}

TABLE2_VARIANTS: tuple[str, ...] = ("OT", "F1", "F2", "M1", "M2", "A1", "O1", "O2", "KD", "K1", "K2")


__all__ = ["ModelConfig", "VARIANTS", "TABLE2_VARIANTS"]
