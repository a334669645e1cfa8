"""The "sets" mode of the synthetic benchmark: the paper's hypothesis as a test (`otmel synth --mode sets`).

OT-MEL's claim is that attention over-concentrates on partial correlations while a transport plan makes every
element take part. This mode builds a KG in which concentrating on one element cannot work:

- Entities come in name groups of exactly ``GROUP`` (4) that share one name. A group draws one **salient**
  object S and a pool of ``GROUP`` other objects o_1..o_4. Member j shows S and every pool object but o_j:
  4 objects, S first. So every pair of members shares all but one element, the salient element is shared by
  all, and each pool object by 3 of the 4: no single element singles out the gold; only the *set* does
  (which pool object is absent).
- A mention's picture shows exactly its gold's 4 objects (no distractor), re-drawn with jitter as usual, and the
  salient one drawn 1.5x larger than the others (it dominates the picture as it dominates the group).
- Its sentence names all 4 objects (salient first, the rest shuffled, 25% synonyms as usual): text carries the
  set too, so both the textual and the visual matcher can only succeed by comparing sets.
- Surface forms, nil mentions (2%), missing / unreadable images (3%) and the 70/10/20 split are as in the
  standard mode (`otmel.data.synth`), from the same helpers (`otmel.data.synth_plan`).

The parameters above (group size 4, one salient object, 1.5x salient radius, all objects named, no distractor)
were fixed before any model was trained on this mode (docs/results.md records them with the outcome).
"""

from __future__ import annotations

import random

from otmel.data.synth_draw import ALL_OBJECTS
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
    draw_names,
    object_phrase,
    split_mentions,
    surface_form,
)

GROUP = 4  # members per name group = pool objects per group; each member shows 1 salient + GROUP - 1 objects
SALIENT_SCALE = 1.5  # radius of the salient object in a mention picture, relative to the others
_SENTENCES = (
    "{m} is pictured with {o}.",
    "In this photo {m} shows {o}.",
    "A view of {m}, featuring {o}.",
    "{m} the {k} displays {o}.",
)


def build_sets_plan(seed: int = 0, scale: float = 1.0) -> SynthPlan:
    """Entities, mentions and their text for the sets mode (see the module docstring)."""
    if scale <= 0:
        raise ValueError("scale must be positive")
    rng = random.Random(seed)
    n_groups = max(5, round(BASE_ENTITIES * scale / GROUP))
    n_men = max(30, round(BASE_MENTIONS * scale))
    names = draw_names(rng, n_groups + max(3, n_men // 20))  # the tail names nil mentions
    entities: list[SynthEntity] = []
    for g in range(n_groups):
        kind = rng.choice(KINDS)
        salient, *pool = rng.sample(ALL_OBJECTS, GROUP + 1)
        for j in range(GROUP):
            rest = [o for k, o in enumerate(pool) if k != j]
            rng.shuffle(rest)
            entities.append(SynthEntity("", names[g], kind, (salient, *rest), True, g))
    rng.shuffle(entities)
    entities = [SynthEntity(f"Q{1000001 + i}", e.name, e.kind, e.objects, e.has_image, e.group)
                for i, e in enumerate(entities)]
    nil_names = names[n_groups:]
    mentions: list[SynthMention] = []
    for n in range(n_men):
        mid = f"synth-{n + 1:07d}"
        if rng.random() < P_NIL:
            surface, kind, answer = rng.choice(nil_names), rng.choice(KINDS), "nil"
            shown = tuple(rng.sample(ALL_OBJECTS, GROUP))
        else:
            gold = rng.choice(entities)
            surface, kind, answer, shown = surface_form(rng, gold.name, gold.kind), gold.kind, gold.qid, gold.objects
        salient, *rest = shown
        rng.shuffle(rest)
        named = (salient, *rest)
        sentence = rng.choice(_SENTENCES).format(m=surface, o=object_phrase(rng, named), k=kind)
        image = "ok"
        if rng.random() < P_MENTION_NO_IMAGE:
            image = "bad" if rng.random() < 0.25 else "missing"
        drawn = list(shown)
        rng.shuffle(drawn)  # drawing order (positions are random anyway); the salient one is marked, not first
        mentions.append(SynthMention(mid, "", surface, sentence, answer, tuple(drawn), named, image,
                                     salient=salient))
    return SynthPlan(seed, entities, split_mentions(rng, mentions, SPLITS))


__all__ = ["GROUP", "SALIENT_SCALE", "build_sets_plan"]
