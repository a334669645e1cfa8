"""The disk-backed entity store: one immutable *segment* of an entity index, memory-mapped, never read whole.

A segment holds `n` entities (local rows 0..n-1) in plain `.npy` / raw files (read with `numpy.load(...,
mmap_mode="r")`: no pickle, nothing executed):

- `vectors.npy` (n, D) float32 (float16 on request): the first-stage vector x_e = [g | t | v] of each entity
  (`otmel.model.first_stage.entity_vectors`), for exact search and for building / refining the ANN index
  (read as float32, chunk by chunk);
- `has_image.npy` (n,) bool;
- `records.bin`: every per-entity tensor the full model's re-rank needs, one contiguous record per entity:
  the fixed-size fields (`t`, `v`, `g`) then the token fields (`q_t`, `q_t_s` over the entity's valid text
  tokens, `q_v`, `q_v_s` over its valid patches) **trimmed to the valid tokens** (the masks are prefixes), in
  the store's dtype (float32, or float16 to halve the disk); `spans.npy` (n, 2) int64 = (start, length) of each
  record in elements, `lengths.npy` (n, 2) int32 = (valid text tokens, valid patches);
- `input_ids.npy` (n, L) int32: the entity's tokens (for explanations);
- `strings.bin` + `string_spans.npy` (n, 4) int64: the QID and name of each row, UTF-8.

Reading K candidates costs K contiguous reads of `records.bin` (plus K rows of the small arrays); the reader
pads them back to the model's (L, Lv) with the masks rebuilt, so a store read equals the in-RAM features on every
valid position. Records are written in the order shards finish (the spans say where each row is), so a build
streams shard by shard and never holds the KG's features in RAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmel.model import EntityFeatures

FIXED_FIELDS = ("t", "v", "g")  # (d,) or (2d,) per entity
TOKEN_FIELDS = {"q_t": "text", "q_t_s": "text", "q_v": "visual", "q_v_s": "visual"}  # (L, hidden) per entity
MASKS = {"text": "mask_t", "visual": "mask_v"}
STORE_DTYPES = ("float32", "float16")
LAYOUT_FILE = "layout.json"


class StoreError(RuntimeError):
    """A segment is incomplete, inconsistent or of another layout."""


@dataclass(frozen=True)
class Layout:
    """What a record holds: fixed fields with their width, token fields with their width and axis."""

    fixed: tuple[tuple[str, int], ...]
    tokens: tuple[tuple[str, int, str], ...]  # (name, hidden, "text" | "visual")
    lengths: dict[str, int]  # padded length per axis: {"text": Lt, "visual": Lv}
    masks: tuple[str, ...]  # masks the features carry (rebuilt from the lengths)
    vector_dim: int
    input_len: int
    dtype: str

    @classmethod
    def of(cls, f: EntityFeatures, vector_dim: int, input_len: int, dtype: str) -> Layout:
        if dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        fixed = tuple((k, int(getattr(f, k).shape[1])) for k in FIXED_FIELDS if getattr(f, k) is not None)
        tokens = tuple((k, int(getattr(f, k).shape[2]), ax) for k, ax in TOKEN_FIELDS.items()
                       if getattr(f, k) is not None)
        lengths = {ax: int(getattr(f, MASKS[ax]).shape[1]) for ax in MASKS if getattr(f, MASKS[ax]) is not None}
        masks = tuple(MASKS[ax] for ax in lengths)
        return cls(fixed, tokens, lengths, masks, vector_dim, input_len, dtype)

    def to_json(self) -> dict[str, Any]:
        return {"fixed": [list(x) for x in self.fixed], "tokens": [list(x) for x in self.tokens],
                "lengths": self.lengths, "masks": list(self.masks), "vector_dim": self.vector_dim,
                "input_len": self.input_len, "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(tuple((str(a), int(b)) for a, b in d["fixed"]),
                   tuple((str(a), int(b), str(c)) for a, b, c in d["tokens"]),
                   {str(k): int(v) for k, v in d["lengths"].items()}, tuple(d["masks"]), int(d["vector_dim"]),
                   int(d["input_len"]), str(d["dtype"]))


def _prefix_lengths(mask: torch.Tensor | None, what: str) -> np.ndarray:
    """Valid-token counts of prefix masks (B, L); StoreError when a mask is not a prefix."""
    if mask is None:
        return np.zeros(0, dtype=np.int32)
    n = mask.sum(1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < n.unsqueeze(1)
    if not torch.equal(prefix, mask.bool()):
        raise StoreError(f"{what} is not a prefix mask (valid tokens first): cannot trim it")
    return n.to(torch.int32).numpy()


class SegmentWriter:
    """Writes one segment of `n` rows, batch by batch, in any row order; `close()` checks every row came once."""

    def __init__(self, folder: Path, n: int, dtype: str = "float32", vector_dtype: str = "float32") -> None:
        if vector_dtype not in STORE_DTYPES:
            raise StoreError(f"vector dtype must be one of {STORE_DTYPES}, got {vector_dtype!r}")
        self.folder, self.n, self.dtype, self.vector_dtype = Path(folder), int(n), dtype, vector_dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        self.layout: Layout | None = None
        self.written = np.zeros(self.n, dtype=bool)
        self.spans = np.zeros((self.n, 2), dtype=np.int64)
        self.lengths = np.zeros((self.n, 2), dtype=np.int32)
        self.string_spans = np.zeros((self.n, 4), dtype=np.int64)
        self.has_image = np.zeros(self.n, dtype=bool)
        self._records = open(self.folder / "records.bin", "wb")  # noqa: SIM115 (closed in close())
        self._strings = open(self.folder / "strings.bin", "wb")  # noqa: SIM115
        self._pos = self._spos = 0
        self._vectors: np.memmap | None = None
        self._input_ids: np.memmap | None = None

    def _open(self, f: EntityFeatures, vectors: np.ndarray, input_ids: np.ndarray) -> Layout:
        self.layout = Layout.of(f, vectors.shape[1], input_ids.shape[1], self.dtype)
        self._vectors = np.lib.format.open_memmap(self.folder / "vectors.npy", "w+", np.dtype(self.vector_dtype),
                                                  (self.n, vectors.shape[1]))
        self._input_ids = np.lib.format.open_memmap(self.folder / "input_ids.npy", "w+", np.int32,
                                                    (self.n, input_ids.shape[1]))
        return self.layout

    def write(self, rows: np.ndarray, f: EntityFeatures, vectors: np.ndarray, input_ids: np.ndarray,
              qids: list[str], names: list[str]) -> None:
        """Rows (B,) local row numbers of this batch; `f` its features (torch, CPU); vectors (B, D)."""
        lay = self.layout or self._open(f, vectors, input_ids)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.min(initial=0) < 0 or rows.max(initial=0) >= self.n:
            raise StoreError(f"rows {rows.min()}..{rows.max()} outside the segment's 0..{self.n - 1}")
        if self.written[rows].any():
            raise StoreError(f"rows written twice: {rows[self.written[rows]][:5].tolist()}")
        nt = _prefix_lengths(f.mask_t, "mask_t") if f.mask_t is not None else np.zeros(len(rows), np.int32)
        nv = _prefix_lengths(f.mask_v, "mask_v") if f.mask_v is not None else np.zeros(len(rows), np.int32)
        dt = np.dtype(lay.dtype)
        fixed = [getattr(f, k).float().numpy() for k, _ in lay.fixed]
        tokens = [(getattr(f, k).float().numpy(), ax) for k, _, ax in lay.tokens]
        for i, row in enumerate(rows.tolist()):
            n_ax = {"text": int(nt[i]), "visual": int(nv[i])}
            parts = [a[i].ravel() for a in fixed] + [a[i, :n_ax[ax]].ravel() for a, ax in tokens]
            rec = np.concatenate(parts).astype(dt, copy=False)
            self._records.write(rec.tobytes())
            self.spans[row] = (self._pos, rec.size)
            self._pos += rec.size
            self.lengths[row] = (nt[i], nv[i])
            q, nm = qids[i].encode(), names[i].encode()
            self._strings.write(q + nm)
            self.string_spans[row] = (self._spos, len(q), self._spos + len(q), len(nm))
            self._spos += len(q) + len(nm)
        assert self._vectors is not None and self._input_ids is not None
        self._vectors[rows] = vectors.astype(self.vector_dtype, copy=False)
        self._input_ids[rows] = input_ids.astype(np.int32, copy=False)
        self.has_image[rows] = f.has_image.numpy()
        self.written[rows] = True

    def close(self) -> Layout:
        """Flush everything; StoreError naming the first missing row when a row was never written."""
        self._records.close()
        self._strings.close()
        if self.layout is None:
            raise StoreError(f"{self.folder}: no entity was written")
        if not self.written.all():
            raise StoreError(f"{self.folder}: {int((~self.written).sum())} row(s) never written "
                             f"(first: {int(np.flatnonzero(~self.written)[0])})")
        assert self._vectors is not None and self._input_ids is not None
        self._vectors.flush()
        self._input_ids.flush()
        del self._vectors, self._input_ids
        for name, arr in (("spans", self.spans), ("lengths", self.lengths), ("string_spans", self.string_spans),
                          ("has_image", self.has_image)):
            np.save(self.folder / f"{name}.npy", arr, allow_pickle=False)
        (self.folder / LAYOUT_FILE).write_text(json.dumps({**self.layout.to_json(), "rows": self.n}))
        return self.layout


class Segment:
    """A written segment, memory-mapped (nothing but the small per-row arrays is read at open)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / LAYOUT_FILE).read_text())
            self.layout = Layout.from_json(meta)
            self.n = int(meta["rows"])
            load = lambda name: np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)  # noqa: E731
            self.vectors = load("vectors")  # (n, D) float32 or float16, mapped
            self.input_ids = load("input_ids")  # (n, L) int32, mapped
            self.spans, self.lengths = load("spans"), load("lengths")
            self.string_spans, self.has_image = load("string_spans"), np.asarray(load("has_image"))
            size = (self.folder / "records.bin").stat().st_size
            dt = np.dtype(self.layout.dtype)
            self.records = np.memmap(self.folder / "records.bin", dtype=dt, mode="r", shape=(size // dt.itemsize,))
            self.strings = np.memmap(self.folder / "strings.bin", dtype=np.uint8, mode="r")
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise StoreError(f"segment {self.folder}: unreadable or incomplete ({exc})") from exc
        self.advise_random(vectors=False)
        if len(self.vectors) != self.n or len(self.spans) != self.n:
            raise StoreError(f"segment {self.folder}: {len(self.vectors)} vectors / {len(self.spans)} records "
                             f"for {self.n} rows (corrupt)")

    def advise_random(self, vectors: bool) -> None:
        """madvise(MADV_RANDOM) on the maps read record by record (no kernel readahead: a candidate's record
        costs its own pages, not the next megabyte); `vectors` too when they are not scanned (an ANN index)."""
        import mmap

        maps = [self.records, self.strings, self.input_ids] + ([self.vectors] if vectors else [])
        for arr in maps:
            mm = getattr(arr, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)

    def __len__(self) -> int:
        return self.n

    def qid(self, row: int) -> str:
        s = self.string_spans[row]
        return bytes(self.strings[s[0]:s[0] + s[1]]).decode()

    def name(self, row: int) -> str:
        s = self.string_spans[row]
        return bytes(self.strings[s[2]:s[2] + s[3]]).decode()

    def qids(self) -> list[str]:
        return [self.qid(i) for i in range(self.n)]

    def gather(self, rows: np.ndarray, global_ids: np.ndarray) -> EntityFeatures:
        """The features of local `rows` (K,), padded to the model's lengths, `ids` = `global_ids`."""
        lay, rows = self.layout, np.asarray(rows, dtype=np.int64)
        K = len(rows)
        out: dict[str, np.ndarray] = {k: np.zeros((K, w), np.float32) for k, w in lay.fixed}
        for k, h, ax in lay.tokens:
            out[k] = np.zeros((K, lay.lengths[ax], h), np.float32)
        lengths = np.asarray(self.lengths[rows])  # (K, 2)
        spans = np.asarray(self.spans[rows])
        for i in range(K):
            start, size = int(spans[i, 0]), int(spans[i, 1])
            rec = np.asarray(self.records[start:start + size], dtype=np.float32)  # one contiguous read
            n_ax = {"text": int(lengths[i, 0]), "visual": int(lengths[i, 1])}
            pos = 0
            for k, w in lay.fixed:
                out[k][i] = rec[pos:pos + w]
                pos += w
            for k, h, ax in lay.tokens:
                n = n_ax[ax]
                out[k][i, :n] = rec[pos:pos + n * h].reshape(n, h)
                pos += n * h
            if pos != size:
                raise StoreError(f"segment {self.folder}: record of row {int(rows[i])} has {size} values, "
                                 f"its layout {pos} (corrupt)")
        feats: dict[str, torch.Tensor] = {k: torch.from_numpy(v) for k, v in out.items()}
        for j, (ax, mask) in enumerate((("text", "mask_t"), ("visual", "mask_v"))):
            if mask in lay.masks:
                valid = torch.from_numpy(lengths[:, j].astype(np.int64))
                feats[mask] = torch.arange(lay.lengths[ax]).unsqueeze(0) < valid.unsqueeze(1)
        feats["has_image"] = torch.from_numpy(self.has_image[rows].copy())
        feats["ids"] = torch.from_numpy(np.asarray(global_ids, dtype=np.int64).copy())
        return EntityFeatures(**feats)
