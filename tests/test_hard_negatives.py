"""Hard negatives: the entity store, the lexical table, the per-step draw, the augmented batch through the model
and loss, and mining (one process, and a real 2-process gloo group equal to it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from otmel.config import ModelConfig
from otmel.data.baselines import normalise
from otmel.data.hard_negatives import (
    NO_ENTITY,
    EntityStore,
    HardNegatives,
    hard_negative_seed,
    kg_names,
    lexical_table,
    train_records,
)
from otmel.data.loaders import eval_loader, kg_loader, train_loader
from otmel.data.manifest import KG, num_entities, read_manifest, shard_infos, split_counts
from otmel.data.shards import iter_shard
from otmel.loss import OTMELLoss, exclusion_mask
from otmel.model import OTMEL
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import first_stage_scores
from otmel.runconfig import load_config
from otmel.train.worker.mining import combine_tables, mine_hard_negatives
from tests.gloo_helpers import spawn_and_join
from tests.ray_helpers import synth_shards

W = 2


def _cfg() -> ModelConfig:
    return ModelConfig.from_variant("OT", tiny_width=32, tiny_layers=1, tiny_heads=2, tiny_image_size=32,
                                    tiny_patch_size=8, hidden_dim=16, max_len=24)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 100 entities with shared names (homonyms), in 16-sample shards (several KG shards per rank)
    return synth_shards(tmp_path_factory.mktemp("hn"), seed=5, scale=0.05, shard_size=16)


def test_entity_store_gives_every_kg_sample_by_row(shards: Path) -> None:
    store = EntityStore(shards)
    seen = 0
    for info in shard_infos(shards, KG, read_manifest(shards)):
        for sample in iter_shard(shards / info.name):
            row = json.loads(sample["json"])["e_index"]
            got = store.get(row)
            assert got == {k: v for k, v in sample.items() if not k.startswith("__")}
            seen += 1
    assert seen == len(store) == num_entities(shards)
    with pytest.raises(KeyError, match="KG row 99999"):
        store.get(99999)
    store.close()


def test_lexical_table_puts_homonyms_first_and_never_the_gold(shards: Path) -> None:
    names = kg_names(shards)
    table = lexical_table(shards, 8)
    recs = {int(r["m_index"]): r for r in train_records(shards)}
    assert table.shape == (split_counts(shards)["train"], 8)
    with_homonyms = 0
    for m, r in recs.items():
        gold, row = int(r["e_index"]), [c for c in table[m].tolist() if c != NO_ENTITY]
        assert gold not in row and len(set(row)) == len(row)
        homonyms = [i for i, n in enumerate(names) if normalise(n) == normalise(names[gold]) and i != gold]
        assert row[: len(homonyms)] == homonyms[:8]  # the gold's namesakes lead, in KG order
        with_homonyms += bool(homonyms)
        # every other candidate shares a token with the surface form (the string matcher's nonzero tiers)
        mention_tokens = set(normalise(r["mention"]).split())
        for c in row[len(homonyms):]:
            assert mention_tokens & set(normalise(names[c]).split()), (r["mention"], names[c])
    assert with_homonyms > 0  # the synthetic benchmark shares names on purpose


def test_draw_is_seeded_avoids_the_gold_and_fills_short_rows(shards: Path) -> None:
    pre = build_preprocessor(_cfg())
    hard = HardNegatives(EntityStore(shards), pre, per_mention=3, n_entities=num_entities(shards))
    table = torch.full((4, 5), NO_ENTITY)
    table[0] = torch.tensor([7, 8, 9, 10, 11])
    table[1, :2] = torch.tensor([3, 4])  # short: one random fill
    table[2, :3] = torch.tensor([5, 6, 2])  # contains the gold (2): never drawn
    hard.set_table(table)
    m, gold = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 2, 4])
    a, b = hard.draw(m, gold, seed=11), hard.draw(m, gold, seed=11)
    assert torch.equal(a, b) and not torch.equal(a, hard.draw(m, gold, seed=12))
    assert set(a[0].tolist()) <= {7, 8, 9, 10, 11} and len(set(a[0].tolist())) == 3
    assert {3, 4} <= set(a[1].tolist())
    assert set(a[2].tolist()) == {5, 6}.union(set(a[2].tolist()) - {5, 6, 2}) and 2 not in a[2].tolist()
    assert (a != gold.unsqueeze(1)).all()
    assert hard_negative_seed(0, 1, 0, 5) != hard_negative_seed(0, 1, 1, 5)


def test_augmented_batch_keeps_golds_first_and_the_loss_excludes_duplicates(shards: Path) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    pre = build_preprocessor(cfg)
    batch = next(iter(train_loader(shards, pre, batch_size=4, steps_per_epoch=1)))
    hard = HardNegatives(EntityStore(shards), pre, per_mention=2, n_entities=num_entities(shards))
    table = torch.full((split_counts(shards)["train"], 2), NO_ENTITY)
    # mention 0's hard negatives: mention 1's gold and one more entity
    m0, other_gold = int(batch["m_index"][0]), int(batch["e_index"][1])
    spare = next(i for i in range(num_entities(shards)) if i not in batch["e_index"].tolist())
    table[m0] = torch.tensor([other_gold, spare])
    hard.set_table(table)
    aug = hard.augment(batch, seed=0)
    for k, v in batch.items():
        if k.startswith("e_"):
            assert len(aug[k]) == 12 and torch.equal(aug[k][:4], v), k
        else:
            assert torch.equal(aug[k], v), k
    assert set(aug["e_index"][4:6].tolist()) == {other_gold, spare}
    assert aug["e_input_ids"].shape[1:] == batch["e_input_ids"].shape[1:]
    model = OTMEL(cfg)
    out = model(aug)
    assert out["S_O"].shape == (4, 12) and torch.equal(out["targets"], torch.arange(4))
    assert torch.equal(out["m_gold"], batch["e_index"])
    excl = exclusion_mask(out["m_gold"], out["e_ids"], out["targets"])
    col = 4 + int((aug["e_index"][4:6] == other_gold).nonzero()[0])
    assert excl[1, col] and not excl[0, col]  # a negative for mention 0, mention 1's own gold elsewhere
    loss = OTMELLoss()(**out)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


@torch.no_grad()
def _brute_force_table(model: OTMEL, shards: Path, k: int) -> torch.Tensor:
    pre = build_preprocessor(model.cfg)
    kg = [model.encode_entities(b) for b in kg_loader(shards, pre, batch_size=64)]
    from otmel.model import EntityFeatures

    e = EntityFeatures.cat(kg)
    table = torch.full((split_counts(shards)["train"], k), NO_ENTITY)
    for b in eval_loader(shards, "train", pre, batch_size=64):
        s = first_stage_scores(model, model.encode_mentions(b), e, "summary")
        s[e.ids.unsqueeze(0) == b["e_index"].unsqueeze(1)] = float("-inf")
        table[b["m_index"]] = e.ids[s.topk(k, 1).indices]
    return table


def test_mined_table_is_the_first_stage_top_k_without_the_gold(shards: Path) -> None:
    torch.manual_seed(0)
    model = OTMEL(_cfg())
    pre = build_preprocessor(model.cfg)
    model.train()
    table = mine_hard_negatives(model, kg_loader(shards, pre, batch_size=32), eval_loader(shards, "train", pre,
                                batch_size=32), k=6, n_train=split_counts(shards)["train"], world_size=1,
                                image_size=32)
    assert model.training  # restored
    assert torch.equal(table, _brute_force_table(model.eval(), shards, 6))
    gold = torch.full((len(table),), -1)
    for r in train_records(shards):
        gold[int(r["m_index"])] = int(r["e_index"])
    assert (table != gold.unsqueeze(1)).all() and (table != NO_ENTITY).all()
    assert torch.equal(combine_tables(table, None), table) and combine_tables(None, None) is None
    assert combine_tables(table, table).shape == (len(table), 12)


def _mine_worker(rank: int, tmp: str, shards: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=W)
    try:
        model = OTMEL(_cfg())
        model.load_state_dict(torch.load(f"{tmp}/init.pt", weights_only=True))
        pre = build_preprocessor(model.cfg)
        kw = dict(batch_size=16, rank=rank, world_size=W)
        table = mine_hard_negatives(model, kg_loader(Path(shards), pre, **kw),
                                    eval_loader(Path(shards), "train", pre, **kw), k=5,
                                    n_train=split_counts(Path(shards))["train"], world_size=W, image_size=32)
        torch.save(table, f"{tmp}/table{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_mining_on_two_workers_equals_one_worker(shards: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = OTMEL(_cfg())
    torch.save(model.state_dict(), tmp_path / "init.pt")
    spawn_and_join(_mine_worker, (str(tmp_path), str(shards)), W, timeout=180)
    t0, t1 = (torch.load(tmp_path / f"table{r}.pt", weights_only=True) for r in range(W))
    assert torch.equal(t0, t1)
    assert torch.equal(t0, _brute_force_table(model.eval(), shards, 5))


def test_hard_negative_config_is_validated() -> None:
    cfg = load_config(None, ["train.hard_negatives=both", "train.hard_per_mention=2", "train.hard_pool=8"])
    assert cfg.train.hard_negatives == "both"
    with pytest.raises(ValueError, match="hard_pool"):
        load_config(None, ["train.hard_negatives=lexical", "train.hard_per_mention=4", "train.hard_pool=2"])
    with pytest.raises(ValueError, match="not one of"):
        load_config(None, ["train.hard_negatives=random"])
