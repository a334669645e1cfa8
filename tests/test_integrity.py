"""Shard integrity while streaming: sha256 checked before a shard's first sample, fail or skip, and the
pre-flight size / presence check a run makes before Ray starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from otmel.data.loaders import eval_loader, train_loader
from otmel.data.manifest import preflight, shard_paths
from otmel.data.shards import ShardError, ShardIntegrityError, iter_shard
from otmel.data.transforms import Preprocessor
from otmel.runconfig import load_config
from otmel.train.driver.launch import prepare_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(toy: Path) -> Path:
    return toy  # the small cleaned-layout pack of conftest.py (2 samples a shard)


def _flip(path: Path, at: int = 700, n: int = 400) -> None:
    """Flip `n` bytes inside the shard (size unchanged), as the issue's bit-rot case."""
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_flipped_shard_yields_no_sample(packed: Path, tmp_path: Path) -> None:
    out = _copy(packed, tmp_path / "c")
    shard = shard_paths(out, "train")[0]
    good = next(s for s in __import__("json").loads((out / "manifest.json").read_text())["shards"]["train"]
                if s["name"] == shard.name)
    _flip(shard)
    assert shard.stat().st_size == good["bytes"]  # same size: only the hash can tell
    it = iter_shard(shard, expected_samples=good["samples"], expected_bytes=good["bytes"],
                    expected_sha256=good["sha256"])
    with pytest.raises(ShardIntegrityError, match=shard.name):
        next(it)  # raised before the first sample


def test_training_stream_fails_or_skips_a_corrupt_shard(packed: Path, pre: Preprocessor, tmp_path: Path) -> None:
    out = _copy(packed, tmp_path / "c")
    bad = shard_paths(out, "train")[0]
    _flip(bad)
    with pytest.raises(ShardError, match=bad.name):
        list(train_loader(out, pre, batch_size=2, steps_per_epoch=4))
    loader = train_loader(out, pre, batch_size=2, steps_per_epoch=6, integrity="skip")
    with pytest.warns(UserWarning, match="skipping this shard"):
        batches = list(loader)
    assert len(batches) == 6 and loader.image_stats["skipped_shards"] >= 1
    # no sample of the bad shard was trained on: its mention indices never appear
    clean = _copy(packed, tmp_path / "clean")
    in_bad = {int(s["__key__"].split("-")[-1]) for s in iter_shard(shard_paths(clean, "train")[0])}
    seen = {int(i) for b in batches for i in b["m_index"]}
    assert in_bad and not (in_bad & seen) and seen


def test_every_shard_bad_is_an_error_not_a_hang(packed: Path, pre: Preprocessor, tmp_path: Path) -> None:
    out = _copy(packed, tmp_path / "c")
    for p in shard_paths(out, "train"):
        _flip(p, at=100)
    with pytest.warns(UserWarning), pytest.raises(ShardError, match="every training shard"):
        list(train_loader(out, pre, batch_size=2, steps_per_epoch=3, integrity="skip"))


def test_eval_shards_always_fail(packed: Path, pre: Preprocessor, tmp_path: Path) -> None:
    out = _copy(packed, tmp_path / "c")
    bad = shard_paths(out, "test")[0]
    _flip(bad, at=600, n=50)
    with pytest.raises(ShardIntegrityError, match=bad.name):
        list(eval_loader(out, "test", pre, batch_size=2))


def test_preflight_checks_every_split_before_ray(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
    out = _copy(packed, tmp_path / "c")
    test_shard = shard_paths(out, "test")[0]
    test_shard.write_bytes(test_shard.read_bytes()[:1000])  # truncated test shard
    with pytest.raises(ShardError, match=f"{test_shard.name}: 1000 bytes"):
        preflight(out, skip_train=True)  # evaluation data is never skipped
    cfg = load_config(ROOT / "configs/synth.yaml", [f"data.shards={out}"])
    with pytest.raises(ShardError, match=test_shard.name):
        prepare_data(cfg)  # what `otmel train` runs before Ray starts
    out2 = _copy(packed, tmp_path / "d")
    train_shard = shard_paths(out2, "train")[0]
    train_shard.unlink()
    assert preflight(out2, skip_train=True) == [f"{train_shard}: missing"]
    with pytest.raises(ShardError, match="missing"):
        preflight(out2)
    prepare_data(load_config(ROOT / "configs/synth.yaml", [f"data.shards={out2}", "data.integrity=skip"]))
    assert "will be skipped" in capsys.readouterr().out
