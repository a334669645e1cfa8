"""Linking: entity index, Linker (exhaustive / two-stage), first-stage scores, evaluation of the modes.

A tiny synthetic KG (100 entities) and randomly initialised tiny models saved as checkpoint folders: no
training, no Ray (the Ray index builder is tested in test_link_cli.py, marked slow).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from otmel.data.loaders import eval_loader, kg_loader
from otmel.data.manifest import KG, shard_infos
from otmel.data.shards import iter_shard, sha256_file
from otmel.link import (
    EntityIndex,
    EntityIndexError,
    IndexMismatchError,
    Linker,
    LinkInputError,
    MentionNotInTextWarning,
    build_index,
    load_checkpoint_model,
    save_model_checkpoint,
)
from otmel.link.evaluate import encode_mentions, evaluate, format_eval, read_split
from otmel.metrics import gold_ranks, metrics_from_ranks
from otmel.model import OTMEL, EntityFeatures
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import first_stage_scores, stable_topk
from otmel.model.testing import tiny_cfg
from otmel.train.worker.evaluate import evaluate_split
from tests.ray_helpers import synth_shards

FIELDS = ("t", "ids", "has_image", "v", "g", "mask_t", "q_t", "q_t_s", "mask_v", "q_v", "q_v_s")


def make_checkpoint(directory: Path, seed: int, variant: str = "OT", **kw: object) -> Path:
    torch.manual_seed(seed)
    return save_model_checkpoint(directory, OTMEL(tiny_cfg(variant, **kw)))


# Session fixtures keep their data under fixed names in the session's base temp folder and reuse it when it is
# already there, so that test_link_cli.py (which imports them) does not build everything a second time.


@pytest.fixture(scope="session")
def kg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "link-synth"
    if not (root / "shards" / "manifest.json").exists():
        synth_shards(root, seed=5, scale=0.05)
    return root / "shards"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "link-ckpt-a"
    return out if (out / "state.json").exists() else make_checkpoint(out, seed=1)


@pytest.fixture(scope="session")
def index_dir(ckpt: Path, kg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "link-indexes" / "synth"
    if not (out / "index.json").exists():
        build_index(ckpt, kg, out, workers=0, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def linker(ckpt: Path, index_dir: Path) -> Linker:
    return Linker.from_checkpoint(ckpt, index_dir)


@pytest.fixture(scope="session")
def mentions(linker: Linker, kg: Path) -> tuple[dict, list[dict]]:
    return read_split(kg, "test", linker.pre)


# ------------------------------------------------------------------------------------------------ index


def test_index_round_trip_equals_in_memory_features(ckpt: Path, kg: Path, index_dir: Path) -> None:
    loaded = load_checkpoint_model(ckpt)
    fresh = build_index(loaded, kg, workers=0, batch_size=64, progress=False)  # temporary folder, other batch size
    stored = EntityIndex.load(index_dir, checkpoint_sha256=loaded.sha256)
    assert len(stored) == len(fresh) == 100
    for name in FIELDS:
        a, b = getattr(fresh.features, name), getattr(stored.features, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert stored.qids == fresh.qids and stored.names == fresh.names
    assert all(torch.equal(stored.input_ids(r), fresh.input_ids(r)) for r in (0, 50, 99))
    # an independent path: the training code's KG stream + encode_entities (in RAM), rows gathered by e_index
    batches = list(kg_loader(kg, build_preprocessor(loaded.config), batch_size=17))
    with torch.no_grad():
        ref = EntityFeatures.cat([loaded.model.encode_entities(b) for b in batches])
    ref = ref.select(torch.argsort(ref.ids))
    got = stored.gather(torch.tensor([99, 0, 41, 7]))  # any order, one contiguous record read each
    want = ref.select(torch.tensor([99, 0, 41, 7]))
    assert torch.equal(got.ids, want.ids) and torch.equal(got.has_image, want.has_image)
    assert torch.equal(got.mask_t, want.mask_t) and torch.equal(got.mask_v, want.mask_v)
    for name in ("t", "v", "g"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    for name, mask in (("q_t", got.mask_t), ("q_v", got.mask_v)):  # trimmed on disk: equal on every valid token
        torch.testing.assert_close(getattr(got, name)[mask], getattr(want, name)[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the model scores them the same
        mb, _ = read_split(kg, "test", build_preprocessor(loaded.config), limit=4)
        m = loaded.model.encode_mentions(mb)
        torch.testing.assert_close(loaded.model.score(m, got).S_O, loaded.model.score(m, want).S_O,
                                   rtol=1e-5, atol=1e-5)
    # rows in KG order, with each row's QID and name from the shards
    metas = [json.loads(s["json"]) for info in shard_infos(kg, KG) for s in iter_shard(kg / info.name)]
    assert stored.qids == [m["qid"] for m in metas] and stored.names == [m["name"] for m in metas]
    assert torch.equal(stored.features.ids, torch.arange(100))


def test_index_json_records_checkpoint_hash_and_rows(ckpt: Path, kg: Path, index_dir: Path) -> None:
    meta = json.loads((index_dir / "index.json").read_text())
    assert meta["schema"] == "otmel-entity-index" and meta["schema_version"] == 2 and meta["generation"] == 1
    assert meta["checkpoint"]["sha256"] == sha256_file(ckpt / "model.safetensors")
    assert meta["counts"]["entities"] == 100 == meta["segments"][0]["rows"]
    assert meta["model_config"]["hidden_dim"] == 16 and meta["ann"]["kind"] == "exact"
    assert {p.name for p in index_dir.iterdir()} == {"seg-0000", "index.json"}
    seg = {p.name for p in (index_dir / "seg-0000").iterdir()}
    assert {"vectors.npy", "records.bin", "spans.npy", "lengths.npy", "strings.bin", "layout.json"} <= seg
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    # records are trimmed to the valid tokens: smaller than padding every entity to max_len
    lay = meta["layout"]
    padded = sum(w for _, w in lay["fixed"]) + sum(lay["lengths"][ax] * h for _, h, ax in lay["tokens"])
    assert (index_dir / "seg-0000" / "records.bin").stat().st_size < 100 * padded * 4


def test_index_rewrite_is_atomic_and_refuses_foreign_folders(ckpt: Path, kg: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    first = build_index(ckpt, kg, out, progress=False)
    build_index(ckpt, kg, out, progress=False)  # replaces the folder in place
    assert EntityIndex.load(out).qids == first.qids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EntityIndexError, match="not an entity index"):
        build_index(ckpt, kg, tmp_path / "mine", progress=False)
    with pytest.raises(EntityIndexError, match="not an entity index"):
        EntityIndex.load(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_index_of_another_checkpoint_is_refused(ckpt: Path, index_dir: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", seed=2)
    mine, theirs = sha256_file(ckpt / "model.safetensors"), sha256_file(other / "model.safetensors")
    assert mine != theirs
    with pytest.raises(IndexMismatchError) as exc:
        Linker.from_checkpoint(other, index_dir)
    assert mine in str(exc.value) and theirs in str(exc.value)
    with pytest.raises(IndexMismatchError):
        EntityIndex.load(index_dir, checkpoint_sha256=theirs)


# ---------------------------------------------------------------------------------------------- linking


def test_exhaustive_equals_ranking_all_entities_with_model_score(linker: Linker, mentions: tuple) -> None:
    batch, _ = mentions
    m = linker.encode({k: v[:6] for k, v in batch.items()})
    hits = linker.rank(m, k=len(linker.index), mode="exhaustive")
    with torch.no_grad():
        s = linker.model.score(m, linker.index.features)
    for i, row_hits in enumerate(hits):
        order = torch.sort(s.S_O[i], descending=True, stable=True).indices
        assert [h.row for h in row_hits] == order.tolist()
        assert [h.qid for h in row_hits] == [linker.index.qids[r] for r in order.tolist()]
        for h in row_hits[:5]:
            assert abs(h.S_O - float(s.S_O[i, h.row])) <= 1e-6
            assert abs(h.S_F - float(s.S_F[i, h.row])) <= 1e-6
            assert abs(h.S_T - float(s.S_T[i, h.row])) <= 1e-6
            if bool(s.V_valid[i, h.row]):
                assert abs(h.S_V - float(s.S_V[i, h.row])) <= 1e-6
            else:
                assert h.S_V is None


def test_two_stage_with_k_equal_to_the_kg_equals_exhaustive(linker: Linker, mentions: tuple) -> None:
    batch, _ = mentions
    m = linker.encode({k: v[:8] for k, v in batch.items()})
    ex = linker.rank(m, k=20, mode="exhaustive")
    ts = linker.rank(m, k=20, mode="two-stage", candidates=len(linker.index))
    for a, b in zip(ex, ts, strict=True):
        assert [h.row for h in a] == [h.row for h in b]
        assert [h.S_O for h in a] == pytest.approx([h.S_O for h in b], abs=1e-5)
        assert all(h.first_stage is not None for h in b)


def test_two_stage_reranks_the_first_stage_top_k(linker: Linker, mentions: tuple) -> None:
    batch, _ = mentions
    m = linker.encode({k: v[:5] for k, v in batch.items()})
    e = linker.index.features
    _, cand = stable_topk(first_stage_scores(linker.model, m, e, "summary"), 8)
    with torch.no_grad():
        S = linker.model.score(m, e).S_O
    hits = linker.rank(m, k=8, mode="two-stage", candidates=8)
    for i, row_hits in enumerate(hits):
        assert sorted(h.row for h in row_hits) == sorted(cand[i].tolist())
        expect = sorted(cand[i].tolist(), key=lambda r: (-float(S[i, r]), r))
        assert [h.row for h in row_hits] == expect


def test_first_stage_is_exact_when_every_assignment_is_trivial(tmp_path: Path) -> None:
    """A mention with a single token and no images: every CA assigns all weight to that one token, so the
    uniform-assignment summary equals the model's S_T and the first stage equals S_O."""
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg("OT", use_images=False)).eval()
    from otmel.model.testing import random_batch

    b = random_batch(6, images=False)
    b["m_attention_mask"][:] = 0
    b["m_attention_mask"][:, 0] = 1
    with torch.no_grad():
        m = model.encode_mentions(b)
        e = model.encode_entities(b)
        exact = model.score(m, e).S_O
    torch.testing.assert_close(first_stage_scores(model, m, e, "summary"), exact, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first_stage_scores(model, m, e, "cls"), exact, atol=1e-3)
    m2 = OTMEL(tiny_cfg("M2")).eval()  # no unimodal matching: every first stage is S_F = S_O
    b = random_batch(6)
    with torch.no_grad():
        mm, ee = m2.encode_mentions(b), m2.encode_entities(b)
        torch.testing.assert_close(first_stage_scores(m2, mm, ee, "summary"), m2.score(mm, ee).S_O)


