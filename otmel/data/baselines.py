"""Text-only baselines: a tiered string matcher that ranks every KG entity for a mention by its name.

Score of (mention, entity), from the mention's surface form and the entity's name:

| tier | score | rule |
| --- | --- | --- |
| 3 | 3.0 | exact match after case folding and whitespace normalisation |
| 2 | 2.0 | one token sequence is a prefix or a suffix of the other ("Obama" / "Barack Obama") |
| 1 | (0, 0.99] | the token sets overlap: Jaccard(mention tokens, name tokens) x 0.99 |
| 0 | 0.0 | nothing shared |

Tiers never overlap (tier 1 stays below 1), so a higher tier always wins. Tokens are the `\\w+` runs of the
case-folded string ("Berners-Lee" -> "berners", "lee"). Ranking uses pessimistic ties
(`otmel.metrics.gold_ranks`): the gold entity's rank is 1 + the number of *other* entities scoring at least as
high, so a matcher that cannot tell homonyms apart gets no credit for them.

Nothing loops over all (mention, entity) pairs. `StringMatcher` builds inverted indexes over the names once
(normalised name -> ids; every token prefix and suffix of a name -> ids; full token tuple -> ids;
token -> ids) and scores a block of mentions by looking candidates up: only the nonzero cells of the dense
(block, E) float32 score matrix are computed. `string_match_ranks` walks the mentions in blocks, so the
17,805 x 17,805 case of RichpediaMEL never holds more than one (block, E) matrix.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from otmel.data.records import EntityRecord, MentionRecord
from otmel.metrics import gold_ranks, metrics_from_ranks

_TOKEN = re.compile(r"\w+")
TIER1_SCALE = 0.99


def normalise(text: str) -> str:
    """Case-folded, whitespace-normalised string (the key of the exact tier)."""
    return " ".join(text.casefold().split())


def tokens(text: str) -> tuple[str, ...]:
    """The `\\w+` tokens of the case-folded string."""
    return tuple(_TOKEN.findall(text.casefold()))


def _freeze(index: dict) -> dict:
    return {k: np.asarray(v, dtype=np.int64) for k, v in index.items()}


class StringMatcher:
    """Inverted indexes over the entity names; scores mentions against all entities in blocks."""

    def __init__(self, entities: Sequence[EntityRecord] | Sequence[str]):
        names = [e if isinstance(e, str) else e.name for e in entities]
        self.n_entities = len(names)
        exact: dict[str, list[int]] = defaultdict(list)
        full: dict[tuple[str, ...], list[int]] = defaultdict(list)
        prefix: dict[tuple[str, ...], list[int]] = defaultdict(list)
        suffix: dict[tuple[str, ...], list[int]] = defaultdict(list)
        posting: dict[str, list[int]] = defaultdict(list)
        n_tok = np.zeros(len(names), dtype=np.float32)
        for j, name in enumerate(names):
            exact[normalise(name)].append(j)
            toks = tokens(name)
            if not toks:
                continue
            full[toks].append(j)
            for i in range(1, len(toks) + 1):
                prefix[toks[:i]].append(j)
                suffix[toks[-i:]].append(j)
            uniq = set(toks)
            n_tok[j] = len(uniq)
            for t in uniq:
                posting[t].append(j)
        self._exact, self._full = _freeze(exact), _freeze(full)
        self._prefix, self._suffix, self._posting = _freeze(prefix), _freeze(suffix), _freeze(posting)
        self._n_tok = n_tok

    def _tier2(self, toks: tuple[str, ...]) -> list[np.ndarray]:
        """Entities whose token sequence has `toks` as a prefix or suffix, or is a prefix or suffix of it."""
        found = [self._prefix.get(toks), self._suffix.get(toks)]
        for i in range(1, len(toks)):  # the whole sequence is covered by the two lookups above
            found += [self._full.get(toks[:i]), self._full.get(toks[-i:])]
        return [f for f in found if f is not None]

    def scores(self, mentions: Sequence[MentionRecord] | Sequence[str]) -> torch.Tensor:
        """Dense (len(mentions), E) float32 scores of one block of mentions (see the module docstring)."""
        surfaces = [m if isinstance(m, str) else m.mention for m in mentions]
        out = torch.zeros(len(surfaces), self.n_entities, dtype=torch.float32)
        if not surfaces or not self.n_entities:
            return out
        t1_rows, t1_ids, t2_rows, t2_ids, t3_rows, t3_ids = [], [], [], [], [], []
        m_tok = np.zeros(len(surfaces), dtype=np.float32)
        for r, s in enumerate(surfaces):
            toks = tokens(s)
            uniq = set(toks)
            m_tok[r] = len(uniq)
            for t in uniq:
                ids = self._posting.get(t)
                if ids is not None:
                    t1_ids.append(ids)
                    t1_rows.append(np.full(len(ids), r, dtype=np.int64))
            if toks:
                for ids in self._tier2(toks):
                    t2_ids.append(ids)
                    t2_rows.append(np.full(len(ids), r, dtype=np.int64))
            ids = self._exact.get(normalise(s))
            if ids is not None:
                t3_ids.append(ids)
                t3_rows.append(np.full(len(ids), r, dtype=np.int64))
        if t1_ids:  # intersection sizes by counting each (row, entity) key once per shared token
            key = np.concatenate(t1_rows) * self.n_entities + np.concatenate(t1_ids)
            key, inter = np.unique(key, return_counts=True)
            rows, ents = key // self.n_entities, key % self.n_entities
            inter = inter.astype(np.float32)
            jac = inter / (m_tok[rows] + self._n_tok[ents] - inter) * np.float32(TIER1_SCALE)
            out[torch.from_numpy(rows), torch.from_numpy(ents)] = torch.from_numpy(jac.astype(np.float32))
        for rows_l, ids_l, tier in ((t2_rows, t2_ids, 2.0), (t3_rows, t3_ids, 3.0)):
            if ids_l:  # higher tiers are written later and overwrite lower ones
                out[torch.from_numpy(np.concatenate(rows_l)), torch.from_numpy(np.concatenate(ids_l))] = tier
        return out

    def iter_scores(self, mentions: Sequence[MentionRecord] | Sequence[str],
                    block: int = 1024) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, scores of mentions[start:start + block]) for consecutive blocks."""
        for start in range(0, len(mentions), block):
            yield start, self.scores(mentions[start:start + block])


