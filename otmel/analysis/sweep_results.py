"""Results of a sweep: one row per trial, ranked, written as markdown, CSV, JSON and the best run config.

No Ray needed except in `rows_from_grid` (which only reads a `ResultGrid`): the table builders work on
plain row dicts, so they are tested on synthetic rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from otmel.runconfig import RunConfig

METRIC_COLS = ("dev/H@1", "dev/MRR", "test/H@1", "test/MRR")
EXTRA_COLS = ("plan_entropy", "plan_entropy_norm")
STATUS_ORDER = {"done": 0, "stopped": 1, "unfinished": 2, "error": 3}


def _trial_statuses(grid: Any) -> list[str | None]:
    """Tune's status of each trial, in the grid's order (ResultGrid has no public per-result status)."""
    try:
        return [str(t.status) for t in grid._experiment_analysis.trials]
    except AttributeError:  # a future Ray: fall back to "finished unless it has an error"
        return [None] * len(grid)


def rows_from_grid(grid: Any, param_keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial of a Tune `ResultGrid`: its sampled params, last metrics, epochs run and status
    (`done`: trained to the end and tested; `stopped`: stopped early by the scheduler; `unfinished`: the
    sweep was interrupted before it ended, resumable; `error`)."""
    rows = []
    for r, tune_status in zip(grid, _trial_statuses(grid), strict=True):
        m = dict(r.metrics or {})
        cfg = dict(r.config or {})
        params = {k: cfg.get("params", {}).get(k) for k in param_keys}
        trial_id = str(m.get("trial_id") or Path(r.path).name)
        df = r.metrics_dataframe
        epochs = m.get("epoch", 0)
        if df is not None and "epoch" in df and df["epoch"].notna().any():
            epochs = int(df["epoch"].max())
        status = "error" if r.error else ("done" if "test/MRR" in m else "stopped")
        if status == "stopped" and tune_status not in (None, "TERMINATED"):
            status = "unfinished"
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": int(epochs or 0), "params": params,
                               "train_run": f"{cfg.get('train_storage', '')}/train-{trial_id}"}
        for k in (*METRIC_COLS, "dev/H@3", "dev/H@5", "test/H@3", "test/H@5", "best_epoch", *EXTRA_COLS):
            if isinstance(m.get(k), int | float):
                row[k] = float(m[k])
        if r.error:
            row["error"] = str(r.error).splitlines()[0][:200]
        rows.append(row)
    return rows


def unfinished(rows: list[dict[str, Any]]) -> int:
    """How many trials an interrupted sweep left to finish (0 when it ran to the end)."""
    return sum(r["status"] == "unfinished" for r in rows)


def rank_rows(rows: list[dict[str, Any]], metric: str = "dev/MRR", mode: str = "max") -> list[dict[str, Any]]:
    """Finished trials first, then early-stopped, unfinished, failed ones; within each, best `metric` first
    (a missing metric ranks last)."""
    sign = -1.0 if mode == "max" else 1.0

    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = r.get(metric)
        return STATUS_ORDER.get(r["status"], 3), sign * v if isinstance(v, float) and not math.isnan(v) else math.inf

    ranked = sorted(rows, key=key)
    return [{**r, "rank": i + 1} for i, r in enumerate(ranked)]


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "–"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in EXTRA_COLS if any(c in r for r in rows)]


def ranked_markdown(rows: list[dict[str, Any]], param_keys: list[str]) -> str:
    """The ranked table (metrics in %); the numbers of early-stopped trials are those of their last epoch."""
    extra = _columns(rows)
    head = ["rank", "trial", "status", "epochs", *param_keys, *METRIC_COLS, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i < 3 else " ---: " for i in
                                                         range(len(head))) + "|"]
    for r in rows:
        cells = [str(r.get("rank", "")), r["trial_id"], r["status"], str(r["epochs"]),
                 *(_fmt_param(r["params"].get(k)) for k in param_keys), *(_pct(r.get(c)) for c in METRIC_COLS),
                 *(f"{r[c]:.3f}" if isinstance(r.get(c), float) else "–" for c in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranked_csv(rows: list[dict[str, Any]], param_keys: list[str]) -> str:
    """The same rows as CSV, raw fractions (not %), one column per swept key."""
    cols = ["rank", "trial_id", "status", "epochs", *param_keys, *METRIC_COLS, "best_epoch", *EXTRA_COLS,
            "train_run"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r.get("rank", ""), r["trial_id"], r["status"], r["epochs"],
                    *(r["params"].get(k) for k in param_keys),
                    *(r.get(c, "") for c in (*METRIC_COLS, "best_epoch", *EXTRA_COLS)), r.get("train_run", "")])
    return buf.getvalue()


def best_config_yaml(cfg: RunConfig, header: str = "") -> str:
    """A complete run config as YAML that `load_config` (and so `otmel train --config`) reads back."""
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + body


def write_sweep_outputs(
    exp: Path, rows: list[dict[str, Any]], param_keys: list[str], metric: str, best_cfg: RunConfig | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write rows.json, ranked.md, ranked.csv and (when a trial finished) best.yaml into `exp`."""
    exp.mkdir(parents=True, exist_ok=True)
    table = ranked_markdown(rows, param_keys)
    (exp / "rows.json").write_text(json.dumps({"meta": {**meta, "metric": metric, "param_keys": param_keys},
                                               "rows": rows}, indent=2, default=str))
    (exp / "ranked.md").write_text(f"Ranked by {metric} (finished trials first); metrics in %.\n\n{table}\n")
    (exp / "ranked.csv").write_text(ranked_csv(rows, param_keys))
    out: dict[str, Any] = {"table": table}
    if best_cfg is not None:
        best = rows[0]
        header = (f"Best trial {best['trial_id']} of the sweep in {exp} ({metric} = {best.get(metric)});\n"
                  "use: otmel train --config THIS_FILE")
        path = exp / "best.yaml"
        path.write_text(best_config_yaml(best_cfg, header))
        out["best_yaml"] = str(path)
    return out


def load_rows(sweep: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and meta of a finished sweep directory (its rows.json)."""
    blob = json.loads((Path(sweep) / "rows.json").read_text())
    return blob["rows"], blob["meta"]
