"""The plan of a synthetic benchmark, shared by its modes (`otmel.data.synth`, `otmel.data.synth_sets`).

A plan is everything about the dataset except the pixels: its entities and mentions as records
(`SynthEntity`, `SynthMention`, `SynthPlan`), the sizes, kinds, split and rates that every mode uses, and the
helpers that draw names, surface forms and object phrases from the plan's `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from otmel.data.synth_draw import COLOUR_SYNONYMS, SHAPE_SYNONYMS, Obj

BASE_ENTITIES = 2000
BASE_MENTIONS = 3000
SPLITS = (("train", 0.7), ("dev", 0.1), ("test", 0.2))
KINDS = ("emblem", "banner", "badge", "mural", "poster", "tile", "crest", "flag", "sticker", "quilt",
         "mosaic", "sign")
P_MENTION_NO_IMAGE = 0.03
P_NIL = 0.02
P_SYNONYM = 0.25


@dataclass(frozen=True)
class SynthEntity:
    qid: str
    name: str
    kind: str
    objects: tuple[Obj, ...]  # what its picture shows and its attributes name, in that order
    has_image: bool
    group: int  # index of its name group


@dataclass(frozen=True)
class SynthMention:
    id: str
    split: str
    mention: str
    sentence: str
    answer: str  # QID or "nil"
    objects: tuple[Obj, ...]  # what its picture shows (gold objects, maybe a distractor), in drawing order
    named: tuple[Obj, ...]  # the objects its sentence names
    image: str  # "ok", "missing" (no file) or "bad" (a file that is not an image)
    salient: Obj | None = None  # drawn larger in the picture (the "sets" mode, `otmel.data.synth_sets`)


@dataclass
class SynthPlan:
    seed: int
    entities: list[SynthEntity]
    mentions: list[SynthMention]


def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n distinct made-up capitalised words (two syllables, optional coda) not in `taken`."""
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th",
              "sh")
    vowels = ("a", "e", "i", "o", "u", "ai", "ou")
    codas = ("", "", "n", "r", "s", "l", "th", "x", "k")
    out: list[str] = []
    while len(out) < n:
        w = (rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels)
             + rng.choice(codas)).capitalize()
        if w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


def draw_names(rng: random.Random, n: int) -> list[str]:
    """n distinct names: 85% "First Last", 10% "First", 5% "First Middle Last". Tokens are reused across
    names (~sqrt(n) distinct first and last tokens), so partial surface forms match several groups."""
    taken = {w.lower() for w in KINDS} | set(COLOUR_SYNONYMS) | set(SHAPE_SYNONYMS)
    pool = max(30, math.ceil(1.6 * math.sqrt(n)))
    firsts, lasts = _words(rng, pool, taken), _words(rng, pool, taken)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        u = rng.random()
        if u < 0.10:
            name = rng.choice(firsts)
        elif u < 0.95:
            name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        else:
            name = f"{rng.choice(firsts)} {rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def surface_form(rng: random.Random, name: str, kind: str) -> str:
    """The mention's surface form for an entity called `name`: mostly the exact name."""
    toks = name.split()
    u = rng.random()
    if u < 0.70 or (len(toks) == 1 and u < 0.88):
        return name
    if u < 0.76:
        return rng.choice((name.lower(), name.upper(), "  ".join(toks)))
    if u < 0.84:
        return toks[-1]
    if u < 0.88:
        return toks[0]
    if u < 0.93:
        return f"{name} {kind}"
    t = rng.randrange(len(toks))  # a one-letter typo in one token
    w = toks[t]
    i = rng.randrange(1, len(w))
    toks[t] = w[:i] + rng.choice("aeiouy".replace(w[i].lower(), "")) + w[i + 1:]
    return " ".join(toks)


def object_phrase(rng: random.Random, objs: Iterable[Obj]) -> str:
    """ "a crimson circle, a blue box and an emerald star": objects with occasional synonyms."""
    parts = []
    for c, s in objs:
        cw = rng.choice(COLOUR_SYNONYMS[c]) if rng.random() < P_SYNONYM else c
        sw = rng.choice(SHAPE_SYNONYMS[s]) if rng.random() < P_SYNONYM else s
        parts.append(f"{article(cw)} {cw} {sw}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def split_mentions(rng: random.Random, mentions: list[SynthMention], splits: tuple[tuple[str, float], ...]
                   ) -> list[SynthMention]:
    """A random split by the fractions of `splits` (train, dev, rest: test)."""
    n = len(mentions)
    order = rng.sample(range(n), n)
    n_train, n_dev = round(splits[0][1] * n), round(splits[1][1] * n)
    split_of = {i: "train" if k < n_train else "dev" if k < n_train + n_dev else "test" for k, i in enumerate(order)}
    return [replace(m, split=split_of[i]) for i, m in enumerate(mentions)]


__all__ = [
    "BASE_ENTITIES", "BASE_MENTIONS", "KINDS", "P_MENTION_NO_IMAGE", "P_NIL", "P_SYNONYM", "SPLITS", "SynthEntity",
    "SynthMention", "SynthPlan", "article", "draw_names", "object_phrase", "split_mentions", "surface_form",
]
