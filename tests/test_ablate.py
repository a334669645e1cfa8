"""The Table-2 ablation summary on synthetic trial rows: aggregation over seeds, Δ vs the full model, the
markdown and CSV tables, and the ordering verdicts (holds / reversed / within noise)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest

from otmel.cli import build_parser
from otmel.train.driver.ablate import ablation_csv, ablation_markdown, aggregate, orderings, write_ablation_outputs


def _row(variant: str, seed: int, h1: float | None, mrr: float | None, status: str = "done") -> dict:
    r = {"trial_id": f"{variant}-{seed}", "status": status, "epochs": 3,
         "params": {"model.variant": variant, "train.seed": seed}}
    if h1 is not None:
        r.update({"test/H@1": h1, "test/MRR": mrr, "dev/H@1": h1, "dev/MRR": mrr})
    return r


ROWS = [
    _row("OT", 0, 0.70, 0.80), _row("OT", 1, 0.72, 0.82),
    _row("A1", 0, 0.60, 0.70), _row("A1", 1, 0.62, 0.72),  # clearly worse
    _row("M2", 0, 0.69, 0.80), _row("M2", 1, 0.73, 0.83),  # indistinguishable
    _row("KD", 0, 0.66, 0.76), _row("KD", 1, 0.68, 0.78),  # between A1 and OT
    _row("F2", 0, 0.80, 0.90), _row("F2", 1, 0.81, 0.91),  # better than the full model
    _row("O1", 0, 0.50, 0.60), _row("O1", 1, None, None, status="error"),  # one seed failed
]


def test_aggregate_mean_std_and_delta() -> None:
    agg = {r["variant"]: r for r in aggregate(ROWS)}
    assert list(agg) == ["OT", "A1", "M2", "KD", "F2", "O1"]
    ot, a1 = agg["OT"], agg["A1"]
    assert ot["n"] == 2 and ot["H@1_mean"] == pytest.approx(71.0) and ot["MRR_mean"] == pytest.approx(81.0)
    assert ot["H@1_std"] == pytest.approx(math.sqrt(2.0))  # sample std of 70, 72
    assert a1["dH@1"] == pytest.approx(-10.0) and a1["dMRR"] == pytest.approx(-10.0)
    assert a1["dAvg"] == pytest.approx(-10.0) and a1["dMRR_se"] == pytest.approx(math.sqrt(2.0))
    assert ot["dH@1"] == 0.0
    assert agg["O1"]["n"] == 1 and agg["O1"]["H@1_std"] == 0.0  # the failed seed is not averaged in


def test_aggregate_without_reference_has_no_delta() -> None:
    agg = aggregate([r for r in ROWS if r["params"]["model.variant"] != "OT"])
    assert all(math.isnan(r["dH@1"]) for r in agg)


def test_orderings_verdicts() -> None:
    checks = {c.split(":")[0]: c for c in orderings(aggregate(ROWS))}
    assert "holds" in checks["OT > ATT (A1)"]
    assert "within noise" in checks["full > w/o UniM (M2)"]
    assert "reversed" in checks["full > w/o FusM (F2)"]
    assert "holds" in checks["KD below OT"] and "holds" in checks["KD above ATT (A1)"]
    assert "MRR 81.00±1.41 vs 71.00±1.41" in checks["OT > ATT (A1)"]
    assert "OT > FusM with ATT (F1)" not in checks  # variants that were not run are not judged


def test_markdown_table() -> None:
    md = ablation_markdown(aggregate(ROWS)).splitlines()
    assert md[0] == "| No. | variant | seeds | H@1 | MRR | ΔH@1 | ΔMRR | ΔAvg | paper H@1 / MRR |"
    assert md[2] == "| OT | OT-MEL (OT) | 2 | 71.00 ± 1.41 | 81.00 ± 1.41 | – | – | – | 83.30 / 88.27 |"
    assert md[3] == "| A1 | ATT (w/o OT) | 2 | 61.00 ± 1.41 | 71.00 ± 1.41 | -10.00 | -10.00 | -10.00 | 78.33 / 85.28 |"
    assert md[6].startswith("| F2 | w/o FusM | 2 | 80.50 ± 0.71 | 90.50 ± 0.71 | +9.50 | +9.50 |")


def test_csv_table() -> None:
    rows = list(csv.DictReader(io.StringIO(ablation_csv(aggregate(ROWS)))))
    assert [r["variant"] for r in rows] == ["OT", "A1", "M2", "KD", "F2", "O1"]
    a1 = rows[1]
    assert float(a1["H@1_mean"]) == pytest.approx(61.0) and float(a1["dMRR"]) == pytest.approx(-10.0)
    assert float(a1["paper_H@1"]) == 78.33 and a1["n"] == "2"


def test_write_outputs(tmp_path: Path) -> None:
    out = write_ablation_outputs(tmp_path, ROWS, {"wall_seconds": 1.0})
    assert {p.name for p in tmp_path.iterdir()} == {"ablation.md", "ablation.csv", "rows.json"}
    text = (tmp_path / "ablation.md").read_text()
    assert out["table"] in text and "- OT > ATT (A1): holds" in text


def test_cli_variants_and_seeds_parse() -> None:
    a = build_parser().parse_args(["ablate", "--variants", "OT,KD", "--seeds", "3", "--concurrent", "2", "x.y=1"])
    assert (a.variants, a.seeds, a.concurrent, a.overrides) == ("OT,KD", "3", 2, ["x.y=1"])
