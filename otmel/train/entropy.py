"""Mean entropy H(Pi) of the OT plans a trained model computes (the x axis of the paper's Fig. 3).

Measured after training, in the trial's driver, on one batch of dev mentions against one batch of KG
entities: every Sinkhorn plan of the OT correlation-assignment modules (fusion: text<->image of each
mention and entity; unimodal matching: every entity-mention pair) is captured, and the entropy of each
problem's plan (a joint distribution over its valid cells, total mass 1) is averaged. The normalised
entropy divides by log(#valid cells): 1 is the uniform plan, 0 a one-hot one. Assignments that run as
attention (ATT variants, or the KD student at inference) have no plan and are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from otmel.model import OTMEL
from otmel.model.assign import Assignment, CorrelationAssignment
from otmel.train.config import RunConfig


def plan_entropies(plan: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and normalised entropy of every problem in `plan` (..., n, m), over its valid cells
    (masks broadcast against the plan's leading dims). Problems with no valid cell are dropped."""
    valid = (mask_x.unsqueeze(-1) & mask_y.unsqueeze(-2)).expand_as(plan)
    p = (plan * valid).double()
    p = p / p.sum((-1, -2), keepdim=True).clamp_min(1e-300)  # exactly mass 1 per problem
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum((-1, -2))
    cells = valid.sum((-1, -2)).double()
    keep = cells > 1
    return h[keep].flatten(), (h[keep] / cells[keep].log()).flatten()


@torch.no_grad()
def model_plan_entropy(model: OTMEL, mentions: dict[str, torch.Tensor], entities: dict[str, torch.Tensor]
                       ) -> dict[str, float]:
    """Mean (normalised) plan entropy of every OT plan the model computes scoring `mentions` x `entities`;
    empty when the model runs no OT at inference."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    wrapped: list[CorrelationAssignment] = []

    def wrap(mod: CorrelationAssignment) -> Callable[..., Assignment]:
        orig = mod.assign

        def assign(*args: Any, **kwargs: Any) -> Assignment:
            a = orig(*args, **kwargs)
            mode = kwargs.get("mode", args[4] if len(args) > 4 else "teacher")
            if mode == "teacher":  # an OT module in teacher mode: `raw` is the Sinkhorn plan
                captured.append(plan_entropies(a.raw, a.mask_x, a.mask_y))
            return a

        return assign

    for mod in model.modules():
        if isinstance(mod, CorrelationAssignment) and mod.kind == "ot":
            mod.assign = wrap(mod)  # type: ignore[method-assign]  # an instance attribute, removed below
            wrapped.append(mod)
    was_training = model.training
    model.eval()
    try:
        if model.cfg.kd != "none":
            return {}  # the KD model runs its student attention at inference: no plan
        model.score(model.encode_mentions(mentions), model.encode_entities(entities))
    finally:
        for mod in wrapped:
            delattr(mod, "assign")  # back to the class's method
        model.train(was_training)
    if not captured:
        return {}
    h = torch.cat([c[0] for c in captured])
    hn = torch.cat([c[1] for c in captured])
    return {"plan_entropy": float(h.mean()), "plan_entropy_norm": float(hn.mean())}


def checkpoint_plan_entropy(cfg: RunConfig, checkpoint: Path, mentions: int = 16, entities: int = 32
                            ) -> dict[str, float]:
    """`model_plan_entropy` of a checkpoint's best weights on the first dev mentions / KG entities."""
    from otmel.data.loaders import eval_loader, kg_loader
    from otmel.model.encoder import build_preprocessor
    from otmel.train.checkpoint import load_model_weights

    torch.set_flush_denormal(True)
    mcfg = cfg.model_config()
    model = OTMEL(mcfg)
    model.load_state_dict(load_model_weights(checkpoint))
    pre = build_preprocessor(mcfg)
    shards = Path(cfg.data.shards)
    mb = next(iter(eval_loader(shards, "dev", pre, batch_size=mentions)))
    eb = next(iter(kg_loader(shards, pre, batch_size=entities)))
    return model_plan_entropy(model, mb, eb)
