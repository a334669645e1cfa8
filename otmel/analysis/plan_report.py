"""`otmel plans RUN...`: the plans of trained runs, per OT module, as a table and histograms.

For each run (a Ray Train run folder with results.json), its best weights score the first dev mentions against
the first KG entities; every plan is captured (`otmel.analysis.plans.capture_plans`) and summarised by the
distribution (10th / 50th / 90th percentile) of the cost range over reg, the normalised plan entropy and the
total-variation distance to attention of the same scores, with the what-if re-solves of
`otmel.analysis.sharpness` (the trained reg at 200 iterations; other regs at the trained budget).
"""

from __future__ import annotations

import json
from pathlib import Path

from otmel.analysis.plans import PlanCapture, capture_plans
from otmel.analysis.sharpness import WHAT_IF_REGS, load_probe, what_if
from otmel.runconfig import RunConfig

HIST_STATS = (("range_over_reg", "(max C − min C) / reg"), ("sd_over_reg", "sd(C) / reg"),
              ("row_entropy_ot", "plan row entropy / log(cols)"), ("row_entropy_att", "attention row entropy"),
              ("tv_att", "TV(plan rows, attention rows)"))


def run_capture(run: Path, mentions: int, entities: int) -> tuple[str, int, PlanCapture]:
    """(variant, n_iters, capture) of one run's best checkpoint."""
    res = json.loads((run / "results.json").read_text())
    cfg = RunConfig.from_dict(res["config"])
    if not res.get("checkpoint"):
        raise FileNotFoundError(f"{run}: results.json names no checkpoint")
    model, mb, eb = load_probe(cfg, Path(res["checkpoint"]), mentions, entities)
    model.eval()
    import torch

    with torch.no_grad(), capture_plans(model, keep_samples=True) as cap:
        model.score(model.encode_mentions(mb), model.encode_entities(eb))
    return cfg.model.variant, model.cfg.n_iters, cap


def _pct(row: dict[str, float], k: str) -> str:
    return f"{row[f'{k}_p10']:.2f} / {row[f'{k}_p50']:.2f} / {row[f'{k}_p90']:.2f}"


def report(runs: list[Path], out: Path | None = None, mentions: int = 16, entities: int = 32) -> str:
    """Markdown tables of every run's plans; with `out`, a PNG of the histograms."""
    caps: list[tuple[str, str, PlanCapture]] = []
    lines = ["| run | model | OT module | problems | reg | (max C − min C)/reg p10/p50/p90 | sd(C)/reg p50 | "
             "row entropy plan / att | TV(plan, att) | row max plan / att |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    regs = " | ".join(f"reg {r:.3g}" for r in WHAT_IF_REGS)
    whatif = [f"| run | OT module | as run | 200 iterations | {regs} |",
              "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in WHAT_IF_REGS) + " |"]
    for run in runs:
        variant, iters, cap = run_capture(run, mentions, entities)
        caps.append((run.name, variant, cap))
        for mod, row in cap.summary().items():
            lines.append(f"| {run.name} | {variant} | {mod} | {int(row['problems'])} | {row['reg']:.3g} | "
                         f"{_pct(row, 'range_over_reg')} | {row['sd_over_reg_p50']:.2f} | "
                         f"{row['row_entropy_ot']:.3f} / {row['row_entropy_att']:.3f} | {row['tv_att']:.3f} | "
                         f"{row['row_max_ot']:.3f} / {row['row_max_att']:.3f} |")
            rec = cap.samples[mod]
            cells = [what_if(rec, rec.reg, iters), what_if(rec, rec.reg, 200)]
            cells += [what_if(rec, r, iters) for r in WHAT_IF_REGS]
            whatif.append(f"| {run.name} | {mod} | " + " | ".join(f"{c['row_entropy_ot']:.3f}" for c in cells) + " |")
    text = ("Plans of the trained checkpoints\n\n" + "\n".join(lines)
            + "\n\nRow entropy of the plan (/ log columns) of each module's first batch of learned costs, re-solved "
            "(as run: the model's reg and iterations)\n\n"
            + "\n".join(whatif) + "\n")
    if out is not None:
        _histograms(caps, out)
        text += f"\nhistograms: {out}\n"
    return text


def _histograms(caps: list[tuple[str, str, PlanCapture]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = sorted({m for _, _, c in caps for m in c.stats})
    fig, axes = plt.subplots(len(modules), len(HIST_STATS), figsize=(4.2 * len(HIST_STATS), 2.8 * len(modules)),
                             squeeze=False, layout="constrained")
    for i, mod in enumerate(modules):
        for j, (stat, label) in enumerate(HIST_STATS):
            ax = axes[i, j]
            for name, variant, cap in caps:
                v = cap.values(mod, stat)
                if v.numel():
                    ax.hist(v.numpy(), bins=40, histtype="step", density=True, label=f"{variant} ({name})")
            ax.set_title(f"{mod}: {label}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


__all__ = ["report", "run_capture"]
