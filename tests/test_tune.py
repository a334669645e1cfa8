"""Sweeps without Ray: sweep files, search spaces, ranking, the tables, best.yaml round trip, plan
entropy and the Fig. 3 plot (on synthetic rows). The real Tune run is in test_tune_ray.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from otmel.analysis.entropy import model_plan_entropy
from otmel.analysis.plots import plot_sweep, resolve_sweep
from otmel.analysis.sweep_results import (
    best_config_yaml,
    load_rows,
    rank_rows,
    ranked_csv,
    ranked_markdown,
    write_sweep_outputs,
)
from otmel.cli import build_parser
from otmel.config import ModelConfig
from otmel.model import OTMEL
from otmel.runconfig import load_config
from otmel.train.driver.tune import apply_params, check_space, load_search, override, to_tune_space

ROOT = Path(__file__).resolve().parents[1]
SYNTH = str(ROOT / "configs/synth.yaml")
KEYS = ["model.reg", "model.pooling"]


def _rows() -> list[dict]:
    """Synthetic trial rows: two finished, one stopped early, one failed."""
    def row(tid: str, status: str, reg: float, pool: str, mrr: float | None, test: bool, h: float | None = None):
        r = {"trial_id": tid, "status": status, "epochs": 3 if status == "done" else 1,
             "params": {"model.reg": reg, "model.pooling": pool}, "train_run": f"/x/train-{tid}"}
        if mrr is not None:
            r.update({"dev/MRR": mrr, "dev/H@1": mrr - 0.1})
        if test:
            r.update({"test/MRR": mrr - 0.01, "test/H@1": mrr - 0.12})
        if h is not None:
            r.update({"plan_entropy": h, "plan_entropy_norm": h / 10})
        return r

    return [row("a", "done", 0.05, "softpool", 0.70, True, 5.0), row("b", "stopped", 0.5, "mean", 0.90, False),
            row("c", "done", 0.01, "max", 0.80, True, 3.0), row("d", "error", 1.0, "mean", None, False)]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_shipped_sweep_files_load_and_name_real_config_keys() -> None:
    files = sorted((ROOT / "configs/search").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ot", "small", "reg"}
    for f in files:
        spec = load_search(f)
        check_space(SYNTH, spec.overrides, spec.space)
        assert set(to_tune_space(spec.space)) == set(spec.space)
    ot = load_search(ROOT / "configs/search/ot.yaml")
    assert ot.space["model.reg"] == {"loguniform": [0.01, 1.0]}
    assert ot.space["model.hidden_dim"] == {"choice": [48, 96, 192]} and ot.scheduler.type == "asha"


def test_sweep_file_is_strict(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="num_sample"):
        load_search(_write(tmp_path, "num_sample: 3\nspace: {model.reg: {choice: [0.1]}}\n"))
    with pytest.raises(ValueError, match="space.model.reg"):
        load_search(_write(tmp_path, "space: {model.reg: {lognormal: [0.1, 1]}}\n"))
    with pytest.raises(KeyError, match="grace"):
        load_search(_write(tmp_path, "scheduler: {grace: 1}\nspace: {model.reg: {choice: [0.1]}}\n"))
    spec = load_search(_write(tmp_path, "space: {model.rgx: {choice: [0.1]}}\n"))
    with pytest.raises(KeyError, match="rgx"):  # not a model config key: fails before Ray starts
        check_space(SYNTH, [], spec.space)
    with pytest.raises(ValueError, match="pooling"):
        check_space(SYNTH, [], {"model.pooling": {"choice": ["median"]}})


def test_tune_space_domains() -> None:
    from ray import tune

    space = to_tune_space({"a.x": {"loguniform": [0.01, 1]}, "a.y": {"choice": [1, 2]}, "a.z": {"grid": [3, 4]}})
    assert isinstance(space["a.x"], tune.search.sample.Float)
    assert space["a.x"].lower == 0.01 and space["a.x"].upper == 1.0
    assert isinstance(space["a.y"], tune.search.sample.Categorical)
    assert space["a.z"] == {"grid_search": [3, 4]}


def test_apply_params_and_override_strings() -> None:
    base = load_config(SYNTH).to_dict()
    cfg = apply_params(base, {"model.reg": 0.123, "model.pooling": "mean", "train.lr": 3e-4})
    assert cfg.model.reg == 0.123 and cfg.model.pooling == "mean" and cfg.train.lr == 3e-4
    assert cfg.model_config().reg == 0.123 and base["model"].get("reg") is None  # the base is not mutated
    for v in (0.05, 3e-4, 96, "softpool", True):
        k, text = override("model.x", v).split("=", 1)
        assert yaml.safe_load(text) == v


def test_rank_rows_puts_finished_trials_first() -> None:
    ranked = rank_rows(_rows(), "dev/MRR", "max")
    assert [r["trial_id"] for r in ranked] == ["c", "a", "b", "d"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    assert [r["trial_id"] for r in rank_rows(_rows(), "dev/MRR", "min")][:2] == ["a", "c"]


def test_ranked_tables() -> None:
    ranked = rank_rows(_rows())
    md = ranked_markdown(ranked, KEYS).splitlines()
    assert md[0].startswith("| rank | trial | status | epochs | model.reg | model.pooling | dev/H@1 | dev/MRR")
    assert "plan_entropy" in md[0]
    assert md[2].split("|")[1:5] == [" 1 ", " c ", " done ", " 3 "] and "80.00" in md[2] and "3.000" in md[2]
    assert " error " in md[-1] and "–" in md[-1]
    lines = ranked_csv(ranked, KEYS).splitlines()
    assert lines[0].split(",")[:6] == ["rank", "trial_id", "status", "epochs", "model.reg", "model.pooling"]
    assert lines[1].split(",")[:6] == ["1", "c", "done", "3", "0.01", "max"] and len(lines) == 5


def test_best_config_yaml_round_trips_through_load_config(tmp_path: Path) -> None:
    best = load_config(SYNTH, ["train.epochs=3", override("model.reg", 0.0123), override("model.pooling", "max")])
    path = tmp_path / "best.yaml"
    path.write_text(best_config_yaml(best, "best trial x\nuse: otmel train --config best.yaml"))
    assert path.read_text().startswith("# best trial x\n")
    again = load_config(path)  # exactly what `otmel train --config best.yaml` does
    assert again.to_dict() == best.to_dict()
    assert again.model_config().reg == 0.0123 and again.model_config().pooling == "max"


def test_write_sweep_outputs(tmp_path: Path) -> None:
    ranked = rank_rows(_rows())
    out = write_sweep_outputs(tmp_path, ranked, KEYS, "dev/MRR", load_config(SYNTH), {"wall_seconds": 1.0})
    assert {p.name for p in tmp_path.iterdir()} == {"rows.json", "ranked.md", "ranked.csv", "best.yaml"}
    rows, meta = load_rows(tmp_path)
    assert rows[0]["trial_id"] == "c" and meta["param_keys"] == KEYS and meta["metric"] == "dev/MRR"
    assert load_config(out["best_yaml"]).to_dict() == load_config(SYNTH).to_dict()


def _tiny_batch(model_cfg: ModelConfig) -> tuple[dict, dict]:
    b, lt, s = 3, 8, model_cfg.tiny_image_size
    ids = torch.randint(3, 100, (b, lt))
    mask = torch.ones(b, lt, dtype=torch.long)
    img = torch.randn(b, 3, s, s)
    has = torch.tensor([True, True, False])
    mb = {"m_input_ids": ids, "m_attention_mask": mask, "m_pixel_values": img, "m_image_mask": has}
    eb = {"e_input_ids": ids, "e_attention_mask": mask, "e_pixel_values": img, "e_image_mask": has,
          "e_index": torch.arange(b)}
    return mb, eb


@pytest.mark.parametrize("variant", ["OT", "A1", "KD"])
def test_model_plan_entropy(variant: str) -> None:
    cfg = ModelConfig.from_variant(variant, tiny_width=32, hidden_dim=16, tiny_image_size=32, reg=0.5)
    model = OTMEL(cfg)
    out = model_plan_entropy(model, *_tiny_batch(cfg))
    if variant == "OT":
        mods = {"fusion.v2t", "fusion.t2v", "match_t.ca", "match_v.ca"}  # every OT module is counted
        assert set(out) == {"plan_entropy", "plan_entropy_norm", *(f"plan_entropy_norm/{m}" for m in mods)}
        assert out["plan_entropy"] > 0.0 and 0.5 < out["plan_entropy_norm"] <= 1.0 + 1e-9  # reg 0.5: diffuse
        sharp = model_plan_entropy(OTMEL(ModelConfig.from_variant("OT", tiny_width=32, hidden_dim=16,
                                                                  tiny_image_size=32, reg=0.005)),
                                   *_tiny_batch(cfg))
        assert sharp["plan_entropy"] < out["plan_entropy"]  # less regularisation, sharper plans
    else:
        assert out == {}  # ATT, and the KD model's student at inference, have no plan
    assert not any(getattr(m, "plan_hooks", None) for m in model.modules())  # the capture hooks are removed


def test_plot_sweep_writes_png(tmp_path: Path) -> None:
    write_sweep_outputs(tmp_path, rank_rows(_rows()), KEYS, "dev/MRR", None, {})
    out = plot_sweep(resolve_sweep(str(tmp_path)))
    assert out == tmp_path / "reg.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="model.pooling"):
        plot_sweep(tmp_path, x_key="model.pooling")  # not numeric
    with pytest.raises(FileNotFoundError):
        resolve_sweep(str(tmp_path / "nope"))


def test_cli_parses_tune_ablate_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = build_parser()
    a = p.parse_args(["tune", "--search", "configs/search/small.yaml", "--name", "s1", "--resume", "train.epochs=2"])
    assert a.search.endswith("small.yaml") and a.resume and a.overrides == ["train.epochs=2"]
    a = p.parse_args(["ablate", "--variants", "OT,F1", "--seeds", "0,1,2", "train.epochs=3"])
    assert a.variants == "OT,F1" and a.seeds == "0,1,2" and a.concurrent == 1
    write_sweep_outputs(tmp_path, rank_rows(_rows()), KEYS, "dev/MRR", None, {})
    from otmel.cli import main

    assert main(["plot", "sweep", str(tmp_path), "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").exists() and "wrote" in capsys.readouterr().out
    assert main(["plot", "sweep", str(tmp_path / "missing")]) == 2
    assert main(["tune", "--search", "configs/search/small.yaml", "--resume"]) == 2  # --resume needs --name
    assert json.loads((tmp_path / "rows.json").read_text())["rows"]


class _FakeResult:
    def __init__(self, metrics: dict, params: dict, error: Exception | None = None, epochs: list | None = None):
        import pandas as pd

        self.metrics, self.error, self.path = metrics, error, f"/x/{metrics.get('trial_id', 'z')}"
        self.config = {"params": params, "train_storage": "/x/trials"}
        self.metrics_dataframe = pd.DataFrame({"epoch": epochs}) if epochs else None


class _FakeGrid(list):
    def __init__(self, results: list, statuses: list[str]) -> None:
        super().__init__(results)
        trials = [type("T", (), {"status": s})() for s in statuses]
        self._experiment_analysis = type("EA", (), {"trials": trials})()


def test_rows_from_grid_statuses() -> None:
    from otmel.analysis.sweep_results import rows_from_grid, unfinished

    p = {"model.reg": 0.1}
    grid = _FakeGrid([
        _FakeResult({"trial_id": "a", "dev/MRR": 0.8, "test/MRR": 0.7, "test/H@1": 0.6}, p, epochs=[1, 2, 3, None]),
        _FakeResult({"trial_id": "b", "dev/MRR": 0.5, "epoch": 1}, p, epochs=[1]),  # ASHA stopped it
        _FakeResult({"trial_id": "c", "dev/MRR": 0.6, "epoch": 1}, p, epochs=[1]),  # running when interrupted
        _FakeResult({}, p),  # pending when interrupted
        _FakeResult({"trial_id": "e"}, p, error=RuntimeError("boom\ntrace")),
    ], ["TERMINATED", "TERMINATED", "RUNNING", "PENDING", "ERROR"])
    rows = rows_from_grid(grid, ["model.reg"])
    assert [r["status"] for r in rows] == ["done", "stopped", "unfinished", "unfinished", "error"]
    assert rows[0]["epochs"] == 3 and rows[0]["train_run"] == "/x/trials/train-a" and rows[4]["error"] == "boom"
    assert unfinished(rows) == 2
    assert [r["trial_id"] for r in rank_rows(rows)][:3] == ["a", "b", "c"]


@pytest.mark.parametrize("job", ["tune", "ablate"])
def test_ray_job_entry_points_reach_the_cli(job: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, f"ray_jobs/{job}.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"usage: otmel {job}" in out.stdout
