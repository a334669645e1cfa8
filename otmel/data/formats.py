"""The three input formats' parsers (cleaned MEL layout, MELBench JSON, JSONL) and their shared helpers.

`otmel.data.readers.read_dataset` is the entry point; see docs/data.md for the layouts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from otmel.data.images import ImageFolder, ImageRef
from otmel.data.records import NIL, SPLITS, BadRecord, EntityRecord, MentionRecord, RawDataset
from otmel.errors import InputFileError

# ------------------------------------------------------------------------------------------- helpers


def join_attrs(attr: Any) -> str:
    """Attributes as one string: a list's items (a dict's `key: value` items) joined with ". "."""
    if attr is None:
        return ""
    if isinstance(attr, str):
        return attr.strip()
    if isinstance(attr, dict):
        items = [f"{k}: {join_attrs(v)}" for k, v in attr.items()]
    elif isinstance(attr, (list, tuple)):
        items = [join_attrs(v) for v in attr]
    else:
        items = [str(attr)]
    return ". ".join(s for s in (i.strip() for i in items) if s)


def _text(value: Any) -> str | None:
    """A text field as a stripped string, or `None` when it is absent / not a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _qid_key(qid: str) -> tuple[int, int, str]:
    """Natural order of QIDs: Q2 < Q10; ids that are not Q-numbers after them, as strings."""
    m = re.fullmatch(r"[Qq](\d+)", qid)
    return (0, int(m.group(1)), "") if m else (1, 0, qid)


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _split_ids(ids: list[str], seed: int, ratios: tuple[float, float, float]) -> dict[str, list[str]]:
    """Deterministic split: sort ids, permute with `numpy.random.default_rng(seed)`, cut by ratios.

    Sizes: train = round(r0 * n), dev = round(r1 * n), test = the rest. Ids keep sorted order in each split.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split_ratios must be three non-negative numbers summing to 1, got {ratios}")
    ordered = sorted(ids)
    n = len(ordered)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(ratios[0] * n))
    n_dev = min(n - n_train, int(round(ratios[1] * n)))
    cuts = {"train": perm[:n_train], "dev": perm[n_train : n_train + n_dev], "test": perm[n_train + n_dev :]}
    return {split: [ordered[i] for i in sorted(idx.tolist())] for split, idx in cuts.items()}


class _MentionSink:
    """Collects one split's mentions: unique ids (a repeated id gets a `#k` suffix, counted)."""

    def __init__(self, ds: RawDataset, split: str, seen: set[str]) -> None:
        self.ds, self.split, self.seen = ds, split, seen
        ds.splits.setdefault(split, [])
        ds.mention_images.setdefault(split, [])

    def add(self, rec: MentionRecord, ref: ImageRef) -> None:
        if rec.id in self.seen:
            k = 1
            while f"{rec.id}#{k}" in self.seen:
                k += 1
            rec.id = f"{rec.id}#{k}"
            self.ds.stats["duplicate_mention_ids_renamed"] += 1
        self.seen.add(rec.id)
        self.ds.splits[self.split].append(rec)
        self.ds.mention_images[self.split].append(ref)


def _expand_mentions(
    rec: dict[str, Any], rid: str, file: str, ds: RawDataset, *, mention_key: str
) -> list[tuple[str, str, str, str | None]] | None:
    """(id, mention, answer, entity name) for each mention of a raw record, or None when it is bad.

    `mention_key` / `answer` / `entities` are strings (one mention) or parallel lists (several, with ids
    `f"{rid}#{k}"`). Nil answers are skipped and counted.
    """
    mentions, answers, names = rec.get(mention_key), rec.get("answer"), rec.get("entities")
    if isinstance(mentions, list) or isinstance(answers, list):
        if not (isinstance(mentions, list) and isinstance(answers, list)) or len(mentions) != len(answers):
            ds.bad.append(BadRecord(file, rid, f"'{mention_key}' and 'answer' are not parallel lists"))
            return None
        if names is not None and (not isinstance(names, list) or len(names) != len(answers)):
            ds.bad.append(BadRecord(file, rid, f"'entities' is not a list parallel to '{mention_key}'"))
            return None
        ids = [f"{rid}#{k}" for k in range(len(answers))]
        names = names if names is not None else [None] * len(answers)
        triples = list(zip(ids, mentions, answers, names, strict=True))
    else:
        triples = [(rid, mentions, answers, names)]
    out = []
    for mid, mention, answer, name in triples:
        answer_s, mention_s = _text(answer), _text(mention)
        if answer_s is None or mention_s is None:
            missing = "answer" if answer_s is None else mention_key
            ds.bad.append(BadRecord(file, mid, f"missing or non-text field '{missing}'"))
            continue
        if answer_s.strip().lower() == NIL:
            ds.stats["nil_skipped"] += 1
            continue
        out.append((mid, unquote(mention_s), answer_s.strip(), _text(name)))
    return out


