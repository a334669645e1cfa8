"""The entity index at scale: first stage as one inner product, faiss ANN equal to exact at exhaustive search
parameters, the disk-backed store, live updates (add / remove / compact / reload), interrupted updates and
refused foreign indexes."""

# ruff: noqa: F811  (pytest fixtures imported from test_link)
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from otmel.cli import main
from otmel.data.pack import pack
from otmel.link import EntityIndex, EntityIndexError, IndexMismatchError, Linker, build_index
from otmel.link.ann import AnnError, AnnParams
from otmel.link.evaluate import evaluate, read_split
from otmel.link.index_update import add_to_index, compact_index, remove_from_index
from otmel.model import OTMEL, EntityFeatures
from otmel.model.first_stage import entity_vectors, first_stage_scores, mention_queries, scores_from_vectors
from otmel.model.testing import random_batch, tiny_cfg
from tests.test_link import ckpt, index_dir, kg, make_checkpoint  # noqa: F401 (fixtures)


@pytest.mark.parametrize("variant", ["OT", "A1", "KD", "CLS", "M2", "F2", "O1"])
@pytest.mark.parametrize("images", [True, False])
def test_first_stage_is_one_inner_product_per_image_partition(variant: str, images: bool) -> None:
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg(variant, use_images=images)).eval()
    b = random_batch(8)
    with torch.no_grad():
        m, e = model.encode_mentions(b), model.encode_entities(b)
    x = entity_vectors(model, e)
    for kind in ("summary", "cls", "fusion"):
        ref = first_stage_scores(model, m, e, kind)  # type: ignore[arg-type]
        got = scores_from_vectors(mention_queries(model, m, kind), x, e.has_image)  # type: ignore[arg-type]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{variant} {kind}")


@pytest.fixture(scope="module")
def mention_feats(ckpt: Path, kg: Path):  # type: ignore[no-untyped-def]
    linker = Linker.from_checkpoint(ckpt, kg=kg)
    batch, metas = read_split(kg, "test", linker.pre, limit=12)
    return linker.encode(batch), metas


EXHAUSTIVE = {"hnsw": AnnParams("hnsw", hnsw_m=8, ef_search=512),
              "ivfpq": AnnParams("ivfpq", nlist=4, nprobe=4, pq_m=8, refine=200)}


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_ann_equals_exact_at_exhaustive_search_parameters(kind: str, ckpt: Path, kg: Path, index_dir: Path,
                                                          mention_feats, tmp_path: Path) -> None:
    ann = build_index(ckpt, kg, tmp_path / kind, ann=EXHAUSTIVE[kind], progress=False)
    assert (tmp_path / kind / "seg-0000" / f"ann-{kind}-p1.faiss").is_file()
    exact = EntityIndex.load(index_dir)
    m, _ = mention_feats
    model = Linker.from_checkpoint(ckpt, index_dir).model
    q = mention_queries(model, m, "summary")
    s_ex, r_ex = exact.search(q, 10)
    s_ann, r_ann = ann.search(q, 10)
    assert torch.equal(r_ann, r_ex)
    torch.testing.assert_close(s_ann, s_ex)  # reported first-stage scores are exact
    # and exact search is the exact first stage
    ref = first_stage_scores(model, m, exact.features, "summary")
    torch.testing.assert_close(s_ex, ref.sort(1, descending=True).values[:, :10], rtol=1e-5, atol=1e-6)
    a, b = Linker(Linker.from_checkpoint(ckpt, index_dir).loaded, ann), Linker.from_checkpoint(ckpt, index_dir)
    for ha, hb in zip(a.rank(m, k=5, candidates=16), b.rank(m, k=5, candidates=16), strict=True):
        assert [h.qid for h in ha] == [h.qid for h in hb]
        assert [h.S_O for h in ha] == pytest.approx([h.S_O for h in hb], abs=1e-6)
    # a starved search is allowed to differ but must still return k live rows
    s, r = ann.search(q, 10, **({"ef_search": 1} if kind == "hnsw" else {"nprobe": 1, "refine": 1}))
    assert r.shape == (len(m), 10) and bool((r >= 0).all())
    with pytest.raises(AnnError, match="build parameters"):
        ann.search(q, 10, hnsw_m=4)


