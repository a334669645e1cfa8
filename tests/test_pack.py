"""`pack` / `verify`: shard contents, manifest, idempotence, bad input, the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from data_fixtures import melbench_records, write_cleaned
from PIL import Image

import otmel
from otmel.cli import main
from otmel.data.manifest import read_manifest, shard_paths, split_counts, verify
from otmel.data.pack import pack, write_shards
from otmel.data.readers import BadRecordsError, RawDataset
from otmel.data.records import EntityRecord, MentionRecord
from otmel.data.shards import iter_shard, sha256_file


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_cleaned(root)
    return root


@pytest.fixture(scope="module")
def packed(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "toy"
    pack(src, "cleaned", out, shard_size=2, progress=False)
    return out


def _samples(out: Path, split: str) -> list[dict]:
    return [s for p in shard_paths(out, split) for s in iter_shard(p)]


def test_manifest(packed: Path) -> None:
    m = read_manifest(packed)
    assert m["counts"] == {"train": 6, "dev": 2, "test": 3, "kg": 6} == split_counts(packed)
    assert m["otmel_version"] == otmel.__version__ and m["schema_version"] == 1
    assert [s["name"] for s in m["shards"]["train"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert [s["name"] for s in m["shards"]["kg"]] == ["kg-000000.tar", "kg-000001.tar", "kg-000002.tar"]
    for split, shards in m["shards"].items():
        assert sum(s["samples"] for s in shards) == m["counts"][split]
        for s in shards:
            path = packed / s["name"]
            assert path.stat().st_size == s["bytes"] and sha256_file(path) == s["sha256"]
    assert m["images"]["kg"] == {"ok": 3, "none": 1, "missing": 1, "unreadable": 1}
    assert m["images"]["train"] == {"ok": 3, "none": 1, "missing": 1, "unreadable": 1}
    assert m["masked_images"]["kg"] == 2 and m["masked_images"]["train"] == 2
    assert m["skipped"] == {"nil": 2, "bad_records": 0}
    assert m["split_seed"] is None and m["source"] == str(Path(m["source"]).resolve())
    assert not [p.name for p in packed.iterdir() if p.name.startswith(".")]  # no temp files left


def test_mention_samples_carry_gold_entity(packed: Path) -> None:
    samples = _samples(packed, "train")
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["id"] for m in metas] == ["m1", "m2", "m3", "m5", "m6", "m7"]
    assert [m["m_index"] for m in metas] == list(range(6))
    assert [m["e_index"] for m in metas] == [0, 1, 2, 0, 3, 5]
    first = metas[0]
    assert first["entity"] == {
        "qid": "Q1",
        "name": "Barack Obama",
        "attrs": "President. born 1961",
        "e_index": 0,
        "has_image": True,
    }
    assert first["mention"] == "Obama" and first["answer"] == "Q1" and first["has_image"] is True
    has = {m["id"]: ("m.jpg" in s, "e.jpg" in s) for m, s in zip(metas, samples, strict=True)}
    assert has == {
        "m1": (True, True),
        "m2": (True, True),
        "m3": (False, False),
        "m5": (True, True),
        "m6": (False, True),
        "m7": (False, False),
    }
    assert metas[2]["has_image"] is False and metas[2]["entity"]["has_image"] is False
    for s in samples:
        for key in ("m.jpg", "e.jpg"):
            if key in s:
                img = Image.open(io.BytesIO(s[key]))
                assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 224
    kg = {json.loads(s["json"])["qid"]: s for s in _samples(packed, "kg")}
    assert sorted(kg) == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]
    assert [q for q, s in kg.items() if "jpg" in s] == ["Q1", "Q2", "Q4"]
    assert kg["Q1"]["jpg"] == samples[0]["e.jpg"]  # the mention's entity image is the KG's
    assert Image.open(io.BytesIO(kg["Q1"]["jpg"])).size == (224, 168)  # 320x240 source


def test_pack_is_idempotent(src: Path, packed: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    pack(src, "cleaned", again, shard_size=2, progress=False, num_workers=2)  # workers do not change bytes
    first, second = read_manifest(packed), read_manifest(again)
    assert first == second
    assert (packed / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
    pack(src, "cleaned", again, shard_size=2, progress=False)  # over itself
    assert read_manifest(again) == first


def test_repack_removes_stale_shards(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack(src, "cleaned", out, shard_size=1, progress=False)
    assert (out / "train-000005.tar").exists()
    pack(src, "cleaned", out, shard_size=100, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "dev-000000.tar",
        "kg-000000.tar",
        "manifest.json",
        "test-000000.tar",
        "train-000000.tar",
    ]
    assert verify(out).ok


def test_bad_records_fail_or_are_skipped(tmp_path: Path) -> None:
    write_cleaned(tmp_path / "src", bad=True)
    out = tmp_path / "out"
    with pytest.raises(BadRecordsError) as err:
        pack(tmp_path / "src", "cleaned", out, progress=False)
    msg = str(err.value)
    assert "toy_train.json" in msg and "'m8'" in msg and "toy_dev.json" in msg and "'d4'" in msg
    assert {b.id for b in err.value.bad} == {"m8", "d4"}
    assert not (out / "manifest.json").exists()
    m = pack(tmp_path / "src", "cleaned", out, skip_bad=True, progress=False)
    assert m["skipped"]["bad_records"] == 2 and m["counts"]["train"] == 6 and m["counts"]["dev"] == 2
    assert {b["id"] for b in m["bad_records"]} == {"m8", "d4"}


def test_melbench_pack_is_text_only(tmp_path: Path) -> None:
    path = tmp_path / "mb.json"
    path.write_text(json.dumps(melbench_records(30)))
    m = pack(path, "melbench", tmp_path / "out", shard_size=8, split_seed=3, progress=False)
    assert m["counts"] == {"train": 21, "dev": 3, "test": 6, "kg": 30}
    assert m["split_seed"] == 3 and m["split_ratios"] == [0.7, 0.1, 0.2]
    samples = _samples(tmp_path / "out", "train")
    assert all(set(s) == {"__key__", "__url__", "json"} for s in samples)


def test_cli_pack_and_verify(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["pack", str(src), "--format", "cleaned", "--out", str(out), "--shard-size", "2", "--workers", "0"]
    assert main([*args, "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "ok: 9 shards" in capsys.readouterr().out
    # corrupt one shard in place (same size) and truncate another
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    cut = out / "kg-000000.tar"
    cut.write_bytes(cut.read_bytes()[:5000])
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "kg-000000.tar" in err and "train-000000.tar" not in err
    assert "sha256" in err and "truncated" in err


def test_cli_verify_reads_tar_back(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep"
    pack(src, "cleaned", out, shard_size=2, progress=False)
    # a shard rewritten with a bad tar but a manifest patched to its size and hash: only the read-back sees it
    shard = out / "dev-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"]["dev"][0].update(bytes=1024, sha256=sha256_file(shard))
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify(out)
    assert report.bad_shards == ["dev-000000.tar"]
    assert verify(out, deep=False).ok


def test_cli_pack_reports_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cleaned(tmp_path / "src", bad=True)
    code = main(
        [
            "pack",
            str(tmp_path / "src"),
            "--format",
            "cleaned",
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "m8" in err and "toy_train.json" in err and "--skip-bad" in err


def test_missing_source(tmp_path: Path) -> None:
    shutil.rmtree(tmp_path, ignore_errors=True)
    with pytest.raises(FileNotFoundError):
        pack(tmp_path / "nope", "cleaned", tmp_path / "out", progress=False)


def test_write_shards_from_memory(tmp_path: Path) -> None:
    ds = RawDataset(
        [EntityRecord("a", "Alpha", "first"), EntityRecord("b", "Beta", "")],
        {"train": [MentionRecord("1", "al", "al is here", "a"), MentionRecord("2", "x", "y", "zz")]},
    )
    with pytest.raises(BadRecordsError, match="'2'.*unknown answer QID 'zz'"):
        write_shards(ds, tmp_path / "o", progress=False)
    m = write_shards(ds, tmp_path / "o", progress=False, skip_bad=True)
    assert m["counts"] == {"train": 1, "dev": 0, "test": 0, "kg": 2}
    assert m["shards"]["dev"] == [] and verify(tmp_path / "o").ok
