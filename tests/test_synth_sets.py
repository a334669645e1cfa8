"""The "sets" mode of the synthetic benchmark: no single element singles out an entity, only the set does."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from otmel.cli import main
from otmel.data.synth import attr_text, plan_for
from otmel.data.synth_draw import COLOURS, draw_mention
from otmel.data.synth_sets import GROUP, build_sets_plan


@pytest.fixture(scope="module")
def plan():  # type: ignore[no-untyped-def]
    return build_sets_plan(seed=0, scale=1.0)


def test_groups_share_a_salient_object_and_all_but_one_other(plan) -> None:  # type: ignore[no-untyped-def]
    groups = defaultdict(list)
    for e in plan.entities:
        groups[e.group].append(e)
    assert len(plan.entities) == 2000 and all(len(g) == GROUP for g in groups.values())
    for members in groups.values():
        assert len({e.name for e in members}) == 1  # one name per group: the name cannot decide
        salient = {e.objects[0] for e in members}
        assert len(salient) == 1  # the salient (first) object is shared by all
        sets = [set(e.objects) for e in members]
        assert all(len(s) == GROUP for s in sets)
        for i in range(GROUP):
            for j in range(i + 1, GROUP):
                assert len(sets[i] & sets[j]) == GROUP - 1  # any two members differ in exactly one object
        counts = defaultdict(int)
        for s in sets:
            for o in s:
                counts[o] += 1
        others = [c for o, c in counts.items() if o not in salient]
        assert sorted(others) == [GROUP - 1] * GROUP  # every other object is shared by all members but one


def test_mentions_show_and_name_exactly_the_golds_set(plan) -> None:  # type: ignore[no-untyped-def]
    by_qid = {e.qid: e for e in plan.entities}
    linked = [m for m in plan.mentions if m.answer != "nil"]
    assert len(plan.mentions) == 3000 and 0.95 < len(linked) / 3000 < 0.995
    for m in linked:
        gold = by_qid[m.answer]
        assert set(m.objects) == set(gold.objects) and len(m.objects) == GROUP  # no distractor object
        assert set(m.named) == set(gold.objects) and m.named[0] == gold.objects[0] == m.salient
        # every homonym holds all but one of the named objects: no element but the set decides
        homonyms = [e for e in plan.entities if e.name == gold.name and e.qid != gold.qid]
        assert all(len(set(e.objects) & set(m.named)) == GROUP - 1 for e in homonyms)
    assert {m.split for m in plan.mentions} == {"train", "dev", "test"}
    assert "has a" in attr_text(plan.entities[0])


def test_plan_is_a_function_of_the_seed() -> None:
    a, b, c = build_sets_plan(3, 0.05), build_sets_plan(3, 0.05), build_sets_plan(4, 0.05)
    assert a == b and a != c
    assert plan_for("sets", 3, 0.05) == a
    with pytest.raises(ValueError, match="unknown synth mode"):
        plan_for("hard", 0, 1.0)


def test_salient_object_is_drawn_larger() -> None:
    """Over many pictures the big object covers well over the pixels of the same object at the usual size
    (1.5^2 = 2.25 in radius terms, less where the placement had to shrink the discs to fit)."""
    objs = (("red", "square"), ("blue", "square"), ("green", "square"), ("yellow", "square"))
    areas = []
    for big in (-1, 0):
        total = 0
        for seed in range(20):
            img = draw_mention(objs, 96, np.random.default_rng(seed), noise=0.0, big=big)
            total += (np.abs(np.asarray(img, dtype=np.int16) - np.array(COLOURS["red"])) <= 40).all(-1).sum()
        areas.append(total)
    assert areas[1] > 1.6 * areas[0]


def test_cli_writes_the_sets_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "sets"
    assert main(["synth", "--out", str(out), "--mode", "sets", "--scale", "0.02", "--workers", "1"]) == 0
    stats = json.loads((out / "synth_stats.json").read_text())
    assert stats["mode"] == "sets" and stats["n_entities"] == 40 and stats["mean_entities_per_name"] == GROUP
    kb = json.loads((out / "kb_entity.json").read_text())
    assert all((out / e["image_list"][0]).is_file() for e in kb)
