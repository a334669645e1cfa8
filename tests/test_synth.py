"""The synthetic benchmark: layout, determinism, re-runs, and the properties that make it a benchmark
(name ambiguity, the image disambiguates, the text names the drawn objects but does not decide alone)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from otmel.cli import main
from otmel.data.synth import attr_text, build_plan, generate
from otmel.data.synth_draw import COLOUR_SYNONYMS, COLOURS, SHAPE_SYNONYMS, colour_pixel_counts
from otmel.data.synth_plan import SynthPlan
from otmel.data.synth_stats import plan_stats

SMALL = 0.05  # 100 entities, 150 mentions
LAYOUT_JSON = ("kb_entity.json", "qid2id.json", "synth_train.json", "synth_dev.json", "synth_test.json")


def _hashes(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "synth_stats.json"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    generate(out, seed=0, scale=SMALL, workers=1)
    return out


@pytest.fixture(scope="module")
def plan() -> SynthPlan:
    return build_plan(seed=0, scale=1.0)  # no pixels: fast


def _load(root: Path, name: str) -> object:
    return json.loads((root / name).read_text(encoding="utf-8"))


def test_cleaned_layout(small: Path) -> None:
    kb = _load(small, "kb_entity.json")
    assert isinstance(kb, list) and len(kb) == 100
    for e in kb:
        assert set(e) == {"id", "type", "entity_name", "attr", "image_list"} and e["type"] == "entity"
        assert re.fullmatch(r"Q\d+", e["id"])
        for rel in e["image_list"]:
            assert rel.startswith("kb_image/") and (small / rel).is_file()
    qid2id_text = (small / "qid2id.json").read_text(encoding="utf-8")
    assert qid2id_text.count("\n") == 1 and qid2id_text.endswith("\n")  # one object on one line
    assert json.loads(qid2id_text) == {e["id"]: i for i, e in enumerate(kb)}
    ids, n = set(), 0
    for split in ("train", "dev", "test"):
        rows = _load(small, f"synth_{split}.json")
        n += len(rows)
        for m in rows:
            assert set(m) == {"id", "sentence", "mentions", "imgPath", "answer"}
            assert m["mentions"] in m["sentence"] and "/" not in m["imgPath"]
            assert m["answer"] == "nil" or m["answer"] in {e["id"] for e in kb}
            ids.add(m["id"])
    assert n == len(ids) == 150
    assert [len(_load(small, f"synth_{s}.json")) for s in ("train", "dev", "test")] == [105, 15, 30]
    first = next(e for e in kb if e["image_list"])
    img = Image.open(small / first["image_list"][0])
    assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"


def test_deterministic_per_seed_and_across_worker_counts(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, seed=0, scale=SMALL, workers=2)
    assert _hashes(again) == _hashes(small)
    other = tmp_path / "other"
    generate(other, seed=1, scale=SMALL, workers=1)
    h0, h1 = _hashes(small), _hashes(other)
    assert all(h0[f] != h1[f] for f in LAYOUT_JSON if f != "qid2id.json")  # same QIDs, different entities
    common = set(h0) & set(h1) - set(LAYOUT_JSON)
    assert sum(h0[f] != h1[f] for f in common) > 0.9 * len(common)


def test_rerun_over_existing_folder_is_clean(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "re"
    generate(out, seed=3, scale=0.1, workers=1)  # a bigger, different dataset first
    (out / "notes.txt").write_text("mine")
    generate(out, seed=0, scale=SMALL, workers=1)
    assert {k: v for k, v in _hashes(out).items() if k != "notes.txt"} == _hashes(small)
    assert (out / "notes.txt").read_text() == "mine"  # files the generator does not own are left alone
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_images_show_the_named_objects(small: Path) -> None:
    """Attributes name the objects the KB picture shows; each mention picture shows its gold's objects."""
    kb = {e["id"]: e for e in _load(small, "kb_entity.json")}
    attr_objs = {q: re.findall(r"has an? (\w+) (\w+)", e["attr"]) for q, e in kb.items()}
    checked = 0
    for q, e in kb.items():
        assert 2 <= len(attr_objs[q]) <= 4
        if not e["image_list"]:
            continue
        counts = colour_pixel_counts(Image.open(small / e["image_list"][0]))
        drawn = {c for c, _ in attr_objs[q]}
        for colour, n in counts.items():
            assert (n >= 80) if colour in drawn else (n < 15), (q, colour, n, e["attr"])
    for split in ("train", "dev", "test"):
        for m in _load(small, f"synth_{split}.json"):
            path = small / "mention_image" / m["imgPath"]
            if m["answer"] == "nil" or not path.is_file() or path.stat().st_size < 200:
                continue
            counts = colour_pixel_counts(Image.open(path))
            for colour, _ in attr_objs[m["answer"]]:
                assert counts[colour] >= 20, (m, counts)
            checked += 1
    assert checked > 100


