"""`otmel plans` on a run folder (results.json + a checkpoint) over a tiny packed synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from otmel.analysis.sharpness import checkpoint_plan_summary
from otmel.cli import main
from otmel.model import OTMEL
from otmel.runconfig import load_config
from tests.ray_helpers import synth_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plans")
    shards = synth_shards(root, scale=0.05)
    cfg = load_config(ROOT / "configs/synth.yaml", [f"data.shards={shards}", "model.hidden_dim=16"])
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    save_file(OTMEL(cfg.model_config()).state_dict(), str(ckpt / "best.safetensors"))
    run = root / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "checkpoint": str(ckpt)}))
    return run


def test_plans_command_reports_every_module(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "h.png"
    assert main(["plans", str(run), "--out", str(png), "--mentions", "8", "--entities", "8"]) == 0
    out = capsys.readouterr().out
    for mod in ("fusion.v2t", "fusion.t2v", "match_t.ca", "match_v.ca"):
        assert out.count(f"| run | {mod} |") == 1 and f"| run | OT | {mod} |" in out
    assert "| run | OT | match_t.ca | 64 |" in out  # one problem per (mention, entity) pair: 8 x 8
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_what_ifs_order_by_reg(run: Path) -> None:
    res = json.loads((run / "results.json").read_text())
    from otmel.runconfig import RunConfig

    out = checkpoint_plan_summary(RunConfig.from_dict(res["config"]), Path(res["checkpoint"]), 8, 8)
    for mod, row in out.items():
        w = row["what_if"]
        ent = [w[k]["row_entropy_ot"] for k in ("reg0.01", "reg0.05", "reg0.2", "reg1.67")]
        assert ent == sorted(ent), (mod, ent)  # more regularisation, flatter rows
        assert w["as_run"]["row_entropy_ot"] == pytest.approx(w["reg0.05"]["row_entropy_ot"])  # the config's reg
        assert 0 < row["sd_over_reg"] <= row["range_over_reg"]


def test_plans_command_names_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plans", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
