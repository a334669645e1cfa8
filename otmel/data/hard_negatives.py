"""Hard negatives: extra KG entities appended to a training batch, per mention, beside the in-batch negatives.

A training batch holds B mentions and their B gold entities (`e_*` rows); in-batch (or global-pool) negatives
are the other mentions' golds, mostly easy. `HardNegatives.augment` appends `per_mention` more entity rows per
mention, drawn from a candidate table `(N_train, k)` of KG rows indexed by the mention's `m_index`:

- **lexical** (`lexical_table`): entities whose name equals the gold entity's name (homonyms), then the
  string matcher's ranking of the mention's surface form (exact name, prefix / suffix, token overlap; the
  `otmel baseline` matcher) — the lexical ambiguity a text-only linker falls for. Needs no model.
- **mined** (`otmel.train.worker.mining`): the top-k wrong entities of the current model's cheap first-stage score,
  recomputed every N epochs.

Rows of the table are sampled without replacement by a generator seeded from (seed, epoch, rank, step), so a
resumed run draws the same negatives; a mention with fewer than `per_mention` candidates is filled with
uniformly random KG rows (never its gold), so every batch has exactly `B * (1 + per_mention)` entity rows (the
global pool all-gathers equal sizes). The gold entities stay the first B rows, so the loss's targets and the
duplicate-gold exclusion (`otmel.loss.exclusion_mask`, by KG row) are unchanged: a hard negative that is
another mention's gold is excluded for that mention only.

`EntityStore` reads KG entities by row with one seek into the right shard (tar member offsets indexed once),
so nothing KG-sized is held in memory.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmel.data.baselines import StringMatcher, normalise
from otmel.data.loaders import SampleMap, collate, derive_seed
from otmel.data.manifest import KG, read_manifest, shard_infos
from otmel.data.shards import ShardError, iter_shard
from otmel.data.transforms import Preprocessor

NO_ENTITY = -1  # padding in candidate tables


class EntityStore:
    """Random access to KG entity samples by KG row (`e_index`): {row: (shard path, {ext: (offset, size)})}."""

    def __init__(self, shard_dir: Path) -> None:
        shard_dir = Path(shard_dir)
        self.index: dict[int, tuple[Path, dict[str, tuple[int, int]]]] = {}
        for info in shard_infos(shard_dir, KG, read_manifest(shard_dir)):
            path = shard_dir / info.name
            members: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
            try:
                with tarfile.open(path, mode="r:") as tar:
                    for m in tar.getmembers():
                        key, dot, ext = m.name.rsplit("/", 1)[-1].partition(".")
                        if m.isreg() and dot:
                            members[key][ext.lower()] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as exc:
                raise ShardError(f"shard {path}: cannot be indexed ({exc})") from exc
            for key, exts in members.items():
                if "json" not in exts:
                    raise ShardError(f"shard {path}: sample {key!r} has no json member")
                row = int(json.loads(self._read(path, exts["json"]))["e_index"])
                self.index[row] = (path, exts)
        self._files: dict[Path, Any] = {}

    @staticmethod
    def _read(path: Path, span: tuple[int, int], f: Any = None) -> bytes:
        if f is None:
            with path.open("rb") as g:
                g.seek(span[0])
                return g.read(span[1])
        f.seek(span[0])
        return f.read(span[1])

    def __len__(self) -> int:
        return len(self.index)

    def get(self, row: int) -> dict[str, bytes]:
        """The raw sample of KG row `row` ({"json": ..., "jpg": ...}); KeyError naming the row if absent."""
        if row not in self.index:
            raise KeyError(f"KG row {row} is not in the entity store ({len(self)} entities)")
        path, exts = self.index[row]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = path.open("rb")
        return {ext: self._read(path, span, f) for ext, span in exts.items()}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:  # picklable: open files are not carried
        return {"index": self.index, "_files": {}}


def train_records(shard_dir: Path) -> Iterator[dict[str, Any]]:
    """The json metadata of every training sample (mention + gold entity), in shard order."""
    shard_dir = Path(shard_dir)
    for info in shard_infos(shard_dir, "train", read_manifest(shard_dir)):
        for sample in iter_shard(shard_dir / info.name, expected_samples=info.samples, expected_bytes=info.bytes):
            yield json.loads(sample["json"])


def kg_names(shard_dir: Path) -> list[str]:
    """Entity names by KG row."""
    shard_dir = Path(shard_dir)
    names: dict[int, str] = {}
    for info in shard_infos(shard_dir, KG, read_manifest(shard_dir)):
        for sample in iter_shard(shard_dir / info.name, expected_samples=info.samples, expected_bytes=info.bytes):
            meta = json.loads(sample["json"])
            names[int(meta["e_index"])] = str(meta.get("name", ""))
    return [names.get(i, "") for i in range(max(names) + 1 if names else 0)]


def lexical_table(shard_dir: Path, k: int, *, block: int = 1024) -> torch.Tensor:
    """(N_train, k) long: per training mention (row = `m_index`), up to k KG rows that are lexically confusable
    with it, best first, `NO_ENTITY`-padded: the gold's homonyms, then the string matcher's ranking of the
    surface form (ties broken by KG row). The gold itself never appears."""
    names = kg_names(shard_dir)
    by_name: dict[str, list[int]] = defaultdict(list)
    for row, name in enumerate(names):
        by_name[normalise(name)].append(row)
    recs = sorted(train_records(shard_dir), key=lambda r: int(r["m_index"]))
    table = torch.full((len(recs), k), NO_ENTITY, dtype=torch.long)
    if not recs or k == 0:
        return table
    matcher = StringMatcher(names)
    for start in range(0, len(recs), block):
        part = recs[start : start + block]
        scores = matcher.scores([str(r.get("mention", "")) for r in part])  # (b, E)
        for j, r in enumerate(part):
            gold = int(r["e_index"])
            s = scores[j]
            s[gold] = -1.0
            # a stable sort on the negated score: best first, ties by KG row
            order = torch.sort(-s, stable=True).indices[: k + len(by_name[normalise(names[gold])])]
            ranked = [int(i) for i in order if s[i] > 0]
            homonyms = [i for i in by_name[normalise(names[gold])] if i != gold]
            seen: dict[int, None] = dict.fromkeys(homonyms + ranked)
            rows = list(seen)[:k]
            table[int(r["m_index"]), : len(rows)] = torch.tensor(rows, dtype=torch.long)
    return table


class HardNegatives:
    """Appends `per_mention` hard-negative entity rows per mention to a training batch (see the module doc)."""

    def __init__(self, store: EntityStore, preprocessor: Preprocessor, per_mention: int, n_entities: int) -> None:
        if per_mention < 1:
            raise ValueError(f"per_mention must be >= 1, got {per_mention}")
        self.store, self.per_mention, self.n_entities = store, per_mention, n_entities
        self.convert = SampleMap(preprocessor, "entity").convert
        self.table: torch.Tensor | None = None  # (N_train, k) candidate KG rows, NO_ENTITY-padded

    def set_table(self, table: torch.Tensor) -> None:
        self.table = table.long()

    def draw(self, m_index: torch.Tensor, e_index: torch.Tensor, seed: int) -> torch.Tensor:
        """(B, per_mention) KG rows: sampled from each mention's candidates, random KG rows where short."""
        rng = np.random.default_rng(seed)
        out = np.empty((len(m_index), self.per_mention), dtype=np.int64)
        for i, (m, gold) in enumerate(zip(m_index.tolist(), e_index.tolist(), strict=True)):
            cands: list[int] = []
            if self.table is not None and 0 <= m < len(self.table):
                cands = [c for c in self.table[m].tolist() if c != NO_ENTITY and c != gold]
            pick = list(rng.choice(cands, size=min(self.per_mention, len(cands)), replace=False)) if cands else []
            while len(pick) < self.per_mention:  # fill: uniform random KG rows other than the gold
                r = int(rng.integers(self.n_entities))
                if r != gold or self.n_entities <= 1:  # (a one-entity KG has nothing else to offer)
                    pick.append(r)
            out[i] = pick
        return torch.from_numpy(out)

    def augment(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The batch with B * per_mention entity rows appended to every `e_*` field (golds stay first)."""
        rows = self.draw(batch["m_index"], batch["e_index"], seed).reshape(-1)
        samples = [self.convert(self.store.get(int(r))) for r in rows]
        extra = collate([{k: v for k, v in s.items() if not k.startswith("_")} for s in samples])
        out = dict(batch)
        for key, value in extra.items():
            if key.startswith("e_") and key in batch:
                out[key] = torch.cat([batch[key], value.to(batch[key].dtype)], 0)
        return out


def hard_negative_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The draw's seed: a function of the stream position, so a resumed run draws the same negatives."""
    return derive_seed("hard-negatives", seed, epoch, rank, step)


__all__ = ["NO_ENTITY", "EntityStore", "HardNegatives", "hard_negative_seed", "kg_names", "lexical_table",
           "train_records"]
