"""A real sweep on a local Ray (slow): Tune + ASHA over 2 trials, each a 2-worker Ray Train + DeepSpeed run
of the ordinary training code path on a tiny synthetic dataset; ranked outputs, a best.yaml that
`load_config` accepts unchanged, the plan entropy, W&B grouping, and restoring the experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from otmel.runconfig import load_config
from otmel.train.driver.tune import run_sweep
from tests.ray_helpers import local_ray, synth_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SEARCH = """
metric: dev/MRR
mode: max
num_samples: 2
max_concurrent_trials: 1
seed: 0
plan_entropy: true
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
overrides: [train.epochs=2, train.eval_every=1]
space:
  model.reg: {loguniform: [0.01, 1.0]}
  model.pooling: {choice: [softpool, mean]}
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_shards(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def ray_session():  # type: ignore[no-untyped-def]
    with local_ray("otmel-tune", num_cpus=3):
        yield


def test_sweep_ranks_writes_best_yaml_and_restores(shards: Path, tmp_path: Path, ray_session: None) -> None:
    search = tmp_path / "search.yaml"
    search.write_text(SEARCH)
    overrides = [f"data.shards={shards}", "data.num_workers=0", "model.tiny_width=32", "model.hidden_dim=16",
                 "model.tiny_image_size=32", "train.batch_size=8", "train.steps_per_epoch=2", "train.warmup_steps=2",
                 "train.eval_batch_size=32", "train.progress=false", f"run.storage={tmp_path / 'runs'}"]
    config = str(ROOT / "configs/synth.yaml")
    out = run_sweep(config, str(search), overrides, name="sw")
    exp = tmp_path / "runs" / "sweeps" / "sw"
    assert Path(out["path"]) == exp
    rows = out["rows"]
    assert len(rows) == 2 and [r["rank"] for r in rows] == [1, 2]
    best = rows[0]
    assert best["status"] == "done" and best["epochs"] == 2 and "test/MRR" in best
    assert 0.01 <= best["params"]["model.reg"] <= 1.0 and best["params"]["model.pooling"] in ("softpool", "mean")
    assert best["plan_entropy"] > 0 and 0 < best["plan_entropy_norm"] <= 1
    if rows[1]["status"] == "done":  # a weaker second trial may be stopped by ASHA after epoch 1
        assert rows[1]["dev/MRR"] <= best["dev/MRR"]
    else:
        assert rows[1]["status"] == "stopped" and rows[1]["epochs"] == 1
    # every trial is a Ray Train run named after its trial id, with its results.json and W&B group
    run_dir = Path(best["train_run"])
    assert run_dir.parent == exp / "trials" and run_dir.name == f"train-{best['trial_id']}"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["wandb"]["group"] == "sw"
    assert results["config"]["model"]["reg"] == best["params"]["model.reg"]
    assert results["metrics"]["test/MRR"] == pytest.approx(best["test/MRR"])
    # the outputs; best.yaml is a run config that `otmel train --config` takes unchanged
    assert {"ranked.md", "ranked.csv", "rows.json", "best.yaml"} <= {p.name for p in exp.iterdir()}
    cfg = load_config(out["best_yaml"])
    assert cfg.model_config().reg == best["params"]["model.reg"] and cfg.train.epochs == 2
    assert cfg.data.shards == str(shards) and cfg.run.name is None and cfg.wandb.group is None
    assert yaml.safe_load(Path(out["best_yaml"]).read_text())["model"]["pooling"] == best["params"]["model.pooling"]
    # the same name again: refused without --resume; with it, Tune restores the experiment from its state
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(config, str(search), overrides, name="sw")
    again = run_sweep(config, str(search), overrides, name="sw", resume=True)
    assert [(r["trial_id"], r["status"], r.get("dev/MRR")) for r in again["rows"]] == [
        (r["trial_id"], r["status"], r.get("dev/MRR")) for r in rows]
