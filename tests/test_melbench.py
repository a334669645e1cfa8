"""Real data: pack MELBench Richpedia-MEL (text only) from `../shared/data/melbench/` and check the counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otmel.data.manifest import shard_paths, verify
from otmel.data.pack import pack
from otmel.data.shards import iter_shard

MELBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "melbench" / "Richpedia-MEL.json"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not MELBENCH.is_file():
        pytest.skip(f"MELBench data absent: {MELBENCH.resolve()} not found (real-data test skipped)")
    out = tmp_path_factory.mktemp("melbench") / "richpedia"
    return out, pack(MELBENCH, "melbench", out, shard_size=5000, progress=False)


def test_richpedia_mel_counts(packed: tuple[Path, dict]) -> None:
    out, manifest = packed
    counts = manifest["counts"]
    assert counts["train"] + counts["dev"] + counts["test"] == 17_805
    assert counts["kg"] == 17_805  # one entity per distinct answer QID
    assert (counts["train"], counts["dev"], counts["test"]) == (12_464, 1_780, 3_561)  # 70/10/20, seed 0
    assert manifest["skipped"] == {"nil": 0, "bad_records": 0}
    assert manifest["images"]["kg"]["none"] == 17_805  # text only
    assert verify(out, deep=False).ok


def test_richpedia_mel_samples(packed: tuple[Path, dict]) -> None:
    out, _ = packed
    raw = json.loads(MELBENCH.read_text(encoding="utf-8"))
    kg = {}
    for path in shard_paths(out, "kg"):
        for s in iter_shard(path):
            meta = json.loads(s["json"])
            kg[meta["e_index"]] = meta
    assert sorted(kg) == list(range(17_805))
    seen = set()
    for split in ("train", "dev", "test"):
        for path in shard_paths(out, split):
            for s in iter_shard(path):
                meta = json.loads(s["json"])
                rec = raw[meta["id"]]
                assert meta["mention"] == rec["mentions"] and meta["sentence"] == rec["sentence"]
                assert kg[meta["e_index"]]["qid"] == rec["answer"] == meta["entity"]["qid"]
                assert meta["entity"]["name"] == rec["entities"]
                seen.add(meta["id"])
    assert seen == set(raw)
