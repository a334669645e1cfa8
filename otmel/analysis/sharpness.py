"""Why are the plans of a trained model near uniform? Plan statistics of a checkpoint, and what-if re-solves.

`checkpoint_plan_summary(cfg, checkpoint)` scores a batch of dev mentions against a batch of KG entities with the
checkpoint's best weights and reports, per OT module, the statistics of `otmel.analysis.plans` (cost range over
reg, plan entropy, distance to attention of the same scores). It then re-solves each module's first batch of
problems on the *same learned costs* under other settings, which separates the candidate causes:

- ``iters``: the trained reg with 200 iterations instead of the budget (does the 3-iteration budget flatten?);
- ``reg``: reg 0.01 / 0.05 / 0.2 and the paper's text convention K = exp(-0.6 C), i.e. reg = 1 / 0.6 ~ 1.67,
  each at the model's iteration budget (how much does the convention matter, for these costs?).

Each what-if reports the mean normalised (joint and row) entropy and the mean row maximum of the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from otmel.analysis.plans import capture_plans, problem_stats
from otmel.model import OTMEL
from otmel.model.assign import PlanRecord
from otmel.model.modes import eval_mode
from otmel.ot import sinkhorn
from otmel.runconfig import RunConfig

PAPER_TEXT_REG = 1 / 0.6  # the paper's text: K = exp(-lambda C) with lambda = 0.6
WHAT_IF_REGS = (0.01, 0.05, 0.2, PAPER_TEXT_REG)


def what_if(rec: PlanRecord, reg: float, n_iters: int) -> dict[str, float]:
    """Re-solve the problems of `rec` (its costs and masks) at `reg` / `n_iters`: mean normalised joint and row
    entropy and mean row maximum of the new plans."""
    plan = sinkhorn(rec.cost.double(), rec.mask_x, rec.mask_y, reg=reg, n_iters=n_iters)
    st = problem_stats(PlanRecord(plan, rec.cost, reg, rec.mask_x, rec.mask_y, rec.path))
    return {k: float(st[k].mean()) for k in ("entropy_norm", "row_entropy_ot", "row_max_ot")}


@torch.no_grad()
def model_plan_summary(model: OTMEL, mentions: dict[str, torch.Tensor], entities: dict[str, torch.Tensor]
                       ) -> dict[str, dict[str, Any]]:
    """Per OT module: `PlanCapture.summary()` plus the what-ifs; empty when the model has no plans at inference."""
    with eval_mode(model), capture_plans(model, keep_samples=True) as cap:
        model.score(model.encode_mentions(mentions), model.encode_entities(entities))
    out: dict[str, dict[str, Any]] = {}
    iters = model.cfg.n_iters
    summary: dict[str, dict[str, Any]] = cap.summary()  # rows gain a nested "what_if" entry below
    for mod, row in summary.items():
        rec = cap.samples[mod]
        row["what_if"] = {"as_run": what_if(rec, rec.reg, iters), "iters200": what_if(rec, rec.reg, 200),
                          **{f"reg{r:.3g}": what_if(rec, r, iters) for r in WHAT_IF_REGS}}
        out[mod] = row
    return out


def load_probe(cfg: RunConfig, checkpoint: Path, mentions: int = 16, entities: int = 32
               ) -> tuple[OTMEL, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's best weights and the first `mentions` dev mentions / `entities` KG entities."""
    from otmel.checkpoints import load_model_weights
    from otmel.data.loaders import eval_loader, kg_loader
    from otmel.model.encoder import build_preprocessor

    torch.set_flush_denormal(True)
    mcfg = cfg.model_config()
    model = OTMEL(mcfg)
    model.load_state_dict(load_model_weights(checkpoint))
    pre = build_preprocessor(mcfg)
    shards = Path(cfg.data.shards)
    mb = next(iter(eval_loader(shards, "dev", pre, batch_size=mentions)))
    eb = next(iter(kg_loader(shards, pre, batch_size=entities)))
    return model, mb, eb


def checkpoint_plan_summary(cfg: RunConfig, checkpoint: Path, mentions: int = 16, entities: int = 32
                            ) -> dict[str, dict[str, Any]]:
    """`model_plan_summary` of a checkpoint (see `load_probe`)."""
    return model_plan_summary(*load_probe(cfg, checkpoint, mentions, entities))


__all__ = ["PAPER_TEXT_REG", "checkpoint_plan_summary", "load_probe", "model_plan_summary", "what_if"]