def _gold_rows(mentions: Sequence[MentionRecord], entities: Sequence[EntityRecord]) -> torch.Tensor:
    row = {e.qid: j for j, e in enumerate(entities)}
    missing = [m.answer for m in mentions if m.answer not in row]
    if missing:
        raise KeyError(f"{len(missing)} mentions link to QIDs absent from the KG, e.g. {missing[0]!r}")
    return torch.tensor([row[m.answer] for m in mentions], dtype=torch.long)


def string_match_ranks(mentions: Sequence[MentionRecord], entities: Sequence[EntityRecord],
                       gold: Sequence[int] | torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """(M,) long pessimistic ranks of the gold entities, scoring `block` mentions at a time.

    `gold` holds entity rows; by default they come from each mention's `answer` QID.
    """
    gold_t = _gold_rows(mentions, entities) if gold is None else torch.as_tensor(gold, dtype=torch.long)
    matcher = StringMatcher(entities)
    ranks = torch.empty(len(mentions), dtype=torch.long)
    for start, s in matcher.iter_scores(mentions, block):
        ranks[start:start + len(s)] = gold_ranks(s, gold_t[start:start + len(s)])
    return ranks


def string_match_metrics(mentions: Sequence[MentionRecord], entities: Sequence[EntityRecord],
                         gold: Sequence[int] | torch.Tensor | None = None, block: int = 1024) -> dict[str, float]:
    """H@1/3/5/10/20, MRR, MR (fractions; `otmel.metrics.metrics_from_ranks`) of the string matcher."""
    return metrics_from_ranks(string_match_ranks(mentions, entities, gold, block))
