"""A synthetic multimodal entity-linking benchmark, written in the cleaned layout of the public MEL code.

`generate(out, seed=0, scale=1.0)` writes `kb_entity.json`, `qid2id.json`, `synth_{train,dev,test}.json`,
`kb_image/`, `mention_image/` (JPEG) and `synth_stats.json` (not part of the layout; readers ignore it).
Scale 1 gives about 2,000 entities and 3,000 mentions (70/10/20 split); entity and mention counts scale
linearly with `scale`.

How the benchmark forces both modalities to matter:

- **Lexical ambiguity.** Entities come in *name groups* of 1-5 entities that share one name (mean ~3.4;
  10% of groups are singletons). Most mention surface forms are exactly that name, so a string matcher can at
  best pick among the group. Other surface forms (last / first token only, a case or spacing variant, the name
  plus a descriptor word, a one-letter typo) make names of *other* groups compete as well.
- **The image decides within a group.** Every entity shows 2-4 coloured shapes ("red circle", ...).
  The members of a group share 1-2 *core* objects and each adds 1-2 *extra* objects that no other member of
  the group has, so no member's object set contains another's. A mention's picture shows all of its gold
  entity's objects, re-drawn with jitter (`synth_draw.draw_mention`), plus in 40% of cases one distractor
  object that no member of the group has. Hence within the gold's name group exactly one entity has all its
  objects in the mention picture: an image-aware model can be perfect, a name matcher cannot.
- **Text helps, but not alone.** The attributes name the entity's objects ("kind: banner. has a red circle.
  has a blue square"); the mention sentence names a subset of its picture's objects, often with synonyms
  ("crimson disc"). In ~30% of the ambiguous cases it names only core objects, which all members share, and
  in ~10% none at all; then only the picture separates the group (`frac_text_ambiguous` in the stats).
- **Missing / bad data.** ~3% of entities have no image (`image_list: []`); ~3% of mentions have none: their
  `imgPath` names a file that is absent, or (a quarter of them) a file that is not an image at all, as in
  crawled data. ~2% of mentions are "nil" (answer `"nil"`, a name not in the KG); readers skip them.

Everything is a function of the seed: the plan uses one `random.Random(seed)`, and every picture is drawn from
its own `numpy` generator seeded by `(seed, side, index)`, so pictures can be drawn by any number of worker
processes in any order and the output is byte-identical. Files are written to a temporary name and then
`os.replace`d; re-running over an existing folder overwrites it and deletes stale images of earlier runs
(only files whose names this generator produces).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from otmel.data.synth_draw import ALL_OBJECTS, Obj, RenderJob, render_jobs, write_atomic
from otmel.data.synth_plan import (
    BASE_ENTITIES,
    BASE_MENTIONS,
    KINDS,
    P_MENTION_NO_IMAGE,
    P_NIL,
    SPLITS,
    SynthEntity,
    SynthMention,
    SynthPlan,
    article,
    draw_names,
    object_phrase,
    split_mentions,
    surface_form,
)
from otmel.data.synth_sets import build_sets_plan
from otmel.data.synth_stats import plan_stats

GROUP_SIZES = ((1, 0.10), (2, 0.15), (3, 0.25), (4, 0.25), (5, 0.25))
P_ENTITY_NO_IMAGE = 0.03
P_DISTRACTOR = 0.4
NOT_AN_IMAGE = b"<html><body>404 Not Found</body></html>\n"
_KB_FILE = re.compile(r"^Q\d+\.jpg$")
_MENTION_FILE = re.compile(r"^synth-\d+\.jpg$")

_WITH_OBJECTS = (
    "{m} is pictured with {o}.",
    "In this photo {m} shows {o}.",
    "A view of {m}, featuring {o}.",
    "{m} the {k} displays {o}.",
    "We spotted {m} next to {o} at the fair.",
    "Visitors photographed {m} with {o} on it.",
)
_NO_OBJECTS = ("A photo of {m}.", "{m} was seen again yesterday.", "Another picture of {m} from the archive.")


def attr_text(e: SynthEntity) -> str:
    """The entity's attribute string: its kind, then one "has a <colour> <shape>" per object."""
    return ". ".join([f"kind: {e.kind}"] + [f"has {article(c)} {c} {s}" for c, s in e.objects])


