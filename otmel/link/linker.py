"""Linking new text against a KG with a trained checkpoint and its entity index.

    linker = Linker.from_checkpoint("runs/default-1", index="indexes/synth")
    for hit in linker.link("The red circle beside a tree ...", "Tomba", image="photo.jpg", k=5):
        print(hit.rank, hit.qid, hit.name, hit.S_O)

Modes: ``"exhaustive"`` scores every entity with the full model (`OTMEL.score`); ``"two-stage"`` (default)
retrieves ``candidates`` entities by the cheap first-stage score and re-ranks them with the full model (see
`otmel.model.first_stage`). Both return the top-k entities by S_O, with S_F, S_T, S_V and the first-stage score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from otmel.checkpoints import LoadedCheckpoint, load_checkpoint_model
from otmel.data.images import decode_image
from otmel.link.index import EntityIndex, load_or_build
from otmel.model import MentionFeatures
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import FIRST_STAGES, SCORE_TERMS, FirstStage, full_scores, mention_queries, stable_topk

MODES: tuple[str, ...] = ("exhaustive", "two-stage")
DEFAULT_CANDIDATES = 128

ImageInput = str | Path | bytes | Image.Image | None


class LinkInputError(ValueError):
    """A mention cannot be linked as given (empty mention, unreadable image, bad option)."""


class MentionNotInTextWarning(UserWarning):
    """The mention's surface form does not occur in its text (it is linked anyway)."""


@dataclass(frozen=True)
class LinkQuery:
    """One mention to link (`Linker.link_batch`): the arguments of `Linker.link`."""

    text: str
    mention: str
    image: ImageInput = None
    k: int = 10
    mode: str | None = None  # None: the linker's default


@dataclass
class LinkedEntity:
    """One ranked entity. Scores are the model's (Eq. 25): S_O = mean of the available S_F, S_T, S_V."""

    rank: int  # 1 = best
    row: int  # KG row (e_index)
    qid: str
    name: str
    S_O: float
    S_F: float | None = None
    S_T: float | None = None
    S_V: float | None = None  # None when the pair has no two images (S_V is then not part of S_O)
    first_stage: float | None = None  # the retrieval score (two-stage mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_bytes(image: ImageInput) -> bytes | Image.Image | None:
    """The image to preprocess; `LinkInputError` naming it when it cannot be read or decoded."""
    if image is None or isinstance(image, Image.Image):
        return image
    if isinstance(image, str | Path):
        path = Path(image).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LinkInputError(f"image {path}: cannot be read ({exc.strerror or exc})") from exc
        where = str(path)
    elif isinstance(image, bytes | bytearray):
        data, where = bytes(image), f"<{len(image)} bytes>"
    else:
        raise LinkInputError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")
    if decode_image(data) is None:
        raise LinkInputError(f"image {where}: not a readable image (it does not decode as JPEG/PNG/...)")
    return data


def check_mention(text: str, mention: str) -> None:
    """Raise for an empty mention; warn (`MentionNotInTextWarning`) when it does not occur in the text."""
    if not isinstance(mention, str) or not mention.strip():
        raise LinkInputError("the mention is empty: give the surface form to link (e.g. --mention 'Ada')")
    if not isinstance(text, str):
        raise LinkInputError(f"the text must be a string, got {type(text).__name__}")
    if " ".join(mention.split()).casefold() not in " ".join(text.split()).casefold():
        warnings.warn(MentionNotInTextWarning(
            f"the mention {mention!r} does not occur in the text; linking it with the text as its context anyway"
        ), stacklevel=3)