# ---------------------------------------------------------------------------------- cleaned layout


def _find_split_file(src: Path, split: str) -> Path | None:
    matches = sorted(src.glob(f"*_{split}.json")) or sorted(src.glob(f"{split}.json"))
    if len(matches) > 1:
        raise ValueError(f"{src}: several {split} files: {[m.name for m in matches]}")
    return matches[0] if matches else None


def read_cleaned(src: Path) -> RawDataset:
    """The cleaned layout of the public MEL code (WikiMEL, RichpediaMEL, WikiDiverse)."""
    kb_path = src / "kb_entity.json"
    if not kb_path.is_file():
        raise FileNotFoundError(f"{src}: no kb_entity.json (is this the cleaned layout?)")
    ds = RawDataset(entities=[], splits={})
    entities = _order_by_qid2id(src / "qid2id.json", _cleaned_entities(kb_path, ImageFolder(src / "kb_image"), ds),
                                ds)
    ds.entities = [rec for rec, _ in entities]
    ds.entity_images = [ref for _, ref in entities]
    _cleaned_mentions(src, ImageFolder(src / "mention_image"), ds)
    return ds


def _cleaned_entities(kb_path: Path, kb_images: ImageFolder, ds: RawDataset) -> list[tuple[EntityRecord, ImageRef]]:
    """The entity rows of kb_entity.json; bad rows are recorded in `ds.bad` and skipped."""
    rows = _load_json(kb_path)
    if not isinstance(rows, list):
        raise InputFileError(f"{kb_path}: expected a JSON list of entities")
    entities: list[tuple[EntityRecord, ImageRef]] = []
    seen: set[str] = set()
    for pos, row in enumerate(rows):
        rid = str(row.get("id", f"#{pos}")) if isinstance(row, dict) else f"#{pos}"
        if not isinstance(row, dict):
            ds.bad.append(BadRecord(kb_path.name, rid, "not a JSON object"))
            continue
        if row.get("type", "entity") != "entity":
            ds.stats["kb_rows_not_entity"] += 1
            continue
        qid, name = _text(row.get("id")), _text(row.get("entity_name"))
        if qid is None or name is None:
            ds.bad.append(
                BadRecord(kb_path.name, rid, f"missing field '{'id' if qid is None else 'entity_name'}'")
            )
            continue
        if qid in seen:
            ds.bad.append(BadRecord(kb_path.name, qid, "duplicate entity id"))
            continue
        seen.add(qid)
        images = row.get("image_list") or []
        rec = EntityRecord(qid=qid, name=unquote(name), attrs=join_attrs(row.get("attr")))
        entities.append((rec, kb_images.ref(images if isinstance(images, list) else [images])))
    return entities


def _order_by_qid2id(qid2id_path: Path, entities: list[tuple[EntityRecord, ImageRef]], ds: RawDataset
                     ) -> list[tuple[EntityRecord, ImageRef]]:
    """Entities in the row order of qid2id.json (one JSON object on its first line) when present; entities it
    lacks go last, in file order (counted in `ds.stats`)."""
    if not qid2id_path.is_file():
        return entities
    with qid2id_path.open(encoding="utf-8") as f:
        try:
            qid2id = json.loads(f.readline())
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{f.name}: line 1 is not valid JSON: {exc.msg}") from None
    rows_of = [qid2id.get(rec.qid) for rec, _ in entities]
    ds.stats["kb_entities_not_in_qid2id"] = sum(r is None for r in rows_of)
    order = sorted(range(len(entities)),
                   key=lambda i: (rows_of[i] is None, rows_of[i] if rows_of[i] is not None else 0, i))
    return [entities[i] for i in order]


def _cleaned_mentions(src: Path, mention_images: ImageFolder, ds: RawDataset) -> None:
    """The mentions of every split file into `ds.splits` (bad rows recorded, duplicates dropped)."""
    seen_ids: set[str] = set()
    for split in SPLITS:
        sink = _MentionSink(ds, split, seen_ids)
        path = _find_split_file(src, split)
        if path is None:
            ds.stats[f"missing_split_file_{split}"] += 1
            continue
        ds.split_files[split] = path.name
        data = _load_json(path)
        if not isinstance(data, list):
            raise InputFileError(f"{path}: expected a JSON list of mentions")
        for pos, row in enumerate(data):
            row_id = _text(row.get("id")) if isinstance(row, dict) else None
            if row_id is None or _text(row.get("sentence")) is None:
                missing = "id" if row_id is None else "sentence"
                ds.bad.append(BadRecord(path.name, row_id or f"#{pos}", f"missing field '{missing}'"))
                continue
            expanded = _expand_mentions(row, row_id, path.name, ds, mention_key="mentions")
            ref = mention_images.ref(row.get("imgPath"))
            for mid, mention, answer, _ in expanded or []:
                sink.add(MentionRecord(mid, mention, row["sentence"], answer), ref)


