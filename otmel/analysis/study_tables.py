"""Tables of a seed study (`otmel study`): per-model mean +- 95% CI and paired differences, from plain row dicts.

A row is one finished trial: ``{"variant", "seed", "status", "metrics": {"test/H@1": ..., ...}, "dev_curve":
[[epoch, dev MRR], ...], "plans": {module: {stat: value}}, "regs": {module: reg}}`` (metrics as fractions; the
tables show %). No Ray here: the tables are tested on synthetic rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from otmel.analysis.stats import paired, summarize

METRICS = ("H@1", "MRR")


def per_seed(rows: list[dict[str, Any]], split: str, metric: str) -> dict[str, dict[int, float]]:
    """variant -> seed -> metric in % (finished rows only)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        v = r.get("metrics", {}).get(f"{split}/{metric}")
        if r.get("status") == "done" and isinstance(v, int | float):
            out[r["variant"]][int(r["seed"])] = 100.0 * float(v)
    return out


def _ci(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} ± {half:.2f}"


def _interval(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.2f}" if math.isnan(half) else f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def model_table(rows: list[dict[str, Any]], variants: list[str], split: str = "test") -> str:
    """| model | seeds | H@1 | MRR | dev MRR by epoch |: mean ± 95% CI half-width over seeds, in %."""
    vals = {m: per_seed(rows, split, m) for m in METRICS}
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") == "done":
            for ep, mrr in r.get("dev_curve", []):
                curves[r["variant"]][int(ep)].append(100.0 * float(mrr))
    lines = [f"| model | seeds | {split} H@1 | {split} MRR | dev MRR by epoch (mean over seeds) |",
             "| --- | ---: | ---: | ---: | --- |"]
    for v in variants:
        s = {m: summarize(list(vals[m].get(v, {}).values())) for m in METRICS}
        curve = ", ".join(f"{ep}: {sum(x) / len(x):.2f}" for ep, x in sorted(curves[v].items())) or "–"
        lines.append(f"| {v} | {s['H@1'].n} | {_ci(s['H@1'].mean, s['H@1'].ci95)} | "
                     f"{_ci(s['MRR'].mean, s['MRR'].ci95)} | {curve} |")
    return "\n".join(lines)


def paired_table(rows: list[dict[str, Any]], pairs: list[tuple[str, str]], split: str = "test") -> str:
    """| a − b | seeds | ΔH@1 [95% CI] | ΔMRR [95% CI] | p (t) | p (sign flip) | called |, paired by seed, in %."""
    vals = {m: per_seed(rows, split, m) for m in METRICS}
    lines = [f"| a − b | paired seeds | Δ{split} H@1 [95% CI] | Δ{split} MRR [95% CI] | MRR p (paired t) | "
             "MRR p (exact sign flip) | called (MRR) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for a, b in pairs:
        ph = paired(vals["H@1"].get(a, {}), vals["H@1"].get(b, {}))
        pm = paired(vals["MRR"].get(a, {}), vals["MRR"].get(b, {}))
        verdict = {">": f"{a} > {b}", "<": f"{a} < {b}", "≈": "no difference resolved", "?": "too few seeds"}
        p_t = "–" if math.isnan(pm.p_t) else f"{pm.p_t:.3f}"
        p_s = "–" if math.isnan(pm.p_sign) else f"{pm.p_sign:.3f}"
        lines.append(f"| {a} − {b} | {pm.diff.n} | {_interval(ph.diff.mean, ph.diff.ci95)} | "
                     f"{_interval(pm.diff.mean, pm.diff.ci95)} | {p_t} | {p_s} | {verdict[pm.called]} |")
    return "\n".join(lines)


def plans_table(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """Per model and OT module, the plan statistics of the trained checkpoints (mean over seeds of the per-trial
    means; `otmel.analysis.plans`)."""
    keys = ("reg", "range_over_reg", "sd_over_reg", "row_entropy_ot", "row_entropy_att", "tv_att", "row_max_ot",
            "row_max_att")
    acc: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") != "done" or r["variant"] not in variants:
            continue
        for mod, st in (r.get("plans") or {}).items():
            for k in keys:
                if isinstance(st.get(k), int | float):
                    acc[(r["variant"], mod)][k].append(float(st[k]))
    if not acc:
        return ""
    lines = ["| model | OT module | seeds | reg | (max C − min C) / reg | sd(C) / reg | row entropy: plan | "
             "row entropy: attention | TV(plan, attention) | row max: plan | row max: attention |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (v, mod), st in sorted(acc.items(), key=lambda kv: (variants.index(kv[0][0]), kv[0][1])):
        def m(k: str, st: dict[str, list[float]] = st) -> str:
            x = st.get(k, [])
            return f"{sum(x) / len(x):.3f}" if x else "–"
        lines.append(f"| {v} | {mod} | {len(st['reg'])} | {m('reg')} | {m('range_over_reg')} | {m('sd_over_reg')} | "
                     f"{m('row_entropy_ot')} | {m('row_entropy_att')} | {m('tv_att')} | {m('row_max_ot')} | "
                     f"{m('row_max_att')} |")
    return "\n".join(lines)


def study_markdown(rows: list[dict[str, Any]], variants: list[str], pairs: list[tuple[str, str]],
                   meta: dict[str, Any]) -> str:
    seeds = sorted({*meta.get("seeds", []), *(int(r["seed"]) for r in rows if "seed" in r)})
    done = len({(r["variant"], int(r["seed"])) for r in rows
                if r.get("status") == "done" and r.get("variant") in variants})
    head = (f"# Study {meta.get('name', '')}\n\nconfig `{meta.get('config')}`, overrides "
            f"`{' '.join(meta.get('overrides', [])) or '(none)'}`, seeds {seeds}; "
            f"{done} of {len(variants) * len(seeds)} trials finished.\n"
            "Metrics in %, mean ± 95% t-interval half-width over seeds; differences are paired by seed and called "
            "only when their 95% interval excludes zero.\n")
    parts = [head, model_table(rows, variants), "", paired_table(rows, pairs)]
    plans = plans_table(rows, variants)
    if plans:
        parts += ["", "Plans of the trained checkpoints (16 dev mentions x 32 KG entities per trial):", "", plans]
    return "\n".join(parts) + "\n"


__all__ = ["model_table", "paired_table", "per_seed", "plans_table", "study_markdown"]