def _group_objects(rng: random.Random, k: int) -> list[tuple[Obj, ...]]:
    """Object sets for the k members of one name group: shared core objects plus 1-2 extras per member that no
    other member has (so the sets are pairwise distinct and none contains another)."""
    if k == 1:
        return [tuple(rng.sample(ALL_OBJECTS, rng.randint(2, 4)))]
    n_core = 1 if rng.random() < 0.7 else 2
    n_extra = [rng.randint(1, 2) for _ in range(k)]
    drawn = rng.sample(ALL_OBJECTS, n_core + sum(n_extra))
    core, rest = drawn[:n_core], drawn[n_core:]
    sets = []
    for n in n_extra:
        objs = core + rest[:n]
        rest = rest[n:]
        rng.shuffle(objs)
        sets.append(tuple(objs))
    return sets


def _named_objects(rng: random.Random, gold: tuple[Obj, ...], core: set[Obj]) -> tuple[Obj, ...]:
    """Which of the gold's objects the sentence names: none (10%), only shared core objects (30% when the name
    is ambiguous), else a random non-empty subset (not always all) with at least one non-core object."""
    u = rng.random()
    if u < 0.10:
        return ()
    if core and u < 0.40:
        pool = [o for o in gold if o in core]
        return tuple(rng.sample(pool, rng.randint(1, len(pool))))
    own = [o for o in gold if o not in core]
    first = rng.choice(own)
    others = [o for o in gold if o != first]
    chosen = [first] + rng.sample(others, rng.randint(0, len(others)))
    return tuple(o for o in gold if o in chosen)


