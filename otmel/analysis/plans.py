"""What the OT modules of a model compute: plan capture and per-problem statistics of the plans.

`capture_plans(model)` registers a plan hook (`CorrelationAssignment.register_plan_hook`) on every OT module of a
model, so every plan is seen whichever path computes it (the dense training path, or the factored inference path
of the pairwise matcher), and reduces each batch of problems to per-problem statistics at once (the plans are
not kept). For one problem with valid cells V (rows i, columns j), plan Pi, cost C and regulariser reg:

- ``entropy``: H(Pi / sum Pi) over V (nats); ``entropy_norm``: H / log |V| (1 = uniform, 0 = one cell);
- ``cost_range``: max C - min C over V; ``range_over_reg``: cost_range / reg, the dynamic range of the Gibbs
  kernel exp(-C / reg) in nats (near 0: every kernel entry is equal and so is the plan, whatever the costs);
- ``sd_over_reg``: the standard deviation of C over V divided by reg: how spread the kernel's exponents are
  (a softmax of logits with standard deviation s loses about s^2 / 2 nats of entropy; the range is set by the
  extremes, the sharpness by the bulk);
- ``tv_att``: the mean over valid rows of the total-variation distance between the OT assignment (the plan's
  rows renormalised, A = n Pi) and the attention map of the same scores, softmax_j(-C_ij / reg) over the
  valid columns (the first row update of Sinkhorn; what attention with logits cos / (2 reg) computes);
- ``row_max_ot`` / ``row_max_att``: the mean over valid rows of the largest weight of a row of each map (1: a row
  concentrates on one element; 1 / m: spread evenly). The paper's claim is row_max_att > row_max_ot.
- ``row_entropy_ot`` / ``row_entropy_att``: the mean over valid rows of each map's row entropy divided by
  log(valid columns) (1: uniform rows). Unlike ``entropy_norm`` (the joint plan, which uniform marginals keep at
  >= log n / log(n m), about 0.5, even for a permutation), these compare like with like.

Modules are named as in `model.named_modules()` ("fusion.v2t", "fusion.t2v", "match_t.ca", "match_v.ca").
Everything here is plain PyTorch: no Ray, no argparse.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from otmel.model.assign import CorrelationAssignment, PlanRecord

STATS = ("entropy", "entropy_norm", "cost_range", "range_over_reg", "sd_over_reg", "tv_att", "row_max_ot",
         "row_max_att", "row_entropy_ot", "row_entropy_att")


def ot_modules(model: nn.Module) -> dict[str, CorrelationAssignment]:
    """The OT correlation-assignment modules of `model` by name (attention modules have no plans)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CorrelationAssignment) and m.kind == "ot"}


