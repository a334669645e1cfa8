"""`otmel study`: models x seeds, trained one after another on one local (or joined) Ray, resumable, with the
tables rewritten after every trial so that a long study can be read (and committed) while it runs.

Layout, under ``RUN.storage/studies/NAME/``:
- ``plan.json``     the study's fixed parameters (config, overrides); a resumed study must use the same ones
                    (models and seeds may be added);
- ``rows.jsonl``    one JSON line per finished (or failed) trial: variant, seed, metrics, dev curve, the learned
                    regularisers and the plan statistics of its best checkpoint;
- ``summary.md``    the tables (`otmel.analysis.study_tables`), rewritten after every trial;
- ``runs/V-sS/``    each trial's ordinary Ray Train run (results.json, checkpoints).

Trials run seed-major (every model with seed 0, then seed 1, ...), so an interrupted study always has paired
seeds. Re-running the same command skips the finished trials; an interrupted trial resumes from its last
checkpoint (Ray Train restores a run of the same name); a failed one is retried.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from otmel.analysis.study_tables import study_markdown
from otmel.io import atomic_write
from otmel.runconfig import load_config
from otmel.train.driver.launch import DEFAULT_CONFIG, fit, make_paths_absolute, prepare_data


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a reader skips a torn last line; the next line starts on its own)."""
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(obj, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The trials of rows.jsonl, the latest line of a (variant, seed) winning; torn lines are skipped."""
    if not path.exists():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[(r["variant"], int(r["seed"]))] = r
    return list(latest.values())


_write_text = atomic_write


def _check_plan(study: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Record the study's parameters; a resumed study must have the same config and overrides. Models and seeds
    accumulate over invocations (a queue may run one seed at a time). Returns the recorded plan."""
    f = study / "plan.json"
    if f.exists():
        old = json.loads(f.read_text())
        for k in ("config", "overrides"):
            if old.get(k) != plan[k]:
                raise ValueError(f"study {study.name} was started with {k}={old.get(k)!r}, not {plan[k]!r}: a "
                                 "study's parameters are fixed once it has started (use a new --name)")
        plan = {**plan, "variants": list(dict.fromkeys([*old.get("variants", []), *plan["variants"]])),
                "seeds": sorted({*old.get("seeds", []), *plan["seeds"]})}
    study.mkdir(parents=True, exist_ok=True)
    _write_text(f, json.dumps(plan, indent=2))
    return plan


def study_summary(study: Path) -> str:
    """The tables of a study folder from its plan.json and rows.jsonl (no training)."""
    plan = json.loads((study / "plan.json").read_text())
    rows = read_rows(study / "rows.jsonl")
    seeds = sorted({*plan.get("seeds", []), *(int(r["seed"]) for r in rows)})
    variants = list(dict.fromkeys([*plan.get("variants", []), *(r["variant"] for r in rows)]))
    meta = {"name": plan.get("name", study.name), "config": plan.get("config"), "overrides": plan.get("overrides", []),
            "seeds": seeds}
    pairs: list[tuple[str, str]] = [(str(a), str(b)) for a, b in plan.get("pairs", [])]
    return study_markdown(rows, variants, pairs, meta)


def _trial_row(results: dict[str, Any], variant: str, seed: int, plans: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in results["metrics"].items() if k.startswith(("dev/", "test/")) or k == "best_epoch"}
    curve = [[h["epoch"], h["dev/MRR"]] for h in results.get("history", []) if "dev/MRR" in h]
    return {"variant": variant, "seed": seed, "status": "done", "metrics": metrics, "dev_curve": curve,
            "run_dir": results["run_dir"], "checkpoint": results["checkpoint"],
            "wall_seconds": round(results["wall_seconds"], 1), **plans}


def _plan_probe(cfg_path: str, overrides: list[str], checkpoint: str | None) -> dict[str, Any]:
    """Learned regularisers and plan statistics of a trial's best weights (empty when it has no OT plans)."""
    if checkpoint is None:
        return {}
    from otmel.analysis.sharpness import checkpoint_plan_summary

    cfg = load_config(cfg_path, overrides)
    out = checkpoint_plan_summary(cfg, Path(checkpoint))
    return {"regs": {m: s["reg"] for m, s in out.items()}, "plans": out} if out else {}


def run_study(config: str | None, overrides: list[str] | None, *, name: str, variants: list[str],
              seeds: list[int], pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Train every variant with every seed (skipping finished trials), rewriting summary.md after each."""
    config = config or DEFAULT_CONFIG
    overrides = list(overrides or [])
    variants = [v.upper() for v in variants]
    for v in variants:  # fail before Ray starts on an unknown variant or a bad override
        load_config(config, [*overrides, f"model.variant={v}"])
    pairs = pairs or [(v, variants[0]) for v in variants[1:]]
    cfg = load_config(config, overrides)
    study = Path(cfg.run.storage).resolve() / "studies" / name
    plan = _check_plan(study, {"name": name, "config": config, "overrides": overrides, "variants": variants,
                               "seeds": seeds, "pairs": pairs})
    rows_file = study / "rows.jsonl"
    meta = {"name": name, "config": config, "overrides": overrides, "seeds": plan["seeds"]}
    variants_all = plan["variants"]
    done = {(r["variant"], int(r["seed"])) for r in read_rows(rows_file) if r.get("status") == "done"}
    todo = [(v, s) for s in seeds for v in variants if (v, s) not in done]
    print(f"[otmel] study {name}: {len(done)} trial(s) done, {len(todo)} to run -> {study}", flush=True)
    prepare_data(cfg)
    make_paths_absolute(cfg)
    for v, s in todo:
        trial_ov = [*overrides, f"model.variant={v}", f"train.seed={s}", f"run.storage={study / 'runs'}"]
        tcfg = load_config(config, trial_ov)
        make_paths_absolute(tcfg)
        t0 = time.perf_counter()
        try:
            results = fit(tcfg, f"{v}-s{s}")
            row = _trial_row(results, v, s, _plan_probe(config, trial_ov, results["checkpoint"]))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed trial does not end the study; it is retried on the next run
            row = {"variant": v, "seed": s, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=5), "wall_seconds": round(time.perf_counter() - t0, 1)}
        _append_line(rows_file, row)
        rows = read_rows(rows_file)
        _write_text(study / "summary.md", study_markdown(rows, variants_all, pairs, meta))
        m = row.get("metrics", {})
        print(f"[otmel] study {name}: {v} seed {s} {row['status']}"
              + (f" test H@1 {100 * m['test/H@1']:.2f} MRR {100 * m['test/MRR']:.2f}" if "test/MRR" in m else "")
              + f" ({row['wall_seconds']:.0f} s)", flush=True)
    rows = read_rows(rows_file)
    text = study_markdown(rows, variants_all, pairs, meta)
    _write_text(study / "summary.md", text)
    print("\n" + text)
    return {"path": str(study), "rows": rows, "summary": text}


__all__ = ["read_rows", "run_study", "study_summary"]