# ------------------------------------------------------------------------------------------ melbench


def read_melbench(src: Path, seed: int, ratios: tuple[float, float, float]) -> RawDataset:
    """MELBench raw JSON: text only; the KG is one entity per distinct answer QID (name, no attrs)."""
    if src.is_dir():
        files = sorted(src.glob("*.json"))
        if len(files) != 1:
            raise ValueError(f"{src}: expected one MELBench .json file, found {[f.name for f in files]}")
        src = files[0]
    data = _load_json(src)
    if isinstance(data, list):
        data = {str(r.get("id", f"#{i}")) if isinstance(r, dict) else f"#{i}": r for i, r in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object id -> record")
    ds = RawDataset(entities=[], splits={})
    split_of: dict[str, str] = {}
    for split, ids in _split_ids(list(data), seed, ratios).items():
        split_of.update(dict.fromkeys(ids, split))
    names: dict[str, str] = {}
    pending: dict[str, list[MentionRecord]] = {s: [] for s in SPLITS}
    for rid in sorted(data):
        row = data[rid]
        if not isinstance(row, dict) or _text(row.get("sentence")) is None:
            ds.bad.append(BadRecord(src.name, rid, "missing field 'sentence'"))
            continue
        for mid, mention, answer, name in (
            _expand_mentions(row, rid, src.name, ds, mention_key="mentions") or []
        ):
            if name is None:
                ds.bad.append(BadRecord(src.name, mid, "missing field 'entities' (the entity name)"))
                continue
            if answer in names and names[answer] != name:
                ds.stats["entity_name_conflicts"] += 1
            names.setdefault(answer, name)
            pending[split_of[rid]].append(MentionRecord(mid, mention, row["sentence"], answer))
    ds.entities = [EntityRecord(qid=q, name=names[q], attrs="") for q in sorted(names, key=_qid_key)]
    ds.entity_images = [None] * len(ds.entities)
    ds.split_files = dict.fromkeys(SPLITS, src.name)
    seen: set[str] = set()
    for split in SPLITS:
        sink = _MentionSink(ds, split, seen)
        for rec in pending[split]:
            sink.add(rec, None)
    return ds


# --------------------------------------------------------------------------------------------- jsonl


def _iter_jsonl(path: Path, ds: RawDataset) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                ds.bad.append(BadRecord(path.name, f"line {lineno}", f"invalid JSON: {exc.msg}"))
                continue
            if not isinstance(row, dict):
                ds.bad.append(BadRecord(path.name, f"line {lineno}", "not a JSON object"))
                continue
            rows.append((lineno, row))
    return rows


def read_jsonl(src: Path) -> RawDataset:
    """The user format: `entities.jsonl` + `train.jsonl` / `dev.jsonl` / `test.jsonl` (docs/data.md)."""
    kg_path = src / "entities.jsonl"
    if not kg_path.is_file():
        raise FileNotFoundError(f"{src}: no entities.jsonl")
    ds = RawDataset(entities=[], splits={})
    folder = ImageFolder(src)
    seen: set[str] = set()
    for lineno, row in _iter_jsonl(kg_path, ds):
        qid, name = _text(row.get("qid")), _text(row.get("name"))
        if qid is None or name is None:
            missing = "qid" if qid is None else "name"
            ds.bad.append(BadRecord(kg_path.name, qid or f"line {lineno}", f"missing field '{missing}'"))
            continue
        if qid in seen:
            ds.bad.append(BadRecord(kg_path.name, qid, "duplicate entity id"))
            continue
        seen.add(qid)
        ds.entities.append(EntityRecord(qid=qid, name=name, attrs=join_attrs(row.get("attrs"))))
        ds.entity_images.append(folder.ref(row.get("image")))
    seen_ids: set[str] = set()
    for split in SPLITS:
        sink = _MentionSink(ds, split, seen_ids)
        path = src / f"{split}.jsonl"
        if not path.is_file():
            ds.stats[f"missing_split_file_{split}"] += 1
            continue
        ds.split_files[split] = path.name
        for lineno, row in _iter_jsonl(path, ds):
            rid = _text(row.get("id"))
            missing_keys = [k for k in ("id", "mention", "sentence", "answer") if _text(row.get(k)) is None]
            if missing_keys:
                ds.bad.append(BadRecord(path.name, rid or f"line {lineno}", f"missing field '{missing_keys[0]}'"))
                continue
            assert rid is not None  # "id" would be in missing_keys
            if row["answer"].strip().lower() == NIL:
                ds.stats["nil_skipped"] += 1
                continue
            rec = MentionRecord(rid, row["mention"], row["sentence"], row["answer"].strip())
            sink.add(rec, folder.ref(row.get("image")))
    return ds


# ------------------------------------------------------------------------------- shared post-steps