def test_auto_is_exact_below_the_threshold_and_the_cli_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from otmel.link.ann import AUTO_EXACT_BELOW, AUTO_HNSW_BELOW

    assert AnnParams("auto").resolve(AUTO_EXACT_BELOW - 1).kind == "exact"
    assert AnnParams("auto", nprobe=7).resolve(AUTO_EXACT_BELOW) == AnnParams("hnsw", nprobe=7)
    assert AnnParams("auto").resolve(AUTO_HNSW_BELOW).kind == "ivfpq"
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{AUTO_EXACT_BELOW:,}" in text and f"{AUTO_HNSW_BELOW:,}" in text
    with pytest.raises(AnnError, match="unknown ANN kind"):
        AnnParams("lsh")


def test_eval_through_an_ann_index_equals_exact(ckpt: Path, kg: Path, index_dir: Path, tmp_path: Path) -> None:
    build_index(ckpt, kg, tmp_path / "h", ann=EXHAUSTIVE["hnsw"], progress=False)
    common = dict(modes=["two-stage"], candidates=8, limit=20)
    ref = evaluate(ckpt, kg, "test", index=index_dir, **common)  # type: ignore[arg-type]
    got = evaluate(ckpt, kg, "test", index=tmp_path / "h", **common)  # type: ignore[arg-type]
    assert got["first_stage_index"] == "hnsw"
    assert got["per_mention"]["two-stage"]["rank"] == ref["per_mention"]["two-stage"]["rank"]
    assert got["per_mention"]["two-stage"]["top1"] == ref["per_mention"]["two-stage"]["top1"]


