"""DeepSpeed's CPU shm op: off by default, or loaded under an flock that clears a baton a killed process left."""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
from pathlib import Path

import pytest

from otmel.train.worker import ds_ops


def test_disabled_op_makes_deepspeed_fall_back_without_building() -> None:
    ds_ops.disable_shm_op()
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert comm_torch.build_shm_op() is None  # no compile, no baton: DeepSpeed reduces over torch.distributed


def test_build_dir_follows_torch_extensions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds_ops.build_dir() == tmp_path / ds_ops.SHM_OP


class _FakeBuilder:
    """Stands for ShareMemCommBuilder: records what it saw when `load` ran (a real build takes ~40 s)."""

    name = ds_ops.SHM_OP

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[tuple[bool, bool]] = []

    def load(self) -> None:
        flock = os.open(self.folder / "otmel.flock", os.O_RDWR)
        try:  # the flock must be held by the caller while the op loads
            fcntl.flock(flock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(flock)
        self.seen.append(((self.folder / "lock").exists(), free))


def _fake_accelerator(monkeypatch: pytest.MonkeyPatch, builder: _FakeBuilder) -> None:
    accel = importlib.import_module("deepspeed.accelerator")

    class _Accel:
        def create_op_builder(self, name: str) -> _FakeBuilder:
            assert name == "ShareMemCommBuilder"
            return builder

    monkeypatch.setattr(accel, "get_accelerator", lambda: _Accel())


def _hear(log: logging.Logger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """caplog sees `log` whatever an earlier test in this process (a Ray, Serve, a run) did to the logging tree."""
    monkeypatch.setattr(log, "disabled", False)
    monkeypatch.setattr(log, "propagate", True)
    caplog.set_level(logging.WARNING, logger=log.name)


def test_safe_load_clears_a_stale_baton_under_the_flock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _hear(ds_ops.log, caplog, monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / ds_ops.SHM_OP
    folder.mkdir()
    (folder / "lock").touch()  # what a worker killed mid-build leaves: torch would wait on it forever
    builder = _FakeBuilder(folder)
    _fake_accelerator(monkeypatch, builder)
    ds_ops.prepare_cpu_comm(use_shm=True)
    assert builder.seen == [(False, False)]  # loaded with the baton gone, while the flock was held
    assert "stale build lock" in caplog.text and str(folder / "lock") in caplog.text
    fd = os.open(folder / "otmel.flock", os.O_RDWR)  # and the flock was released afterwards
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_safe_load_leaves_a_clean_folder_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _hear(ds_ops.log, caplog, monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = _FakeBuilder(tmp_path / ds_ops.SHM_OP)
    _fake_accelerator(monkeypatch, builder)
    ds_ops.load_shm_op_safely()
    assert builder.seen == [(False, False)] and "stale" not in caplog.text
    assert not ds_ops.clear_stale_baton(tmp_path / ds_ops.SHM_OP)