class Linker:
    """A trained model plus the cached features of a KG, answering `link(text, mention, image)`."""

    def __init__(self, loaded: LoadedCheckpoint, index: EntityIndex, *, mode: str = "two-stage",
                 candidates: int = DEFAULT_CANDIDATES, first_stage: FirstStage = "summary") -> None:
        index.check_checkpoint(loaded.sha256, loaded.path)
        self.loaded, self.index = loaded, index
        self.model = loaded.model.eval()
        self.pre = build_preprocessor(loaded.config)
        self.device = next(self.model.parameters()).device
        self.mode, self.candidates, self.first_stage = self._options(mode, candidates, first_stage)
        self.search: dict[str, int] = {}  # query-time ANN parameters (ef_search, nprobe, refine)
        torch.set_flush_denormal(True)

    def reload(self) -> bool:
        """Pick up a changed index folder (`otmel index --add/--remove/--compact`) in place; True if it changed.
        Calls in flight keep the generation they started with (its files stay readable while mapped)."""
        fresh = self.index.reopen()
        changed, self.index = fresh is not self.index, fresh
        return changed

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        index: str | Path | None = None,
        *,
        kg: str | Path | None = None,
        mode: str = "two-stage",
        candidates: int = DEFAULT_CANDIDATES,
        first_stage: FirstStage = "summary",
        device: str | torch.device = "cpu",
        workers: int = 0,
    ) -> Linker:
        """Load a checkpoint (or run) directory and an index folder (its checkpoint hash must match), or,
        without an index, encode the KG shards `kg` now (`workers` Ray actors; 0 = in this process)."""
        loaded = load_checkpoint_model(checkpoint, device)
        return cls(loaded, load_or_build(index, kg, loaded, workers=workers), mode=mode, candidates=candidates,
                   first_stage=first_stage)

    @staticmethod
    def _options(mode: str, candidates: int, first_stage: str) -> tuple[str, int, FirstStage]:
        if mode not in MODES:
            raise LinkInputError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if int(candidates) < 1:
            raise LinkInputError(f"candidates must be >= 1, got {candidates}")
        if first_stage not in FIRST_STAGES:
            raise LinkInputError(f"unknown first stage {first_stage!r}; choose one of {list(FIRST_STAGES)}")
        return mode, int(candidates), first_stage  # type: ignore[return-value]

    # -- mentions --------------------------------------------------------------------------------------
    def mention_batch(self, text: str, mention: str, image: ImageInput = None) -> dict[str, torch.Tensor]:
        """The model's input tensors for one mention (a batch of 1), after checking the input."""
        check_mention(text, mention)
        pixels = _image_bytes(image)
        if pixels is not None and not self.loaded.config.use_images:
            warnings.warn("this model is text-only (use_images=False): the image is ignored", stacklevel=3)
            pixels = None
        return default_collate([self.pre.mention({"mention": mention, "sentence": text, "image": pixels})])

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor]) -> MentionFeatures:
        return self.model.encode_mentions({k: v.to(self.device) for k, v in batch.items()})

    # -- linking ---------------------------------------------------------------------------------------
    def link(self, text: str, mention: str, image: ImageInput = None, *, k: int = 10, mode: str | None = None,
             candidates: int | None = None) -> list[LinkedEntity]:
        """The top-k entities for `mention` in `text` (with its image: a path, bytes or a PIL image)."""
        m = self.encode(self.mention_batch(text, mention, image))
        return self.rank(m, k=k, mode=mode, candidates=candidates)[0]

    def link_batch(self, queries: Sequence[LinkQuery]) -> list[list[LinkedEntity] | LinkInputError]:
        """Many mentions at once: one encoder forward for all of them, one `rank` per mode. Each answer is its
        top-k list or the `LinkInputError` that query alone raised (the others are still answered)."""
        out: list[list[LinkedEntity] | LinkInputError] = []
        good: list[int] = []
        inputs: list[dict[str, torch.Tensor]] = []
        for i, q in enumerate(queries):
            try:
                if q.mode is not None:
                    self._options(q.mode, self.candidates, self.first_stage)
                if q.k < 1:
                    raise LinkInputError(f"k must be >= 1, got {q.k}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MentionNotInTextWarning)
                    inputs.append(self.mention_batch(q.text, q.mention, q.image))
                good.append(i)
                out.append([])
            except LinkInputError as exc:
                out.append(exc)
        if not good:
            return out
        m = self.encode({k: torch.cat([b[k] for b in inputs]) for k in inputs[0]})
        for mode in {queries[i].mode or self.mode for i in good}:
            pos = [j for j, i in enumerate(good) if (queries[i].mode or self.mode) == mode]
            k = max(queries[good[j]].k for j in pos)
            ranked = self.rank(m.select(torch.tensor(pos)), k=k, mode=mode)
            for j, hits in zip(pos, ranked, strict=True):
                out[good[j]] = hits[: queries[good[j]].k]  # a prefix of a stable top-k is the smaller top-k
        return out

    @torch.no_grad()
    def rank(self, m: MentionFeatures, *, k: int = 10, mode: str | None = None, candidates: int | None = None,
             **search: int | None) -> list[list[LinkedEntity]]:
        """Top-k entities of each mention of an encoded batch. `search`: ANN parameters for this call
        (`ef_search`, `nprobe`, `refine`; default the index's own)."""
        mode, K, first = self._options(mode or self.mode, candidates or self.candidates, self.first_stage)
        if k < 1:
            raise LinkInputError(f"k must be >= 1, got {k}")
        index = self.index  # one generation for the whole call, even if reload() runs meanwhile
        k = min(k, len(index))
        if mode == "exhaustive":
            return self._exhaustive(index, m, k)
        cheap, cand = index.search(mention_queries(self.model, m, first), max(K, k), **{**self.search, **search})
        out = []
        for i in range(len(m)):
            ok = cand[i] >= 0
            rows, order = cand[i][ok].sort()  # row order: an exact tie in S_O goes to the lower row
            e = index.gather(rows).to(self.device)
            sc = full_scores(self.model, m.select(slice(i, i + 1)), e)
            _, pos = stable_topk(sc["S_O"], k)
            picked = {t: sc[t].gather(1, pos) for t in SCORE_TERMS if t in sc}
            valid = sc["V_valid"].gather(1, pos) if "V_valid" in sc else None
            first_s = cheap[i][ok][order].unsqueeze(0).gather(1, pos.cpu())
            out.append(self._hits(index, 0, rows.unsqueeze(0).gather(1, pos.cpu()), picked, valid, first_s))
        return out

    def _exhaustive(self, index: EntityIndex, m: MentionFeatures, k: int, chunk: int = 4096
                    ) -> list[list[LinkedEntity]]:
        """Every live entity scored by the full model, chunk by chunk from the store; ties: lower row first."""
        best: dict[str, torch.Tensor] = {}
        for s in range(0, index.rows, chunk):
            rows = torch.arange(s, min(s + chunk, index.rows))
            sc = full_scores(self.model, m, index.gather(rows).to(self.device))
            if len(index.dead):
                dead = torch.from_numpy(np.isin(rows.numpy(), index.dead)).to(sc["S_O"].device)
                sc["S_O"] = sc["S_O"].masked_fill(dead.unsqueeze(0), float("-inf"))
            sc["row"] = rows.to(sc["S_O"].device).expand(len(m), -1)
            if best:
                sc = {t: torch.cat([best[t], sc[t]], 1) for t in sc}
            _, pos = stable_topk(sc["S_O"], k)  # best's columns first: ties keep the lower row
            best = {t: v.gather(1, pos) for t, v in sc.items()}
        picked = {t: best[t] for t in SCORE_TERMS if t in best}
        valid = best.get("V_valid")
        return [self._hits(index, i, best["row"], picked, valid, None) for i in range(len(m))]

    def _hits(self, index: EntityIndex, i: int, rows: torch.Tensor, picked: dict[str, torch.Tensor],
              valid: torch.Tensor | None, cheap: torch.Tensor | None) -> list[LinkedEntity]:
        out = []
        for j, row in enumerate(rows[i].tolist()):
            terms = {t: float(v[i, j]) for t, v in picked.items()}
            if "S_V" in terms and valid is not None and not bool(valid[i, j]):
                terms["S_V"] = None  # type: ignore[assignment]
            out.append(LinkedEntity(rank=j + 1, row=row, qid=index.qid(row), name=index.name(row),
                                    first_stage=None if cheap is None else float(cheap[i, j]), **terms))
        return out