def test_float16_store_is_close_and_half_the_size(ckpt: Path, kg: Path, index_dir: Path, tmp_path: Path) -> None:
    half = build_index(ckpt, kg, tmp_path / "f16", store_dtype="float16", vector_dtype="float16", progress=False)
    full = EntityIndex.load(index_dir)
    for name in ("records.bin", "vectors.npy"):
        size = lambda p: (p / "seg-0000" / name).stat().st_size  # noqa: B023, E731
        assert abs(size(tmp_path / "f16") * 2 - size(index_dir)) <= 128, name  # (.npy header)
    a, b = half.gather([3, 50]), full.gather([3, 50])
    assert torch.equal(a.mask_t, b.mask_t)
    torch.testing.assert_close(a.q_t, b.q_t, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(half.vectors(np.arange(100))),
                               torch.from_numpy(full.vectors(np.arange(100))), rtol=1e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------- live updates


def renamed_kg(kg_src: Path, out: Path, prefix: str, shard_size: int = 40) -> Path:
    """A copy of a cleaned synth folder with every QID renamed (Q... -> PREFIX...), packed into OUT/shards."""
    src = out / "src"
    shutil.copytree(kg_src, src)
    for img in (src / "kb_image").iterdir():
        img.rename(img.with_name(prefix + img.name[1:]))
    for f in src.glob("*.json"):
        f.write_text(f.read_text().replace('"Q1', f'"{prefix}1').replace("/Q1", f"/{prefix}1"))
    pack(src, "cleaned", out / "shards", shard_size=shard_size, progress=False)
    return out / "shards"


@pytest.fixture(scope="module")
def extra_kg(kg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return renamed_kg(kg.parent / "src", tmp_path_factory.mktemp("extra"), "N")


def _top(linker: Linker, m, k: int = 5, mode: str = "exhaustive") -> list[list[str]]:  # type: ignore[no-untyped-def]
    return [[h.qid for h in hits] for hits in linker.rank(m, k=k, mode=mode, candidates=32)]


def test_add_remove_compact_reload_change_the_answers(ckpt: Path, kg: Path, extra_kg: Path, index_dir: Path,
                                                      mention_feats, tmp_path: Path) -> None:
    path = tmp_path / "live"
    shutil.copytree(index_dir, path)
    m, _ = mention_feats
    linker = Linker.from_checkpoint(ckpt, path)
    before = _top(linker, m)
    add = add_to_index(path, extra_kg, ckpt)
    assert add["added"] == 100 and add["segment"] == "seg-0001"
    assert _top(linker, m) == before  # the old generation until reload
    assert linker.reload() and not linker.reload()
    assert len(linker.index) == 200 and linker.index.generation == 2
    # the added rows equal an index of the new KG alone, after the old rows
    alone = build_index(ckpt, extra_kg, progress=False)
    got, want = linker.index.gather(np.arange(100, 200)), alone.features
    for f in ("t", "g", "v", "mask_t"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert torch.equal(got.ids, torch.arange(100, 200)) and linker.index.qid(150) == alone.qid(50)
    # answers = the model's ranking over the union (both modes)
    union = EntityFeatures.cat([EntityIndex.load(index_dir).features, got])
    with torch.no_grad():
        S = linker.model.score(m, union).S_O
    expect = [[linker.index.qid(int(r)) for r in torch.sort(S[i], descending=True, stable=True).indices[:5]]
              for i in range(len(m))]
    assert _top(linker, m) == expect
    full_k = [[h.qid for h in hits] for hits in linker.rank(m, k=5, mode="two-stage", candidates=200)]
    assert full_k == expect
    assert any(q.startswith("N") for row in expect for q in row)  # the new entities do compete
    # remove every current top-1: they vanish, the runner-up moves up
    top1 = sorted({row[0] for row in expect})
    assert remove_from_index(path, top1)["removed"] == len(top1)
    assert linker.reload()
    after = _top(linker, m)
    for row, old in zip(after, expect, strict=True):
        assert not set(row) & set(top1)
        assert row[0] == next(q for q in old if q not in top1) or old[1] in top1
    for row in _top(linker, m, mode="two-stage"):
        assert not set(row) & set(top1)
    # more candidates than live rows: every live row comes back once, the removed ones never (they are -1, not a
    # very negative score: np.nan_to_num once turned their -inf into -3.4e38 and they were re-ranked back in)
    from otmel.model.first_stage import mention_queries

    _, rows = linker.index.search(mention_queries(linker.model, m, "summary"), 400)
    assert ((rows >= 0).sum(1) == len(linker.index)).all()
    dead_rows = set(linker.index.dead.tolist())
    assert not dead_rows & set(rows[rows >= 0].tolist())
    for row in [[h.qid for h in hits] for hits in linker.rank(m, k=5, mode="two-stage", candidates=400)]:
        assert not set(row) & set(top1)
    with pytest.raises(KeyError, match="not in the index"):
        remove_from_index(path, [top1[0]])
    with pytest.raises(ValueError, match="removed entities"):
        evaluate(ckpt, kg, "test", index=path, modes=["exhaustive"], limit=4)
    # compact: same answers, one segment, no tombstones, rows renumbered
    compact_index(path)
    assert linker.reload()
    assert _top(linker, m) == after
    assert len(linker.index) == linker.index.rows == 200 - len(top1)
    names = {p.name for p in path.iterdir()}
    assert names == {"index.json", ".lock", "seg-0002"}, names
    meta = json.loads((path / "index.json").read_text())
    assert meta["tombstones"] is None and meta["compacted"] and meta["generation"] == 4  # build, add, remove, compact


def test_interrupted_add_leaves_the_old_index_usable(ckpt: Path, extra_kg: Path, index_dir: Path,
                                                     mention_feats, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "live"
    shutil.copytree(index_dir, path)
    m, _ = mention_feats
    before = _top(Linker.from_checkpoint(ckpt, path), m)
    import otmel.link.index_update as upd

    def crash(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed before the manifest switch")

    monkeypatch.setattr(upd, "atomic_json", crash)
    with pytest.raises(KeyboardInterrupt):
        add_to_index(path, extra_kg, ckpt)
    monkeypatch.undo()
    index = EntityIndex.load(path)
    assert index.generation == 1 and len(index) == 100
    assert _top(Linker.from_checkpoint(ckpt, path), m) == before
    # the next change clears the orphan segment and succeeds
    assert (path / "seg-0001").exists()
    assert add_to_index(path, extra_kg, ckpt)["segment"] == "seg-0002"
    assert not (path / "seg-0001").exists() and len(EntityIndex.load(path)) == 200

    # a crash while encoding leaves no temporary folder
    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("encoder died")

    monkeypatch.setattr(upd, "encode_kg_segment", broken)
    other = renamed_kg(extra_kg.parent / "src", tmp_path / "third", "R")
    with pytest.raises(RuntimeError, match="encoder died"):
        add_to_index(path, other, ckpt)
    assert not [p for p in path.iterdir() if p.name.startswith(".seg")]
    assert EntityIndex.load(path).generation == 2


def test_updates_refuse_another_checkpoint_the_same_kg_and_duplicate_qids(ckpt: Path, kg: Path, extra_kg: Path,
                                                                          index_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "live"
    shutil.copytree(index_dir, path)
    other = make_checkpoint(tmp_path / "other", seed=9)
    with pytest.raises(IndexMismatchError, match="sha256"):
        add_to_index(path, extra_kg, other)
    with pytest.raises(EntityIndexError, match="already in the index"):
        add_to_index(path, kg, ckpt)  # the base KG again
    repacked = tmp_path / "repacked"
    pack(kg.parent / "src", "cleaned", repacked, shard_size=33, progress=False)  # same QIDs, other shards
    with pytest.raises(EntityIndexError, match="already in the index"):
        add_to_index(path, repacked, ckpt)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        EntityIndex.load(path).check_kg(extra_kg)
    with pytest.raises(IndexMismatchError):
        evaluate(ckpt, extra_kg, "test", index=path, modes=["two-stage"], limit=4)
    from otmel.link.index_update import index_lock

    with index_lock(path), pytest.raises(EntityIndexError, match="being changed by another process"):
        remove_from_index(path, ["Q1000001"])  # one writer at a time
    assert EntityIndex.load(path).generation == 1  # nothing changed


def test_index_update_cli(ckpt: Path, kg: Path, extra_kg: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(ckpt), "--kg", str(kg), "--out", str(out), "--workers", "0",
                 "--ann", "hnsw", "--hnsw-m", "8", "--no-progress"]) == 0
    assert "hnsw first stage" in capsys.readouterr().out
    assert main(["index", "--add", str(extra_kg), "--into", str(out), "--workers", "0", "--no-progress"]) == 0
    assert "added 100 entities" in capsys.readouterr().out
    assert main(["index", "--remove", "N1000001", "Q1000001", "--into", str(out)]) == 0
    assert "removed 2 entities" in capsys.readouterr().out
    assert main(["index", "--remove", "nope", "--into", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["index", "--compact", "--into", str(out)]) == 0
    assert "198 entities" in capsys.readouterr().out
    assert main(["index", "--compact"]) == 2
    assert "--into" in capsys.readouterr().err
    meta = json.loads((out / "index.json").read_text())
    assert meta["ann"]["kind"] == "hnsw" and len(meta["segments"]) == 1
    assert (out / meta["segments"][0]["dir"] / "ann-hnsw-p1.faiss").is_file()
    sample = read_split(kg, "test", Linker.from_checkpoint(ckpt, out).pre, limit=1)[1][0]
    assert main(["link", "--checkpoint", str(ckpt), "--index", str(out), "--text", sample["sentence"],
                 "--mention", sample["mention"], "--ef-search", "300", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["results"]) == 10 and "Q1000001" not in {r["qid"] for r in res["results"]}
