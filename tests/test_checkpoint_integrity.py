"""Checkpoints that cannot hurt (a manifest of sizes and sha256 per rank, verification on resume, and the
fallback to the newest older checkpoint that verifies) and the NaN / Inf loss rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otmel.model import OTMEL
from otmel.model.testing import random_batch, tiny_cfg
from otmel.runconfig import load_config
from otmel.train.worker.checkpoint import (
    CheckpointCorruptError,
    load_checkpoint,
    previous_valid_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from tests.test_train import FakeEngine

ROOT = Path(__file__).resolve().parents[1]


def _save(directory: Path, seed: int = 0, world: int = 2) -> None:
    torch.manual_seed(seed)
    model = OTMEL(tiny_cfg("OT"))
    eng = FakeEngine(model)
    model(random_batch())["S_O"].sum().backward()
    eng.opt.step()
    st = {"epoch": 1, "step_in_epoch": 0, "global_step": 4, "best_mrr": 0.5, "best_epoch": 1, "history": [],
          "world_size": world}
    for rank in range(world):  # Ray Train merges every rank's files into one folder
        save_checkpoint(directory, rank=rank, model=model, engine=eng, state=st, best=None,  # type: ignore[arg-type]
                        config={"x": 1})


def test_manifest_lists_every_file_and_verifies(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint_2026-01-01_00-00-01"
    _save(ck)
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "state.json", "optim-rank0.pt", "optim-rank1.pt",
                                              "manifest-rank0.json", "manifest-rank1.json"}
    verify_checkpoint(ck, 0)
    verify_checkpoint(ck, 1)


def test_every_rank_of_the_saving_world_is_verified_and_a_new_rank_loads_without_its_own_files(tmp_path: Path
                                                                                                  ) -> None:
    ck = tmp_path / "checkpoint_2026-01-01_00-00-01"
    _save(ck, world=2)
    (ck / "manifest-rank1.json").unlink()  # rank 1's part never finished: its optimizer partition is needed by all
    with pytest.raises(CheckpointCorruptError, match="manifest-rank1.json"):
        verify_checkpoint(ck, 0)
    grown = tmp_path / "checkpoint_2026-01-01_00-00-02"
    _save(grown, world=1)
    verify_checkpoint(grown, 2)  # rank 2 of a run that grew from 1 worker to 3: rank 0's files are the whole state
    model = OTMEL(tiny_cfg("OT"))
    state, _ = load_checkpoint(grown, rank=2, model=model, engine=FakeEngine(model))  # type: ignore[arg-type]
    assert state["world_size"] == 1 and state["global_step"] == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_a_damaged_checkpoint_is_reported_naming_the_file(tmp_path: Path, damage: str) -> None:
    ck = tmp_path / "checkpoint_2026-01-01_00-00-01"
    _save(ck)
    f = ck / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[-50] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    else:
        (ck / "manifest-rank0.json").unlink()
    name = "manifest-rank0.json" if damage == "no-manifest" else "model.safetensors"
    with pytest.raises(CheckpointCorruptError, match=name):
        verify_checkpoint(ck, 1)  # rank 1 checks rank 0's files too: the model lives there


def test_fallback_finds_the_newest_older_valid_checkpoint(tmp_path: Path) -> None:
    old, mid, new = (tmp_path / f"checkpoint_2026-01-01_00-00-0{i}" for i in (1, 2, 3))
    for i, d in enumerate((old, mid, new)):
        _save(d, seed=i)
    (mid / "optim-rank1.pt").write_bytes(b"x")  # rank 1's part of mid is bad ...
    (new / "state.json").write_text("{}")  # ... and the latest is bad
    assert previous_valid_checkpoint(new, 0) == previous_valid_checkpoint(new, 1) == old  # every rank agrees
    (old / "model.safetensors").unlink()
    assert previous_valid_checkpoint(new, 1) is None


def test_keep_checkpoints_keeps_a_previous_one() -> None:
    with pytest.raises(ValueError, match="run.keep_checkpoints"):
        load_config(ROOT / "configs/synth.yaml", ["run.keep_checkpoints=1"])


def test_nonfinite_losses_are_skipped_then_stop_the_run() -> None:
    from otmel.train.worker.loop import NonFiniteGuard, NonFiniteLossError

    g = NonFiniteGuard(limit=2, world_size=1)
    ok = {"loss": torch.tensor(1.0), "L_O": torch.tensor(0.5)}
    bad = {"loss": torch.tensor(float("nan")), "L_O": torch.tensor(float("inf"))}
    assert g.skip(ok, 1) is False
    assert g.skip(bad, 2) is True and g.skip(bad, 3) is True and g.total == 2
    assert g.skip(ok, 4) is False and g.in_a_row == 0  # a finite step resets the run of bad ones
    g.skip(bad, 5)
    g.skip(bad, 6)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* global step 7: .*'L_O': inf"):
        g.skip(bad, 7)
    strict = NonFiniteGuard(limit=0, world_size=1)
    with pytest.raises(NonFiniteLossError):
        strict.skip(bad, 1)


def test_a_failed_write_is_one_clear_error_and_leaves_the_previous_checkpoint(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import otmel.train.worker.checkpoint as ck_mod
    from otmel.train.worker.checkpoint import CheckpointWriteError

    prev = tmp_path / "checkpoint_2026-01-01_00-00-01"
    _save(prev)
    before = {p.name: p.read_bytes() for p in prev.iterdir()}

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck_mod, "save_file", full)  # the model weights hit a full disk
    with pytest.raises(CheckpointWriteError, match="No space left on device .* the previous checkpoint is intact"):
        _save(tmp_path / "checkpoint_2026-01-01_00-00-02")
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    verify_checkpoint(prev, 1)
    new = tmp_path / "checkpoint_2026-01-01_00-00-02"
    assert not [p for p in new.iterdir() if ".tmp" in p.name]  # no half-written file left behind
    assert previous_valid_checkpoint(new, 0) == prev  # a resume would use the intact one
