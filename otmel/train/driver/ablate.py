"""The Table-2 ablation grid: every variant x N seeds, each a Tune trial (a full Ray Train run of the
ordinary code path, `otmel.train.driver.tune.trial_driver`), summarised as Table 2 (mean +- std over seeds and
the change vs the full model), written as markdown and CSV next to the Tune experiment.

The aggregation and table builders work on plain row dicts (no Ray), so they are tested on synthetic rows.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from otmel.config import TABLE2_VARIANTS
from otmel.runconfig import load_config
from otmel.train.driver.launch import DEFAULT_CONFIG, make_paths_absolute, prepare_data

# The paper's names (Table 2) and its RichpediaMEL numbers (H@1, MRR in %), for reference in the tables.
DESCRIPTIONS: dict[str, str] = {
    "OT": "OT-MEL (OT)", "F1": "FusM: OT -> ATT", "F2": "w/o FusM", "M1": "UniM: OT -> ATT",
    "M2": "w/o UniM", "A1": "ATT (w/o OT)", "O1": "SoftPool -> Mean", "O2": "SoftPool -> Max",
    "KD": "OT-MEL (KL distillation)", "K1": "KD -> MSE", "K2": "KD -> UniKL",
}
PAPER: dict[str, tuple[float, float]] = {
    "OT": (83.30, 88.27), "F1": (80.60, 86.70), "F2": (78.94, 85.42), "M1": (81.72, 87.61),
    "M2": (73.95, 81.85), "A1": (78.33, 85.28), "O1": (80.80, 86.55), "O2": (82.28, 87.25),
    "KD": (82.57, 87.78), "K1": (81.95, 87.34), "K2": (81.84, 87.33),
}
METRICS = ("H@1", "MRR")
PARAM_KEYS = ["model.variant", "train.seed"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]], split: str = "test", ref: str = "OT") -> list[dict[str, Any]]:
    """Per variant (in first-seen order): n finished seeds, mean and sample std of H@1 / MRR in %, the
    difference of means vs `ref` (negative: worse) and its standard error, and the paper's mean change
    ΔAvg = mean of the H@1 and MRR differences. Rows are trial rows with `params` and `{split}/H@1`..."""
    by: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        v = str(r["params"]["model.variant"])
        vals = by.setdefault(v, {m: [] for m in METRICS})
        if r.get("status", "done") == "done" and all(isinstance(r.get(f"{split}/{m}"), float) for m in METRICS):
            for m in METRICS:
                vals[m].append(100.0 * r[f"{split}/{m}"])
    out = []
    for v, vals in by.items():
        row: dict[str, Any] = {"variant": v, "description": DESCRIPTIONS.get(v, v), "n": len(vals["H@1"]),
                               "seeds_values": vals}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(vals[m])
        out.append(row)
    base = next((r for r in out if r["variant"] == ref), None)
    for row in out:
        for m in METRICS:
            if base is None or row["n"] == 0 or base["n"] == 0:
                row[f"d{m}"], row[f"d{m}_se"] = math.nan, math.nan
                continue
            row[f"d{m}"] = row[f"{m}_mean"] - base[f"{m}_mean"]
            row[f"d{m}_se"] = math.sqrt(row[f"{m}_std"] ** 2 / row["n"] + base[f"{m}_std"] ** 2 / base["n"])
        row["dAvg"] = (row["dH@1"] + row["dMRR"]) / 2
    return out


def _pm(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.2f}"


def ablation_markdown(agg: list[dict[str, Any]], ref: str = "OT") -> str:
    """Table 2 style: H@1 and MRR (mean ± std over seeds, %), Δ vs `ref`, and the paper's numbers."""
    lines = ["| No. | variant | seeds | H@1 | MRR | ΔH@1 | ΔMRR | ΔAvg | paper H@1 / MRR |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in agg:
        paper = PAPER.get(r["variant"])
        lines.append(
            f"| {r['variant']} | {r['description']} | {r['n']} | {_pm(r['H@1_mean'], r['H@1_std'])} | "
            f"{_pm(r['MRR_mean'], r['MRR_std'])} | "
            + (" | ".join(["–"] * 3) if r["variant"] == ref else
               f"{_signed(r['dH@1'])} | {_signed(r['dMRR'])} | {_signed(r['dAvg'])}")
            + f" | {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '–'} |")
    return "\n".join(lines)


def ablation_csv(agg: list[dict[str, Any]]) -> str:
    cols = ["variant", "description", "n", "H@1_mean", "H@1_std", "MRR_mean", "MRR_std", "dH@1", "dH@1_se",
            "dMRR", "dMRR_se", "dAvg", "paper_H@1", "paper_MRR"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in agg:
        paper = PAPER.get(r["variant"], (math.nan, math.nan))
        w.writerow([*(r[c] if not isinstance(r[c], float) else f"{r[c]:.4f}" for c in cols[:-2]), *paper])
    return buf.getvalue()


def _compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'>' / '<' when the MRR means differ by more than 2 standard errors of the difference, else '≈'."""
    d = a["MRR_mean"] - b["MRR_mean"]
    se = math.sqrt(a["MRR_std"] ** 2 / max(a["n"], 1) + b["MRR_std"] ** 2 / max(b["n"], 1))
    if math.isnan(d):
        return "?"
    if abs(d) <= 2 * se or (se == 0 and abs(d) < 1e-9):
        return "≈"
    return ">" if d > 0 else "<"


def orderings(agg: list[dict[str, Any]]) -> list[str]:
    """The paper's claims checked on MRR (H@1 given alongside): 'holds', 'reversed' or 'within noise'
    (means closer than 2 standard errors of the difference over the seeds)."""
    by = {r["variant"]: r for r in agg if r["n"] > 0}
    claims = [("OT", "A1", "OT > ATT (A1)"), ("OT", "F1", "OT > FusM with ATT (F1)"),
              ("OT", "M1", "OT > UniM with ATT (M1)"), ("OT", "M2", "full > w/o UniM (M2)"),
              ("OT", "F2", "full > w/o FusM (F2)"), ("OT", "O1", "SoftPool > mean (O1)"),
              ("OT", "O2", "SoftPool > max (O2)"), ("OT", "KD", "KD below OT"), ("KD", "A1", "KD above ATT (A1)"),
              ("KD", "K1", "KL > MSE distillation (K1)"), ("KD", "K2", "KL > one-way KL (K2)")]
    out = []
    for hi, lo, text in claims:
        if hi not in by or lo not in by:
            continue
        a, b = by[hi], by[lo]
        c = _compare(a, b)
        verdict = {">": "holds", "<": "reversed", "≈": "within noise", "?": "unknown"}[c]
        out.append(f"{text}: {verdict} — MRR {a['MRR_mean']:.2f}±{a['MRR_std']:.2f} vs "
                   f"{b['MRR_mean']:.2f}±{b['MRR_std']:.2f}, H@1 {a['H@1_mean']:.2f} vs {b['H@1_mean']:.2f}")
    return out


def write_ablation_outputs(exp: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write ablation.md, ablation.csv and rows.json into `exp`; returns the table and the orderings."""
    agg = aggregate(rows)
    table = ablation_markdown(agg)
    checks = orderings(agg)
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "rows.json").write_text(json.dumps({"meta": {**meta, "param_keys": PARAM_KEYS}, "rows": rows},
                                              indent=2, default=str))
    (exp / "ablation.md").write_text(
        f"Test split, metrics in %, mean ± sample std over seeds; Δ = variant mean − OT mean.\n\n{table}\n\n"
        + "\n".join(f"- {c}" for c in checks) + "\n")
    (exp / "ablation.csv").write_text(ablation_csv(agg))
    return {"table": table, "orderings": checks, "aggregate": agg}


def run_ablation(
    config: str | None = None, overrides: list[str] | None = None, *, variants: list[str] | None = None,
    seeds: list[int] | None = None, name: str | None = None, resume: bool = False, concurrent: int = 1,
) -> dict[str, Any]:
    """Train every variant with every seed (one Tune trial each, `concurrent` at a time), then write and
    print the Table-2 style summary. Returns the rows, the summary and the experiment path."""
    from ray import tune

    from otmel.analysis.sweep_results import rows_from_grid, unfinished
    from otmel.train.driver.tune import init_ray_for_trials, run_trials

    variants = [v.upper() for v in (variants or list(TABLE2_VARIANTS))]
    seeds = list(seeds if seeds is not None else [0, 1])
    config = config or DEFAULT_CONFIG
    for v in variants:  # fail before Ray starts on an unknown variant
        load_config(config, [*(overrides or []), f"model.variant={v}"])
    cfg = load_config(config, overrides)
    name = name or f"ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_data(cfg)
    base = copy.deepcopy(cfg)
    make_paths_absolute(base)
    init_ray_for_trials(base, concurrent)
    grid_points = [{"model.variant": v, "train.seed": s} for s in seeds for v in variants]
    t0 = time.perf_counter()
    grid, exp = run_trials(
        base, tune.grid_search(grid_points), name=name, resume=resume,
        tune_config={"num_samples": 1, "max_concurrent_trials": concurrent},
    )
    wall = time.perf_counter() - t0
    rows = rows_from_grid(grid, PARAM_KEYS)
    out = write_ablation_outputs(exp, rows, {"config": config, "overrides": list(overrides or []),
                                             "variants": variants, "seeds": seeds, "wall_seconds": wall})
    print("\n" + out["table"] + "\n\n" + "\n".join(out["orderings"]))
    print(f"\nablation directory: {exp}\nwall time:          {wall:.0f} s")
    left = unfinished(rows)
    if left:
        print(f"INTERRUPTED: {left} trial(s) unfinished (the table covers the finished ones); continue with\n"
              f"  otmel ablate --name {name} --resume --config {config} [the same overrides]")
    return {"rows": rows, "path": str(exp), "wall_seconds": wall, "unfinished": left, **out}
