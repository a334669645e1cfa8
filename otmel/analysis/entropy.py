"""Mean entropy H(Pi) of the OT plans a trained model computes (the x axis of the paper's Fig. 3).

Measured after training, in the trial's driver, on one batch of dev mentions against one batch of KG
entities: every Sinkhorn plan of the OT correlation-assignment modules (fusion: text<->image of each
mention and entity; unimodal matching: every entity-mention pair) is captured through the modules' plan
hooks — on the dense path and on the factored inference path alike, so the probe means the same thing at
every reg — and the entropy of each problem's plan (a joint distribution over its valid cells, total
mass 1) is averaged. The normalised
entropy divides by log(#valid cells): 1 is the uniform plan, 0 a one-hot one. Assignments that run as
attention (ATT variants, or the KD student at inference) have no plan and are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from otmel.analysis.plans import capture_plans
from otmel.model import OTMEL
from otmel.model.modes import eval_mode
from otmel.runconfig import RunConfig


@torch.no_grad()
def model_plan_entropy(model: OTMEL, mentions: dict[str, torch.Tensor], entities: dict[str, torch.Tensor]
                       ) -> dict[str, float]:
    """Mean (normalised) plan entropy of every OT plan the model computes scoring `mentions` x `entities` at
    inference, whichever path computes it (plan hooks, `otmel.analysis.plans.capture_plans`); empty when the
    model runs no OT at inference (attention variants, the KD student)."""
    with eval_mode(model), capture_plans(model) as cap:
        model.score(model.encode_mentions(mentions), model.encode_entities(entities))
    h, hn = cap.pooled("entropy"), cap.pooled("entropy_norm")
    if not h.numel():
        return {}
    out = {"plan_entropy": float(h.mean()), "plan_entropy_norm": float(hn.mean())}
    for mod, row in cap.summary().items():  # per module, e.g. plan_entropy_norm/match_t.ca
        out[f"plan_entropy_norm/{mod}"] = row["entropy_norm"]
    return out


def checkpoint_plan_entropy(cfg: RunConfig, checkpoint: Path, mentions: int = 16, entities: int = 32
                            ) -> dict[str, float]:
    """`model_plan_entropy` of a checkpoint's best weights on the first dev mentions / KG entities."""
    from otmel.analysis.sharpness import load_probe

    return model_plan_entropy(*load_probe(cfg, checkpoint, mentions, entities))