def build_plan(seed: int = 0, scale: float = 1.0, n_mentions: int | None = None) -> SynthPlan:
    """Everything about the dataset except the pixels: entities, mentions, their text and what they show."""
    if scale <= 0:
        raise ValueError("scale must be positive")
    rng = random.Random(seed)
    n_ent = max(20, round(BASE_ENTITIES * scale))
    n_men = max(30, round(BASE_MENTIONS * scale)) if n_mentions is None else max(30, int(n_mentions))
    sizes: list[int] = []
    while sum(sizes) < n_ent:
        sizes.append(rng.choices([s for s, _ in GROUP_SIZES], [p for _, p in GROUP_SIZES])[0])
    sizes[-1] -= sum(sizes) - n_ent
    names = draw_names(rng, len(sizes) + max(3, n_men // 20))  # the tail names nil mentions
    entities: list[SynthEntity] = []
    for g, k in enumerate(sizes):
        kind = rng.choice(KINDS)
        for objs in _group_objects(rng, k):
            entities.append(SynthEntity("", names[g], kind, objs, rng.random() >= P_ENTITY_NO_IMAGE, g))
    rng.shuffle(entities)  # homonyms are not neighbours in the KG; QIDs follow the row order
    entities = [replace(e, qid=f"Q{1000001 + i}") for i, e in enumerate(entities)]
    members: dict[int, list[SynthEntity]] = defaultdict(list)
    for e in entities:
        members[e.group].append(e)
    nil_names = names[len(sizes):]

    mentions: list[SynthMention] = []
    for n in range(n_men):
        mid = f"synth-{n + 1:07d}"
        if rng.random() < P_NIL:
            surface, kind, answer = rng.choice(nil_names), rng.choice(KINDS), "nil"
            shown = tuple(rng.sample(ALL_OBJECTS, rng.randint(2, 4)))
            named = tuple(rng.sample(shown, rng.randint(1, len(shown))))
        else:
            gold = rng.choice(entities)
            group = members[gold.group]
            core = set.intersection(*(set(e.objects) for e in group)) if len(group) > 1 else set()
            surface, kind, answer = surface_form(rng, gold.name, gold.kind), gold.kind, gold.qid
            named = _named_objects(rng, gold.objects, core)
            shown_list = list(gold.objects)
            if rng.random() < P_DISTRACTOR:
                used = {o for e in group for o in e.objects}
                shown_list.append(rng.choice([o for o in ALL_OBJECTS if o not in used]))
            rng.shuffle(shown_list)
            shown = tuple(shown_list)
        if named:
            sentence = rng.choice(_WITH_OBJECTS).format(m=surface, o=object_phrase(rng, named), k=kind)
        else:
            sentence = rng.choice(_NO_OBJECTS).format(m=surface)
        image = "ok"
        if rng.random() < P_MENTION_NO_IMAGE:
            image = "bad" if rng.random() < 0.25 else "missing"
        mentions.append(SynthMention(mid, "", surface, sentence, answer, shown, named, image))

    return SynthPlan(seed, entities, split_mentions(rng, mentions, SPLITS))


MODES = ("standard", "sets")


def plan_for(mode: str, seed: int, scale: float, mentions: int | None = None) -> SynthPlan:
    """The plan of a benchmark mode: "standard" (this module) or "sets" (`otmel.data.synth_sets`)."""
    if mode == "standard":
        return build_plan(seed, scale, mentions)
    if mode == "sets":
        if mentions is not None:
            raise ValueError("--mentions applies to the standard mode only")
        return build_sets_plan(seed, scale)
    raise ValueError(f"unknown synth mode {mode!r}; known: {list(MODES)}")


# --------------------------------------------------------------------------------------------- writing


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _clean_stale(folder: Path, pattern: re.Pattern[str], keep: set[str]) -> int:
    removed = 0
    for p in folder.iterdir():
        if (pattern.match(p.name) and p.name not in keep) or (p.name.startswith(".") and ".tmp" in p.name):
            p.unlink()
            removed += 1
    return removed


def generate(out: Path | str, *, seed: int = 0, scale: float = 1.0, image_size: int = 64,
             workers: int | None = None, mode: str = "standard", mentions: int | None = None) -> dict:
    """Write the synthetic benchmark into `out` (see the module docstring; `mode` "sets": the set-matching
    benchmark of `otmel.data.synth_sets`); return its stats.

    `workers` processes draw the pictures (default: the CPUs this process may use; 1 = in this process).
    Pictures are written first, then the JSON files, then `synth_stats.json`, which is removed at the start:
    a folder without it is an interrupted run. The returned dict is the content of `synth_stats.json` plus
    timings (`seconds_plan`, `seconds_images`, `seconds_total`), kept out of the file so that the folder is
    byte-identical for a seed.
    """
    t0 = time.perf_counter()
    out = Path(out)
    kb_dir, men_dir = out / "kb_image", out / "mention_image"
    kb_dir.mkdir(parents=True, exist_ok=True)
    men_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_for(mode, seed, scale, mentions)
    t_plan = time.perf_counter() - t0

    (out / "synth_stats.json").unlink(missing_ok=True)  # written last: its presence marks a finished run

    t1 = time.perf_counter()
    jobs: list[RenderJob] = [("kb", i, e.objects, str(kb_dir / f"{e.qid}.jpg"), -1)
                             for i, e in enumerate(plan.entities) if e.has_image]
    jobs += [("mention", i, m.objects, str(men_dir / f"{m.id}.jpg"),
              m.objects.index(m.salient) if m.salient in m.objects else -1)
             for i, m in enumerate(plan.mentions) if m.image == "ok"]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    chunk = 256
    tasks = [(seed, image_size, jobs[i:i + chunk]) for i in range(0, len(jobs), chunk)]
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            render_jobs(t)
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(render_jobs, tasks):
                pass
    for m in plan.mentions:
        if m.image == "bad":
            write_atomic(men_dir / f"{m.id}.jpg", NOT_AN_IMAGE)
    _clean_stale(kb_dir, _KB_FILE, {f"{e.qid}.jpg" for e in plan.entities if e.has_image})
    _clean_stale(men_dir, _MENTION_FILE, {f"{m.id}.jpg" for m in plan.mentions if m.image != "missing"})
    t_img = time.perf_counter() - t1

    kb = [{"id": e.qid, "type": "entity", "entity_name": e.name, "attr": attr_text(e),
           "image_list": [f"kb_image/{e.qid}.jpg"] if e.has_image else []} for e in plan.entities]
    write_atomic(out / "kb_entity.json", _json_bytes(kb))
    write_atomic(out / "qid2id.json", _json_bytes({e.qid: i for i, e in enumerate(plan.entities)}))
    for split, _ in SPLITS:
        rows = [{"id": m.id, "sentence": m.sentence, "mentions": m.mention, "imgPath": f"{m.id}.jpg",
                 "answer": m.answer} for m in plan.mentions if m.split == split]
        write_atomic(out / f"synth_{split}.json", _json_bytes(rows))
    stats = {**plan_stats(plan), "mode": mode, "scale": scale, "image_size": image_size,
             "n_images_written": len(jobs)}
    write_atomic(out / "synth_stats.json", _json_bytes(stats))
    return {**stats, "seconds_plan": round(t_plan, 2), "seconds_images": round(t_img, 2),
            "seconds_total": round(time.perf_counter() - t0, 2)}