def problem_stats(rec: PlanRecord) -> dict[str, torch.Tensor]:
    """The statistics of the module docstring for every problem of `rec` with >= 2 valid cells: 1-d tensors."""
    plan, cost = rec.plan.double(), rec.cost.double()  # (..., n, m)
    mx, my = rec.mask_x.bool().unsqueeze(-1), rec.mask_y.bool().unsqueeze(-2)  # (..., n, 1), (..., 1, m)
    valid = (mx & my).expand(torch.broadcast_shapes(plan.shape, cost.shape))
    plan, cost = plan.expand_as(valid), cost.expand_as(valid)
    cells = valid.sum((-1, -2))  # (...,)
    keep = cells > 1
    p = torch.where(valid, plan, 0.0)
    p = p / p.sum((-1, -2), keepdim=True).clamp_min(1e-300)  # mass 1 per problem
    h = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0).sum((-1, -2))
    big = torch.finfo(torch.float64).max
    c_hi = torch.where(valid, cost, -big).amax((-1, -2))
    c_lo = torch.where(valid, cost, big).amin((-1, -2))
    rows = valid.any(-1)  # (..., n) rows with a valid cell
    n_rows = rows.sum(-1).clamp_min(1)
    a_ot = p / p.sum(-1, keepdim=True).clamp_min(1e-300)  # row-stochastic on valid rows
    logits = torch.where(valid, -cost / rec.reg, -big)
    a_att = torch.where(valid, torch.softmax(logits, -1), 0.0)
    tv = 0.5 * (a_ot - a_att).abs().sum(-1)  # (..., n)
    cols = valid.sum(-1).clamp_min(2).double().log()  # (..., n) log(valid columns) per row
    c_mean = torch.where(valid, cost, 0.0).sum((-1, -2)) / cells.clamp_min(1)
    c_var = torch.where(valid, (cost - c_mean[..., None, None]) ** 2, 0.0).sum((-1, -2)) / cells.clamp_min(1)

    def row_entropy(a: torch.Tensor) -> torch.Tensor:
        return -torch.where(a > 0, a * a.clamp_min(1e-300).log(), 0.0).sum(-1) / cols

    def row_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(rows, x, 0.0).sum(-1) / n_rows

    out = {
        "entropy": h, "entropy_norm": h / cells.clamp_min(2).double().log(), "cost_range": c_hi - c_lo,
        "range_over_reg": (c_hi - c_lo) / rec.reg, "sd_over_reg": c_var.sqrt() / rec.reg, "tv_att": row_mean(tv),
        "row_max_ot": row_mean(a_ot.amax(-1)), "row_max_att": row_mean(a_att.amax(-1)),
        "row_entropy_ot": row_mean(row_entropy(a_ot)), "row_entropy_att": row_mean(row_entropy(a_att)),
    }
    return {k: v[keep].flatten().float() for k, v in out.items()}


@dataclass
class PlanCapture:
    """Per-module lists of per-problem statistics, plus how many batches of plans each path reported."""

    stats: dict[str, dict[str, list[torch.Tensor]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    calls: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    reg: dict[str, float] = field(default_factory=dict)
    samples: dict[str, PlanRecord] = field(default_factory=dict)  # each module's first batch (keep_samples=True)

    def values(self, module: str, stat: str) -> torch.Tensor:
        parts = self.stats.get(module, {}).get(stat, [])
        return torch.cat(parts) if parts else torch.empty(0)

    def problems(self, module: str) -> int:
        return int(self.values(module, "entropy").numel())

    def summary(self) -> dict[str, dict[str, float]]:
        """Per module: the number of problems, the regulariser, and the mean / 10th / 50th / 90th percentile of
        every statistic."""
        out: dict[str, dict[str, float]] = {}
        for mod in self.stats:
            row: dict[str, float] = {"problems": float(self.problems(mod)), "reg": self.reg[mod]}
            for st in STATS:
                v = self.values(mod, st)
                if v.numel():
                    q = torch.quantile(v.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
                    row.update({st: float(v.mean()), f"{st}_p10": float(q[0]), f"{st}_p50": float(q[1]),
                                f"{st}_p90": float(q[2])})
            out[mod] = row
        return out

    def pooled(self, stat: str) -> torch.Tensor:
        """One statistic over the problems of every module."""
        parts = [self.values(m, stat) for m in self.stats]
        return torch.cat(parts) if parts else torch.empty(0)


@contextmanager
def capture_plans(model: nn.Module, keep_samples: bool = False) -> Iterator[PlanCapture]:
    """Within the block, every plan of every OT module of `model` is reduced into the yielded `PlanCapture`;
    with `keep_samples`, each module's first batch of plans is also kept whole (`PlanCapture.samples`)."""
    cap = PlanCapture()
    names = {id(m): n for n, m in ot_modules(model).items()}

    def hook(mod: CorrelationAssignment, rec: PlanRecord) -> None:
        name = names[id(mod)]
        cap.calls[name][rec.path] += 1
        cap.reg[name] = rec.reg
        if keep_samples and name not in cap.samples:
            cap.samples[name] = rec
        for k, v in problem_stats(rec).items():
            cap.stats[name][k].append(v)

    handles = [m.register_plan_hook(hook) for m in ot_modules(model).values()]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


__all__ = ["STATS", "PlanCapture", "capture_plans", "ot_modules", "problem_stats"]
