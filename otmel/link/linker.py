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

import torch
from PIL import Image
from torch.utils.data import default_collate

from otmel.checkpoints import LoadedCheckpoint, load_checkpoint_model
from otmel.data.images import decode_image
from otmel.link.index import EntityIndex
from otmel.link.index_build import load_or_build
from otmel.link.ranking import MODES, exhaustive_top_k, top_k, two_stage
from otmel.model import MentionFeatures
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import FIRST_STAGES, SCORE_TERMS, FirstStage

DEFAULT_CANDIDATES = 128

ImageInput = str | Path | bytes | Image.Image | None


class LinkInputError(ValueError):
    """A mention cannot be linked as given (empty mention, unreadable image, bad option); `field` names the input
    (`mention`, `text`, `image`, `k`, `mode`, `candidates`, `first_stage`)."""

    def __init__(self, message: str, field: str = "request", rule: str | None = None) -> None:
        super().__init__(message)
        self.field, self.rule = field, rule or message

    @classmethod
    def rule_broken(cls, field: str, rule: str) -> LinkInputError:
        return cls(f"{field} {rule}", field, rule)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles with its field and rule (Ray, multiprocessing)
        return type(self), (str(self), self.field, self.rule)


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
            raise LinkInputError(f"image {path}: cannot be read ({exc.strerror or exc})", "image") from exc
        where = str(path)
    elif isinstance(image, bytes | bytearray):
        data, where = bytes(image), f"<{len(image)} bytes>"
    else:
        raise LinkInputError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}", "image")
    if decode_image(data) is None:
        raise LinkInputError(f"image {where}: not a readable image (it does not decode as JPEG/PNG/...)", "image")
    return data


def check_mention(text: str, mention: str) -> None:
    """Raise for an empty mention; warn (`MentionNotInTextWarning`) when it does not occur in the text."""
    if not isinstance(mention, str) or not mention.strip():
        raise LinkInputError("the mention is empty: give the surface form to link (e.g. --mention 'Ada')", "mention")
    if not isinstance(text, str):
        raise LinkInputError(f"the text must be a string, got {type(text).__name__}", "text")
    if " ".join(mention.split()).casefold() not in " ".join(text.split()).casefold():
        warnings.warn(MentionNotInTextWarning(
            f"the mention {mention!r} does not occur in the text; linking it with the text as its context anyway"
        ), stacklevel=3)


def check_options(*, mode: str | None = None, k: Any = None, candidates: Any = None, first_stage: str | None = None,
                  max_k: int | None = None) -> None:
    """The one check of a link request's options, shared by the Python API, the CLI and the service (which adds
    its `max_k`): `LinkInputError` naming the option and its rule. Options left None are not checked."""
    if mode is not None and mode not in MODES:
        raise LinkInputError.rule_broken("mode", f"must be one of {list(MODES)}")
    for name, value in (("k", k), ("candidates", candidates)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LinkInputError.rule_broken(name, f"must be an integer, got {type(value).__name__}")
        top = max_k if name == "k" else None
        if value < 1 or (top is not None and value > top):
            raise LinkInputError.rule_broken(name, f"must be between 1 and {top}, got {value}" if top is not None
                                             else f"must be >= 1, got {value}")
    if first_stage is not None and first_stage not in FIRST_STAGES:
        raise LinkInputError.rule_broken("first_stage", f"must be one of {list(FIRST_STAGES)}")


class Linker:
    """A trained model plus the cached features of a KG, answering `link(text, mention, image)`."""

    def __init__(self, loaded: LoadedCheckpoint, index: EntityIndex, *, mode: str = "two-stage",
                 candidates: int = DEFAULT_CANDIDATES, first_stage: FirstStage = "summary") -> None:
        index.check_checkpoint(loaded.sha256, loaded.path)
        self.loaded, self.index = loaded, index
        self.model = loaded.model.eval()
        self.pre = build_preprocessor(loaded.config)
        self.device = next(self.model.parameters()).device
        check_options(mode=mode, candidates=candidates, first_stage=first_stage)
        self.mode, self.candidates, self.first_stage = mode, candidates, first_stage
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
        """Many mentions at once: one encoder forward for all of them, one ranking per mode. Each answer is its
        top-k list or the `LinkInputError` that query alone raised (the others are still answered)."""
        out: list[list[LinkedEntity] | LinkInputError] = []
        good: list[tuple[int, str, int]] = []  # (query, mode, k) of the queries that passed the checks
        inputs: list[dict[str, torch.Tensor]] = []
        for i, q in enumerate(queries):
            try:
                mode = q.mode or self.mode
                check_options(mode=mode, k=q.k)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MentionNotInTextWarning)
                    inputs.append(self.mention_batch(q.text, q.mention, q.image))
                good.append((i, mode, q.k))
                out.append([])
            except LinkInputError as exc:
                out.append(exc)
        if not good:
            return out
        m = self.encode({key: torch.cat([b[key] for b in inputs]) for key in inputs[0]})
        index = self.index  # one generation for the whole batch
        for mode in sorted({g[1] for g in good}):
            pos = [j for j, g in enumerate(good) if g[1] == mode]
            k = max(good[j][2] for j in pos)
            ranked = self._rank(index, m.select(torch.tensor(pos)), k, mode, self.candidates, {})
            for j, hits in zip(pos, ranked, strict=True):
                out[good[j][0]] = hits[: good[j][2]]  # a prefix of a stable top-k is the smaller top-k
        return out

    @torch.no_grad()
    def rank(self, m: MentionFeatures, *, k: int = 10, mode: str | None = None, candidates: int | None = None,
             **search: int | None) -> list[list[LinkedEntity]]:
        """Top-k entities of each mention of an encoded batch. `search`: ANN parameters for this call
        (`ef_search`, `nprobe`, `refine`; default the index's own)."""
        mode, candidates = mode or self.mode, candidates or self.candidates
        check_options(mode=mode, k=k, candidates=candidates)
        return self._rank(self.index, m, k, mode, candidates, search)

    def _rank(self, index: EntityIndex, m: MentionFeatures, k: int, mode: str, candidates: int,
              search: dict[str, int | None]) -> list[list[LinkedEntity]]:
        """`rank` with checked options, on one index generation (even if reload() runs meanwhile)."""
        k = min(k, len(index))
        if mode == "exhaustive":
            rows, picked = exhaustive_top_k(self.model, index, m, k)
            return [self._hits(index, i, rows, picked, None) for i in range(len(m))]
        cand, scores = two_stage(self.model, index, m, max(candidates, k), self.first_stage,
                                 {**self.search, **search})
        rows, picked, first = top_k(cand, scores, k)
        return [self._hits(index, i, rows, picked, first) for i in range(len(m))]

    def _hits(self, index: EntityIndex, i: int, rows: torch.Tensor, picked: dict[str, torch.Tensor],
              first: torch.Tensor | None) -> list[LinkedEntity]:
        """Mention i's ranked entities; rows -1 (fewer live rows than k) are left out."""
        valid = picked.get("V_valid")
        out = []
        for j, row in enumerate(rows[i].tolist()):
            if row < 0:
                break
            terms = {t: float(picked[t][i, j]) for t in SCORE_TERMS if t in picked}
            if "S_V" in terms and valid is not None and not bool(valid[i, j]):
                terms["S_V"] = None  # type: ignore[assignment]
            out.append(LinkedEntity(rank=j + 1, row=row, qid=index.qid(row), name=index.name(row),
                                    first_stage=None if first is None else float(first[i, j]), **terms))
        return out
