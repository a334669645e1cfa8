"""Seed studies without Ray: t statistics against known values, the paired tables on synthetic rows and on the
committed study rows (docs/studies/data/), and the resumable driver with `fit` replaced by a stand-in (the real
Ray Train path is exercised by test_train_ray.py)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from otmel.analysis.stats import paired, sign_flip_p, summarize
from otmel.analysis.study_tables import model_table, paired_table, plans_table, study_markdown
from otmel.cli import build_parser, main
from otmel.train.driver import study as study_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("df", "q"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_interval_uses_the_t_quantiles_of_the_tables(df: int, q: float) -> None:
    xs = [float(i % 3) + 0.1 * i for i in range(df + 1)]
    s = summarize(xs)
    assert s.ci95 / (s.sd / math.sqrt(df + 1)) == pytest.approx(q, abs=2e-4)


def _sign_flip_by_enumeration(d: list[float]) -> float:
    obs = abs(sum(d)) - 1e-12
    hits = sum(abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= obs
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_sign_flip_is_exact() -> None:
    """scipy's permutation test over every sign pattern equals the enumeration of all 2^n of them."""
    rng = random.Random(0)
    for _ in range(50):
        d = [round(rng.gauss(0, 1), rng.randint(0, 2)) for _ in range(rng.randint(2, 8))]
        assert sign_flip_p(d) == pytest.approx(_sign_flip_by_enumeration(d), abs=1e-12), d
    assert sign_flip_p([0.3]) == 1.0 and math.isnan(sign_flip_p([]))
    with pytest.raises(ValueError, match="at most 16 seeds"):
        sign_flip_p([1.0] * 17)


