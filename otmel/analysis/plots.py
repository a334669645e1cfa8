"""Figures from finished experiments: the Fig. 3 analogue of a sweep (H@1 and MRR against the entropic
regularisation `reg` and against the measured mean plan entropy H(Pi)).

Reads only the sweep's rows.json (no Ray); matplotlib runs headless (Agg).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

from otmel.analysis.sweep_results import load_rows


def resolve_sweep(run: str, storage: str = "runs") -> Path:
    """A sweep directory given as a path or as a NAME under `storage`/sweeps; it must hold rows.json."""
    for cand in (Path(run), Path(storage) / "sweeps" / run):
        if (cand / "rows.json").exists():
            return cand
    raise FileNotFoundError(f"no rows.json in {run} or {Path(storage) / 'sweeps' / run} (is the sweep finished?)")


def _series(rows: list[dict[str, Any]], x_key: str, status: str, split: str) -> dict[str, list[float]]:
    pts = sorted((r for r in rows if r["status"] == status and isinstance(_x(r, x_key), float)),
                 key=lambda r: cast(float, _x(r, x_key)))  # a float: filtered above
    return {"x": [_x(r, x_key) for r in pts], **{m: [100 * r.get(f"{split}/{m}", math.nan) for r in pts]
                                                  for m in ("H@1", "MRR")}}


def _x(r: dict[str, Any], key: str) -> float | None:
    v = r["params"].get(key) if key in r.get("params", {}) else r.get(key)
    return float(v) if isinstance(v, int | float) else None


def plot_sweep(sweep: str | Path, out: str | Path | None = None, x_key: str = "model.reg") -> Path:
    """Write a PNG: test H@1 / MRR of finished trials (filled) and the last dev H@1 / MRR of trials
    stopped early (hollow) against `x_key` (log axis) and, where measured, against the plan entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = Path(sweep)
    rows, meta = load_rows(sweep)
    if not any(_x(r, x_key) is not None for r in rows):
        raise KeyError(f"no trial of {sweep} has a numeric {x_key!r}; swept: {meta.get('param_keys')}")
    with_h = [r for r in rows if isinstance(r.get("plan_entropy"), float) and r["status"] == "done"]
    ncols = 2 if with_h else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0), squeeze=False)
    colors = {"H@1": "tab:blue", "MRR": "tab:orange"}
    ax = axes[0][0]
    done, stopped = _series(rows, x_key, "done", "test"), _series(rows, x_key, "stopped", "dev")
    for m, c in colors.items():
        ax.plot(done["x"], done[m], "o-", color=c, label=f"{m} (test, finished)")
        if stopped["x"]:
            ax.plot(stopped["x"], stopped[m], "o", mfc="none", color=c, label=f"{m} (dev, stopped early)")
    others = [k for k in meta.get("param_keys", []) if k != x_key]
    if others:  # other swept keys vary too: label each finished point with its rank (see ranked.md)
        for r in rows:
            if r["status"] == "done" and _x(r, x_key) is not None and "rank" in r:
                ax.annotate(f"#{r['rank']}", (_x(r, x_key), 100 * r.get("test/MRR", math.nan)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color="0.35")
        ax.text(0.01, 0.01, "#k: rank in ranked.md; " + ", ".join(others) + " vary too", fontsize=6,
                transform=ax.transAxes, color="0.35")
    ax.set_xscale("log")
    ax.set_xlabel(f"{x_key} (entropic regularisation λ)" if x_key == "model.reg" else x_key)
    ax.set_ylabel("%")
    ax.set_title("H@1 and MRR vs " + x_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if with_h:
        ax2 = axes[0][1]
        pts = sorted(with_h, key=lambda r: r["plan_entropy"])
        for m, c in colors.items():
            ax2.plot([r["plan_entropy"] for r in pts], [100 * r.get(f"test/{m}", math.nan) for r in pts], "o-",
                     color=c, label=f"{m} (test)")
        ax2.set_xlabel("mean plan entropy H(Π) (nats)")
        ax2.set_ylabel("%")
        ax2.set_title("H@1 and MRR vs H(Π) (cf. paper Fig. 3)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.name}: {len(rows)} trials", fontsize=9)
    fig.tight_layout()
    path = Path(out) if out else sweep / f"{x_key.split('.')[-1]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