def test_files_match_the_plan(small: Path) -> None:
    p = build_plan(seed=0, scale=SMALL)
    kb = _load(small, "kb_entity.json")
    expected = [(e.qid, e.name, attr_text(e)) for e in p.entities]
    assert [(e["id"], e["entity_name"], e["attr"]) for e in kb] == expected
    rows = {m["id"]: m for s in ("train", "dev", "test") for m in _load(small, f"synth_{s}.json")}
    for m in p.mentions:
        r = rows[m.id]
        assert (r["mentions"], r["sentence"], r["answer"]) == (m.mention, m.sentence, m.answer)
        path = small / "mention_image" / r["imgPath"]
        assert path.is_file() == (m.image != "missing")
        if m.image == "bad":
            with pytest.raises(OSError):
                Image.open(path).load()


def test_names_are_ambiguous_and_the_image_decides(plan: SynthPlan) -> None:
    by_name = defaultdict(list)
    for e in plan.entities:
        by_name[e.name].append(e)
    assert sum(len(v) >= 2 for v in by_name.values()) >= 400
    assert max(len(v) for v in by_name.values()) == 5
    for group in by_name.values():  # object sets distinct, none inside another
        sets = [set(e.objects) for e in group]
        assert all(not a <= b for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j)
    by_qid = {e.qid: e for e in plan.entities}
    for m in plan.mentions:
        if m.answer == "nil":
            continue
        gold = by_qid[m.answer]
        assert set(gold.objects) <= set(m.objects) and len(m.objects) <= len(gold.objects) + 1
        fits = [e for e in by_name[gold.name] if set(e.objects) <= set(m.objects)]
        assert fits == [gold]  # the picture singles out the gold among its homonyms
    shuffled = sum(  # re-drawn, not copied: the order (hence the slots) and the extra object vary
m.objects != by_qid[m.answer].objects for m in plan.mentions if m.answer != "nil")
    assert shuffled > 0.5 * len(plan.mentions)


def test_sentences_name_a_subset_of_the_picture(plan: SynthPlan) -> None:
    words = {c: {c, *COLOUR_SYNONYMS[c]} for c in COLOURS} | {s: {s, *v} for s, v in SHAPE_SYNONYMS.items()}
    partial = 0
    for m in plan.mentions:
        assert set(m.named) <= set(m.objects)
        for c, s in m.named:
            assert any(w in m.sentence for w in words[c]) and any(w in m.sentence for w in words[s])
        partial += len(m.named) < len(set(m.objects))
    assert partial > 0.3 * len(plan.mentions)  # not always all of them
    colour_syns = [syn for v in COLOUR_SYNONYMS.values() for syn in v]
    synonyms = sum(any(syn in m.sentence for syn in colour_syns) for m in plan.mentions)
    assert synonyms > 0.1 * len(plan.mentions)


def test_stats_measure_ambiguity(plan: SynthPlan) -> None:
    st = plan_stats(plan)
    assert st["n_entities"] == 2000 and sum(st["n_mentions"].values()) == 3000
    assert st["n_mentions"] == {"train": 2100, "dev": 300, "test": 600}
    assert 3.0 <= st["mean_entities_per_name"] <= 4.0
    assert st["frac_gold_shares_name"] > 0.9
    assert 0.6 <= st["frac_surface_equals_gold_name"] <= 0.8  # often, not always, the exact name
    assert 0.2 <= st["frac_text_ambiguous"] <= 0.6  # the sentence alone often cannot decide
    assert 0 < st["n_entities_with_image"] < 2000
    assert 0 < st["n_mentions_unreadable_image"] < st["n_mentions_without_image"] < 200
    assert 20 <= st["n_nil"] <= 120


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--scale", "0.02", "--seed", "5", "--workers", "1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_entities"] == 40 and stats["seed"] == 5
    assert all((out / f).is_file() for f in LAYOUT_JSON)
    assert json.loads((out / "synth_stats.json").read_text())["n_entities"] == 40