def test_stable_topk_breaks_ties_by_column_and_puts_nan_last() -> None:
    s = torch.tensor([[0.5, 0.9, 0.5, float("nan"), 0.9, 0.1] + [0.0] * 30])
    vals, idx = stable_topk(s, 4)  # partial-selection path (4 * 4 < 36)
    assert idx.tolist() == [[1, 4, 0, 2]]
    assert stable_topk(s, 36)[1][0, -1].item() == 3  # full-sort path: NaN last
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 5, (7, 300), generator=g).float()  # many ties
    for k in (1, 10, 60, 300):
        full = torch.sort(r, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(stable_topk(r, k)[1], full)


def test_link_api_and_image_inputs_agree(linker: Linker, kg: Path, tmp_path: Path) -> None:
    sample = next(iter_shard(kg / shard_infos(kg, "test")[0].name))
    meta, jpg = json.loads(sample["json"]), sample["m.jpg"]
    path = tmp_path / "m.jpg"
    path.write_bytes(jpg)
    hits = linker.link(meta["sentence"], meta["mention"], path, k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].S_O >= hits[1].S_O >= hits[2].S_O
    for image in (jpg, Image.open(io.BytesIO(jpg)).convert("RGB")):
        again = linker.link(meta["sentence"], meta["mention"], image, k=3)
        assert [h.row for h in again] == [h.row for h in hits]
        assert abs(again[0].S_O - hits[0].S_O) <= 1e-6
    no_image = linker.link(meta["sentence"], meta["mention"], k=3)
    assert all(h.S_V is None for h in no_image)
    assert set(hits[0].to_dict()) >= {"rank", "row", "qid", "name", "S_O", "S_F", "S_T", "S_V", "first_stage"}


def test_bad_inputs_raise_clear_errors(linker: Linker, tmp_path: Path) -> None:
    with pytest.raises(LinkInputError, match="mention is empty"):
        linker.link("Some text.", "")
    with pytest.raises(LinkInputError, match="mention is empty"):
        linker.link("Some text.", "   ")
    with pytest.warns(MentionNotInTextWarning, match="does not occur"):
        hits = linker.link("A photo of a red star.", "Ada Lovelace", k=2)
    assert len(hits) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linker.link("A photo of ADA   lovelace.", "Ada Lovelace", k=1)  # case and spacing do not matter
    with pytest.raises(LinkInputError, match="cannot be read"):
        linker.link("Ada here.", "Ada", tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    with pytest.raises(LinkInputError, match=r"bad\.jpg: not a readable image"):
        linker.link("Ada here.", "Ada", bad)
    with pytest.raises(LinkInputError, match="not a readable image"):
        linker.link("Ada here.", "Ada", b"garbage")
    with pytest.raises(LinkInputError, match="mode must be one of") as bad_mode:
        linker.link("Ada here.", "Ada", mode="fast")
    assert bad_mode.value.field == "mode" and "fast" not in str(bad_mode.value)  # a value is never echoed
    with pytest.raises(LinkInputError, match="k must be"):
        linker.link("Ada here.", "Ada", k=0)
    with pytest.raises(EntityIndexError, match="not an entity index"):
        Linker.from_checkpoint(linker.loaded.path, tmp_path)


def test_text_only_model_ignores_an_image_with_a_warning(kg: Path, tmp_path: Path) -> None:
    ck = make_checkpoint(tmp_path / "text", seed=3, use_images=False)
    lk = Linker.from_checkpoint(ck, kg=kg)  # no index: the KG is encoded in memory
    img = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(img, format="PNG")
    with pytest.warns(UserWarning, match="text-only"):
        hits = lk.link("Ada here.", "Ada", img.getvalue(), k=2)
    assert hits[0].S_V is None and len(hits) == 2


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluate_modes_agree_at_full_k_and_match_the_training_evaluator(ckpt: Path, kg: Path,
                                                                          index_dir: Path) -> None:
    res = evaluate(ckpt, kg, "test", candidates=100, index=index_dir, sweep_ks=(1, 4, 100),
                   sweep_first_stages=("summary", "fusion"))
    ex, ts = res["modes"]["exhaustive"], res["modes"]["two-stage"]
    assert res["agreement_top1"] == 1.0 and res["entities"] == 100
    assert res["mentions"] == json.loads((kg / "manifest.json").read_text())["counts"]["test"]
    assert ex["metrics"] == pytest.approx(ts["metrics"])
    assert res["sweep"]["summary"]["100"]["agreement_top1"] == 1.0
    assert res["sweep"]["summary"]["100"]["H@1"] == pytest.approx(ex["metrics"]["H@1"])
    assert res["sweep"]["fusion"]["1"]["agreement_top1"] <= 1.0
    # the same metrics as the training code's whole-KG evaluator (loaders + gold_ranks_distributed)
    loaded = load_checkpoint_model(ckpt)
    pre = build_preprocessor(loaded.config)
    ref, ranks = evaluate_split(loaded.model, kg_loader(kg, pre, batch_size=32),
                                eval_loader(kg, "test", pre, batch_size=32), 1)
    assert res["per_mention"]["exhaustive"]["rank"] == ranks.tolist()
    assert ex["metrics"] == pytest.approx(ref)


def test_two_stage_ranks_and_the_sweep_match_a_real_two_stage_pass(ckpt: Path, kg: Path, index_dir: Path) -> None:
    res = evaluate(ckpt, kg, "test", candidates=4, index=index_dir, sweep_ks=(4,), sweep_first_stages=("summary",))
    per = res["per_mention"]
    sweep_top1 = res["sweep"]["summary"]["4"]
    assert sweep_top1["agreement_top1"] == pytest.approx(res["agreement_top1"])
    gold = torch.tensor(per["gold"])
    assert sweep_top1["H@1"] == pytest.approx(float((torch.tensor(per["two-stage"]["top1"]) == gold).double().mean()))
    r2, r1 = torch.tensor(per["two-stage"]["rank"]), torch.tensor(per["exhaustive"]["rank"])
    assert bool(((r2 == 1) == (torch.tensor(per["two-stage"]["top1"]) == gold)).all())
    assert bool((r2 >= 1).all()) and bool((r2 <= 100).all())
    # wherever the gold is the exhaustive top-1 and was retrieved, both modes rank it first
    assert bool((r2[(r1 == 1) & (r2 <= 4)] == 1).all())


def test_one_ranking_in_eval_the_api_and_the_batch_api_whatever_the_threads(ckpt: Path, kg: Path,
                                                                            index_dir: Path) -> None:
    """`otmel eval`, `Linker.rank` on one mention (what `link` runs) and on a batch (what the service runs) rank
    through the same code: the same top-1 per mention in both modes, up to a near-tie (tests/ranking_helpers.py);
    and a ranking does not depend on the number of threads at all."""
    res = evaluate(ckpt, kg, "test", candidates=8, index=index_dir, limit=12, seed=3)
    linker = Linker.from_checkpoint(ckpt, index_dir, candidates=8)
    batch, _ = read_split(kg, "test", linker.pre, limit=12, seed=3)
    for mode in ("two-stage", "exhaustive"):
        for i, want in enumerate(res["per_mention"][mode]["top1"]):
            hits = linker.rank(linker.encode({k: v[i:i + 1] for k, v in batch.items()}), k=3, mode=mode)[0]
            if hits[0].row != want:  # only a near-tie may differ
                other = next(h for h in hits if h.row == want)
                assert abs(other.S_O - hits[0].S_O) <= 1e-5, (mode, i, hits, want)
    m = linker.encode(batch)
    threads = torch.get_num_threads()
    try:
        answers = []
        for n in (1, 2):
            torch.set_num_threads(n)
            answers.append([[(h.row, h.S_O, h.first_stage) for h in hits]
                            for mode in ("two-stage", "exhaustive") for hits in linker.rank(m, k=5, mode=mode)])
        assert answers[0] == answers[1]  # bit for bit
    finally:
        torch.set_num_threads(threads)


def test_term_metrics_rank_by_each_score_term_alone(ckpt: Path, kg: Path, index_dir: Path) -> None:
    res = evaluate(ckpt, kg, "test", modes=("exhaustive",), index=index_dir, terms=True)
    terms = res["modes"]["exhaustive"]["terms"]
    assert set(terms) == {"S_F", "S_T", "S_V", "cos_t", "ca_t"}
    # reference: score the KG directly and rank by each term
    loaded = load_checkpoint_model(ckpt)
    batch, _ = read_split(kg, "test", build_preprocessor(loaded.config))
    m, e = encode_mentions(loaded, batch), EntityIndex.load(index_dir).features
    with torch.no_grad():
        s = loaded.model.score(m, e)
    ref = {"S_F": s.S_F, "S_T": s.S_T, "cos_t": m.t @ e.t.t(), "ca_t": 2 * s.S_T - m.t @ e.t.t()}
    for name, S in ref.items():
        assert terms[name] == pytest.approx(metrics_from_ranks(gold_ranks(S, batch["e_index"])), abs=1e-9), name
    # the text CA half and the pooled half are different rankings (else the term split would be vacuous)
    assert terms["ca_t"] != terms["cos_t"]
    assert "by cos_t" in format_eval(res) and "terms" not in evaluate(ckpt, kg, "test", modes=("exhaustive",),
                                                                      index=index_dir, limit=5)["modes"]["exhaustive"]


def test_evaluate_with_a_limit_reads_a_seeded_subset(ckpt: Path, kg: Path, index_dir: Path) -> None:
    loaded = load_checkpoint_model(ckpt)
    pre = build_preprocessor(loaded.config)
    a, _ = read_split(kg, "test", pre, limit=7, seed=3)
    b, _ = read_split(kg, "test", pre, limit=7, seed=3)
    assert torch.equal(a["m_index"], b["m_index"]) and len(a["m_index"]) == 7
    assert bool((a["m_index"].diff() > 0).all())
    assert len(encode_mentions(loaded, a, batch_size=3)) == 7
    res = evaluate(loaded, kg, "test", modes=("two-stage",), candidates=10, index=index_dir, limit=7, seed=3)
    assert res["mentions"] == 7 and "agreement_top1" not in res
