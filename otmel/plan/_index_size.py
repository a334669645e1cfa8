"""Size of a KG's entity index (`otmel index`) on disk and in RAM, from the model's feature shapes.

A segment of n entities (otmel/link/store.py, otmel/link/ann.py), with D the first-stage vector width, L the text
length, Le <= L valid text tokens and Lv patches per entity (0 without an image), s the store's bytes per value:

- store: `vectors.npy` n D 4, `records.bin` n (sum of fixed widths + Le * text widths + Lv * visual widths) s,
  `input_ids.npy` n L 4, spans / lengths / has_image n (16 + 8 + 1), strings n (32 + ~32 bytes of QID + name);
- HNSW (`IndexHNSWFlat`, per image partition): the vectors again (n D 4), neighbour lists of 2M slots at level 0
  and M per upper level, 1 / (M - 1) upper levels per vector on average (4 bytes a slot), levels and offsets
  (4 + 8), the partition's row list (8);
- IVF-PQ (`IndexIVFPQ`): pq_m bytes (8-bit codes) + an 8-byte id per vector, the coarse centroids (nlist D 4) and
  the PQ codebooks (256 D 4); a partition below 1000 vectors is a flat index (n D 4);
- exact: nothing beyond the store.

RAM: the ANN structure is read into memory (the store, records included, is memory-mapped and read per query); for
`exact` the vectors are scanned on every query, so they stay in the page cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otmel.link.ann import IVFPQ_MIN_VECTORS, AnnParams, ivfpq_shape
from otmel.link.store import Layout
from otmel.model import OTMEL
from otmel.model.first_stage import entity_vectors

NPY_HEADER = 128


@dataclass(frozen=True)
class EntityShapes:
    vector_dim: int  # D
    input_len: int  # L
    fixed_width: int  # sum of the fixed fields' widths (t, v, g)
    text_width: int  # sum of the token fields' widths over the text axis (q_t, q_t_s)
    visual_width: int  # ... over the visual axis (q_v, q_v_s)
    patches: int  # Lv


@torch.no_grad()
def entity_shapes(model: OTMEL, one_entity: dict[str, torch.Tensor]) -> EntityShapes:
    """The store layout of `model`'s entity features (from one encoded entity, as `otmel index` writes them)."""
    model.eval()
    e = model.encode_entities(one_entity)
    model.train()
    assert e.mask_t is not None  # encode_entities always sets the text mask
    lay = Layout.of(e, vector_dim=int(entity_vectors(model, e).shape[1]), input_len=int(e.mask_t.shape[1]),
                    dtype="float32")
    width = {ax: sum(w for _, w, a in lay.tokens if a == ax) for ax in ("text", "visual")}
    return EntityShapes(vector_dim=lay.vector_dim, input_len=lay.input_len, fixed_width=sum(w for _, w in lay.fixed),
                        text_width=width["text"], visual_width=width["visual"],
                        patches=lay.lengths.get("visual", 0))


@dataclass(frozen=True)
class IndexSize:
    kind: str
    store_bytes: int
    ann_bytes: int
    ram_bytes: int

    @property
    def disk_bytes(self) -> int:
        return self.store_bytes + self.ann_bytes


def store_bytes(s: EntityShapes, n: int, with_images: int, text_tokens: float, dtype_bytes: int = 4,
                vector_bytes: int = 4, string_bytes: float = 32.0) -> int:
    """`text_tokens`: mean valid text tokens per entity; `string_bytes`: mean UTF-8 bytes of QID + name."""
    records = n * (s.fixed_width + text_tokens * s.text_width) + with_images * s.patches * s.visual_width
    return int(n * s.vector_dim * vector_bytes + records * dtype_bytes + n * s.input_len * 4
               + n * (16 + 8 + 1) + n * (string_bytes + 32) + 6 * NPY_HEADER)


def ann_bytes(kind: str, D: int, parts: tuple[int, ...], p: AnnParams) -> int:
    """Bytes of the ANN files of a segment whose image partitions hold `parts` vectors."""
    total = 0
    for n in parts:
        total += 8 * n + NPY_HEADER  # ann-p{part}-rows.npy
        if kind == "exact" or n == 0:
            continue
        if kind == "hnsw":
            M = p.hnsw_m
            slots = 2 * M + M / (M - 1)
            total += int(n * (4 * D + 4 * slots + 4 + 8))
        elif n < IVFPQ_MIN_VECTORS:
            total += 4 * n * D
        else:
            nlist, m, bits = ivfpq_shape(n, D, p)
            total += int(n * ((m * bits + 7) // 8 + 8) + nlist * D * 4 + (2 ** bits) * D * 4 + nlist * 16)
    return total


def index_size(kind: str, s: EntityShapes, n: int, with_images: int, text_tokens: float,
               p: AnnParams | None = None) -> IndexSize:
    p = p or AnnParams(kind)
    store = store_bytes(s, n, with_images, text_tokens)
    ann = ann_bytes(kind, s.vector_dim, (n - with_images, with_images), p) if kind != "exact" else 0
    ram = ann if kind != "exact" else n * s.vector_dim * 4
    return IndexSize(kind=kind, store_bytes=store, ann_bytes=ann, ram_bytes=ram)
