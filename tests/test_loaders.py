"""Loaders: training stream (shapes, pairing, determinism), exactly-once eval / KG streams, bad shards."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from data_fixtures import melbench_records

from otmel.data.loaders import eval_loader, kg_loader, train_loader
from otmel.data.manifest import read_manifest, shard_paths
from otmel.data.pack import pack
from otmel.data.readers import read_dataset
from otmel.data.shards import ShardError, ShardSetWriter, iter_shard
from otmel.data.transforms import Preprocessor

M_KEYS = {"m_input_ids", "m_attention_mask", "m_pixel_values", "m_image_mask"}
E_KEYS = {"e_input_ids", "e_attention_mask", "e_pixel_values", "e_image_mask"}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-only pack with many small shards: 70 train, 10 dev, 20 test mentions, 100 entities."""
    root = tmp_path_factory.mktemp("text")
    (root / "mb.json").write_text(json.dumps(melbench_records(100)))
    pack(root / "mb.json", "melbench", root / "shards", shard_size=3, progress=False)
    return root / "shards"


def _ids(loader, key: str) -> list[int]:
    return [i for batch in loader for i in batch[key].tolist()]


def test_train_batches(toy: Path, pre: Preprocessor) -> None:
    loader = train_loader(toy, pre, batch_size=4, steps_per_epoch=5, num_workers=0, shuffle_buffer=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for b in batches:
        assert set(b) == M_KEYS | E_KEYS | {"m_index", "e_index"}
        assert b["m_input_ids"].shape == (4, 10) and b["m_input_ids"].dtype == torch.long
        assert b["e_pixel_values"].shape == (4, 3, 16, 16) and b["e_pixel_values"].dtype == torch.float32
        assert b["m_image_mask"].dtype == torch.bool and b["m_image_mask"].shape == (4,)
        assert b["e_index"].dtype == torch.long and b["m_index"].shape == (4,)
    # every sample pairs the mention with its gold entity: compare with the records
    ds = read_dataset(toy.parent / "src", "cleaned")
    gold = {i: ds.qid_to_index()[m.answer] for i, m in enumerate(ds.splits["train"])}
    for b in batches:
        for k in range(4):
            m_index, e_index = int(b["m_index"][k]), int(b["e_index"][k])
            assert gold[m_index] == e_index
            expected = pre.entity(ds.entities[e_index])
            assert torch.equal(b["e_input_ids"][k], expected["e_input_ids"])
            assert bool(b["e_image_mask"][k]) == (ds.entities[e_index].image is not None)
            m = pre.mention(ds.splits["train"][m_index])
            assert torch.equal(b["m_input_ids"][k], m["m_input_ids"])
    assert loader.image_stats["missing_images"] > 0  # the toy set has mentions / entities without images


def test_train_stream_is_deterministic(text: Path, pre: Preprocessor) -> None:
    def run(**kw) -> list[int]:
        args = dict(
            batch_size=8,
            steps_per_epoch=6,
            epoch=0,
            seed=0,
            rank=0,
            world_size=2,
            num_workers=2,
            shuffle_buffer=16,
        )
        args.update(kw)
        return _ids(train_loader(text, pre, **args), "m_index")

    first = run()
    assert len(first) == 48
    assert run() == first  # same seed + epoch + rank → same batches
    assert run(epoch=1) != first
    assert run(seed=1) != first
    assert run(rank=1) != first
    mixed = run(mix_workers=True)  # unbatch + shuffle + re-batch in the main process: also deterministic
    assert len(mixed) == 48 and run(mix_workers=True) == mixed and mixed != first
    # rank 0 of 2 reads only its own shards (shard i with i % 2 == 0)
    manifest = read_manifest(text)
    mine = set()
    for s in manifest["shards"]["train"][0::2]:
        mine |= {json.loads(x["json"])["m_index"] for x in iter_shard(text / s["name"])}
    assert set(first) <= mine
    # iterating the same loader twice replays the epoch
    loader = train_loader(
        text, pre, batch_size=8, steps_per_epoch=3, seed=5, num_workers=0, shuffle_buffer=16
    )
    assert _ids(loader, "m_index") == _ids(loader, "m_index")


def test_train_shuffles_within_an_epoch(text: Path, pre: Preprocessor) -> None:
    ids = _ids(
        train_loader(text, pre, batch_size=10, steps_per_epoch=7, num_workers=0, shuffle_buffer=50), "m_index"
    )
    assert ids != sorted(ids) and len(set(ids)) > 35  # resampled with replacement, but well spread


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_and_kg_exactly_once(text: Path, pre: Preprocessor, world_size: int, num_workers: int) -> None:
    for split, n in (("test", 20), ("train", 70)):
        seen: list[int] = []
        for rank in range(world_size):
            loader = eval_loader(
                text, split, pre, batch_size=4, rank=rank, world_size=world_size, num_workers=num_workers
            )
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(set(b) == M_KEYS | {"m_index", "e_index"} for b in batches)
            seen += _ids(batches, "m_index")
        assert sorted(seen) == list(range(n))
    entities: list[int] = []
    for rank in range(world_size):
        entities += _ids(
            kg_loader(text, pre, batch_size=16, rank=rank, world_size=world_size, num_workers=num_workers),
            "e_index",
        )
    assert sorted(entities) == list(range(100))


def test_eval_gold_rows_and_order(toy: Path, pre: Preprocessor) -> None:
    batches = list(eval_loader(toy, "test", pre, batch_size=2))
    assert _ids(batches, "m_index") == [0, 1, 2]  # one rank, no workers: split order
    assert _ids(batches, "e_index") == [3, 5, 0]  # t1 → Q4, t2 → Q6, t3 → Q1
    kg = list(kg_loader(toy, pre, batch_size=4))
    assert set(kg[0]) == E_KEYS | {"e_index"}
    assert torch.cat([b["e_image_mask"] for b in kg]).tolist() == [True, True, False, True, False, False]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_raises_naming_it(toy: Path, pre: Preprocessor, tmp_path: Path) -> None:
    out = _copy(toy, tmp_path / "cut")
    shard = out / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside a member
    with pytest.raises(ShardError, match="test-000000.tar"):
        list(eval_loader(out, "test", pre, batch_size=2))
    # cut at a member boundary and patch the manifest's size: the tar reads as valid but short
    out2 = _copy(toy, tmp_path / "boundary")
    shard = out2 / "test-000000.tar"
    with tarfile.open(shard) as tar:
        first = [m for m in tar.getmembers() if m.name.startswith("test-000000000.")]
    end = max(m.offset_data + (m.size + 511) // 512 * 512 for m in first)  # end of the first sample
    shard.write_bytes(shard.read_bytes()[:end])
    manifest = json.loads((out2 / "manifest.json").read_text())
    manifest["shards"]["test"][0]["bytes"] = end
    manifest["shards"]["test"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # a consistent lie
    (out2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"test-000000.tar: 1 samples, the manifest says 2"):
        list(eval_loader(out2, "test", pre, batch_size=2))
    with pytest.raises(ShardError, match="test-000000.tar"):  # also from a DataLoader worker
        list(eval_loader(out, "test", pre, batch_size=2, num_workers=2))


def test_unreadable_image_in_shard_is_masked(toy: Path, pre: Preprocessor, tmp_path: Path) -> None:
    out = _copy(toy, tmp_path / "badimg")
    path = shard_paths(out, "dev")[0]
    samples = list(iter_shard(path))
    writer = ShardSetWriter(tmp_path, "dev", 100)
    for s in samples:
        members = {k: v for k, v in s.items() if not k.startswith("__")}
        if "m.jpg" in members:
            members["m.jpg"] = b"\xff\xd8 corrupt"
        writer.write(s["__key__"], members)
    info = writer.close()[0]
    shutil.copy(tmp_path / info.name, path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"]["dev"][0].update(bytes=info.bytes, sha256=info.sha256)
    (out / "manifest.json").write_text(json.dumps(manifest))
    loader = eval_loader(out, "dev", pre, batch_size=4)
    (batch,) = list(loader)
    assert batch["m_image_mask"].tolist() == [False, False]
    assert torch.count_nonzero(batch["m_pixel_values"]) == 0
    assert loader.image_stats["unreadable_images"] == 1 and loader.image_stats["missing_images"] == 1


def test_empty_split_yields_nothing(tmp_path: Path, pre: Preprocessor) -> None:
    (tmp_path / "mb.json").write_text(json.dumps(melbench_records(3)))
    pack(tmp_path / "mb.json", "melbench", tmp_path / "out", split_ratios=(1.0, 0.0, 0.0), progress=False)
    for workers in (0, 2):
        loader = eval_loader(tmp_path / "out", "dev", pre, batch_size=2, num_workers=workers)
        assert len(loader) == 0 and list(loader) == []