def test_summary_and_paired_difference() -> None:
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0) and s.ci95 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert math.isnan(summarize([5.0]).ci95) and summarize([]).n == 0
    a = {0: 80.0, 1: 82.0, 2: 81.0, 3: 79.0, 4: 83.0}
    b = {s: v - 1.0 + 0.1 * s for s, v in a.items()}  # a is ahead by 1.0 - 0.1 s: 1.0 .. 0.6
    p = paired(a, b)
    assert p.diff.n == 5 and p.diff.mean == pytest.approx(0.8) and p.called == ">"
    assert p.p_t < 0.001 and p.p_sign == pytest.approx(2 / 32)  # all 5 positive: 2 of 32 sign patterns
    # unpaired seeds are ignored; a noisy difference is not called
    noisy = paired({0: 1.0, 1: -1.0, 2: 0.5, 7: 9.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert noisy.diff.n == 3 and noisy.called == "≈" and noisy.p_t > 0.5
    assert paired({0: 1.0}, {0: 0.0}).called == "?"
    assert sign_flip_p([1.0, -1.0]) == 1.0


def _row(variant: str, seed: int, mrr: float, status: str = "done", plans: dict | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"variant": variant, "seed": seed, "status": status}
    if status == "done":
        r.update(metrics={"test/H@1": mrr - 0.1, "test/MRR": mrr}, dev_curve=[[2, mrr - 0.05], [4, mrr]])
    if plans:
        r["plans"] = plans
    return r


def test_tables_on_synthetic_rows() -> None:
    st = {"match_t.ca": {"reg": 0.05, "range_over_reg": 8.0, "entropy_norm": 0.9, "tv_att": 0.3, "row_max_ot": 0.1,
                         "row_max_att": 0.3}}
    rows = [_row("OT", s, 0.80 + 0.01 * s, plans=st) for s in range(3)]
    rows += [_row("A1", s, 0.78 + 0.01 * s) for s in range(3)] + [_row("A1", 3, 0.0, status="failed")]
    t = model_table(rows, ["OT", "A1"])
    assert "| OT | 3 | 71.00 ± 2.48 | 81.00 ± 2.48 | 2: 76.00, 4: 81.00 |" in t
    p = paired_table(rows, [("OT", "A1")])
    assert "| OT − A1 | 3 | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] |" in p and "OT > A1" in p
    pt = plans_table(rows, ["OT", "A1"])
    assert "| OT | match_t.ca | 3 | 0.050 | 8.000 | – | – | – | 0.300 | 0.100 | 0.300 |" in pt  # older rows: no sd
    md = study_markdown(rows, ["OT", "A1"], [("OT", "A1")], {"name": "x", "seeds": [0, 1, 2, 3]})
    assert "6 of 8 trials finished" in md


def _fake_fit(calls: list[str], fail: set[str]):  # type: ignore[no-untyped-def]
    def fit(cfg, run_name, **kw):  # type: ignore[no-untyped-def]
        calls.append(run_name)
        if run_name in fail:
            raise RuntimeError("worker died")
        v, s = cfg.model.variant, cfg.train.seed
        mrr = {"OT": 0.8, "A1": 0.7}[v] + 0.01 * s
        return {"run_dir": f"/runs/{run_name}", "checkpoint": None, "wall_seconds": 1.0,
                "metrics": {"test/MRR": mrr, "test/H@1": mrr - 0.1, "dev/MRR": mrr, "train/loss": 1.0},
                "history": [{"epoch": 1, "dev/MRR": mrr}]}
    return fit


def test_study_resumes_skips_finished_and_retries_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(study_mod, "prepare_data", lambda cfg: None)
    monkeypatch.setattr(study_mod, "fit", _fake_fit(calls, fail={"A1-s1"}))
    ov = [f"run.storage={tmp_path}"]
    cfg = str(ROOT / "configs/synth.yaml")
    out = study_mod.run_study(cfg, ov, name="s", variants=["ot", "A1"], seeds=[0, 1])
    assert calls == ["OT-s0", "A1-s0", "OT-s1", "A1-s1"]  # seed-major
    rows = {(r["variant"], r["seed"]): r for r in out["rows"]}
    assert rows[("A1", 1)]["status"] == "failed" and "worker died" in rows[("A1", 1)]["error"]
    assert rows[("OT", 1)]["dev_curve"] == [[1, pytest.approx(0.81)]] and "train/loss" not in rows[("OT", 1)]["metrics"]
    summary = (tmp_path / "studies/s/summary.md").read_text()
    assert "| A1 | 1 |" in summary and "| OT | 2 |" in summary
    # resume: only the failed trial runs again; a torn last line of rows.jsonl is ignored
    with open(tmp_path / "studies/s/rows.jsonl", "a") as f:
        f.write('{"variant": "OT", "se')
    calls.clear()
    monkeypatch.setattr(study_mod, "fit", _fake_fit(calls, fail=set()))
    out = study_mod.run_study(cfg, ov, name="s", variants=["OT", "A1"], seeds=[0, 1])
    assert calls == ["A1-s1"] and all(r["status"] == "done" for r in out["rows"]) and len(out["rows"]) == 4
    assert "A1 − OT | 2 | -10.00" in out["summary"]  # default pairs: each model vs the first
    # the parameters are fixed once started
    with pytest.raises(ValueError, match="fixed once it has started"):
        study_mod.run_study(cfg, [*ov, "train.epochs=1"], name="s", variants=["OT"], seeds=[0])
    assert json.loads((tmp_path / "studies/s/plan.json").read_text())["pairs"] == [["A1", "OT"]]


def test_study_cli_parses_and_rejects_bad_pairs(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a = build_parser().parse_args(["study", "--name", "n", "--variants", "OT,A1", "--seeds", "0-2,5", "x.y=1"])
    assert a.name == "n" and a.overrides == ["x.y=1"]
    seen: dict[str, Any] = {}
    monkeypatch.setattr(study_mod, "run_study", lambda config, overrides, **kw: seen.update(kw))
    assert main(["study", "--name", "n", "--variants", "OT,A1", "--seeds", "0-2,5", "--pairs", "OT-A1"]) == 0
    assert seen["seeds"] == [0, 1, 2, 5] and seen["variants"] == ["OT", "A1"] and seen["pairs"] == [("OT", "A1")]
    assert main(["study", "--name", "n", "--variants", "OT", "--pairs", "OTA1"]) == 2
    assert "each pair is A-B" in capsys.readouterr().err


def test_seeds_accumulate_and_report_writes_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A queue runs one seed per invocation: the plan keeps every seed, and `--report` rewrites the tables."""
    calls: list[str] = []
    monkeypatch.setattr(study_mod, "prepare_data", lambda cfg: None)
    monkeypatch.setattr(study_mod, "fit", _fake_fit(calls, fail=set()))
    ov = [f"run.storage={tmp_path}"]
    cfg = str(ROOT / "configs/synth.yaml")
    for seed in (0, 1):
        out = study_mod.run_study(cfg, ov, name="q", variants=["OT", "A1"], seeds=[seed], pairs=[("OT", "A1")])
    assert "seeds [0, 1]; 4 of 4 trials finished" in out["summary"]
    assert json.loads((tmp_path / "studies/q/plan.json").read_text())["seeds"] == [0, 1]
    report = tmp_path / "report.md"
    assert main(["study", "--name", "q", "--report", str(report), *ov]) == 0
    assert report.read_text() == out["summary"]
    assert main(["study", "--name", "nope", "--report", "-", *ov]) == 2
    assert "no study at" in capsys.readouterr().err
    assert main(["study", "--name", "q", *ov]) == 2  # running needs --variants


def test_summary_header_counts_the_whole_grid_when_resumed_with_a_seed_subset() -> None:
    rows = [{"variant": v, "seed": s, "status": "done", "metrics": {"test/MRR": 0.8, "test/H@1": 0.7}}
            for v in ("OT", "A1") for s in range(4)][:-1]  # A1 seed 3 missing
    text = study_markdown(rows, ["OT", "A1"], [], {"name": "x", "seeds": [2, 3]})
    assert "seeds [0, 1, 2, 3]; 7 of 8 trials finished." in text


STUDIES = ("fidelity-synth", "sets-synth", "melbench-rp")


@pytest.mark.parametrize("name", STUDIES)
def test_committed_study_tables_regenerate_from_their_rows(name: str) -> None:
    """docs/studies/NAME.md (`otmel study --report`, scripts/export_studies.sh) is what the committed plan.json and
    rows.jsonl give, to the last printed digit."""
    assert study_mod.study_summary(ROOT / "docs/studies/data" / name) == (ROOT / f"docs/studies/{name}.md").read_text()


def test_results_page_shows_the_committed_study_tables() -> None:
    """docs/results.md carries the model and pair tables of every study (scripts/fill_results.py), as regenerated."""
    spec = importlib.util.spec_from_file_location("fill_results", ROOT / "scripts/fill_results.py")
    assert spec is not None and spec.loader is not None
    fill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fill)
    doc = (ROOT / "docs/results.md").read_text()
    for marker, name in (("FIDELITY_TABLES", "fidelity-synth"), ("SETS_TABLES", "sets-synth"),
                         ("MELBENCH_TABLES", "melbench-rp")):
        start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
        block = doc[doc.index(start) + len(start):doc.index(end)]
        tables = study_mod.study_summary(ROOT / "docs/studies/data" / name).split("\n", 2)[2]
        assert block == "\n" + tables.split("\nPlans of the trained checkpoints")[0].strip() + "\n", name
        assert block == "\n" + fill.tables(name) + "\n", name
