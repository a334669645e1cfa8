"""Data-test helpers: small datasets written in the real on-disk layouts, and an offline tokenizer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(words: list[str] | None = None) -> Any:
    """A tiny word-level `PreTrainedTokenizerFast` (lower-cased, whitespace split) with a pair template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    base = [
        "the",
        "a",
        "of",
        "in",
        "is",
        "was",
        "and",
        "to",
        "born",
        "city",
        "singer",
        "president",
        "president.",
        "obama",
        "paris",
        "barack",
    ]
    vocab_words = list(dict.fromkeys(SPECIALS + base + [w.lower() for w in (words or [])]))
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<s>"], vocab["</s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def jpeg_bytes(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth random image (photo-like enough for JPEG) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


GARBAGE = b"\xff\xd8 this is not really a jpeg" * 3


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_cleaned(root: Path, *, bad: bool = False) -> dict[str, Any]:
    """Write a small dataset in the cleaned MEL layout and return what a reader should find.

    KG (file order Q3, Q1, Q2, Q4, Q5, Q6; qid2id order Q1..Q6):
    Q1 good image, Q2 image named .png stored as .jpg, Q3 missing image, Q4 garbage then good image,
    Q5 garbage image, Q6 no image. Mentions: train 6 (+1 nil), dev 2 (+1 nil), test 3, with a missing,
    an unreadable, an extension-mismatched and an extension-less mention image. `bad=True` adds a train
    mention without `sentence` and a dev mention answering an unknown QID.
    """
    root.mkdir(parents=True, exist_ok=True)
    kb = [
        {
            "id": "Q3",
            "type": "entity",
            "entity_name": "Paris",
            "attr": "a city",
            "image_list": ["missing.jpg"],
        },
        {
            "id": "Q1",
            "type": "entity",
            "entity_name": "Barack%20Obama",
            "attr": ["President", "born 1961"],
            "image_list": ["Q1.jpg"],
        },
        {
            "id": "Q2",
            "type": "entity",
            "entity_name": "Adele",
            "attr": {"occupation": "singer"},
            "image_list": ["Q2.png"],
        },
        {
            "id": "Q4",
            "type": "entity",
            "entity_name": "Seine",
            "attr": "",
            "image_list": ["Q4_bad.jpg", "Q4.jpg"],
        },
        {"id": "Q5", "type": "entity", "entity_name": "Louvre", "attr": "museum", "image_list": ["Q5.jpg"]},
        {"id": "Q6", "type": "entity", "entity_name": "Eiffel", "attr": "tower", "image_list": []},
    ]
    (root / "kb_entity.json").write_text(json.dumps(kb))
    (root / "qid2id.json").write_text(json.dumps({f"Q{i}": i - 1 for i in range(1, 7)}))
    kb_img = root / "kb_image"
    _write(kb_img / "Q1.jpg", jpeg_bytes(320, 240, 1))
    _write(kb_img / "Q2.jpg", jpeg_bytes(200, 300, 2))
    _write(kb_img / "Q4_bad.jpg", GARBAGE)
    _write(kb_img / "Q4.jpg", jpeg_bytes(100, 80, 4))
    _write(kb_img / "Q5.jpg", GARBAGE)

    def m(mid: str, mention: str, answer: str, img: str, sentence: str | None = None) -> dict[str, Any]:
        return {
            "id": mid,
            "sentence": sentence or f"the {mention} was in paris",
            "mentions": mention,
            "imgPath": img,
            "answer": answer,
        }

    train = [
        m("m1", "Obama", "Q1", "m1.jpg"),
        m("m2", "Adele", "Q2", "m2.png"),
        m("m3", "Paris", "Q3", "gone.jpg"),
        m("m4", "Nobody", "nil", "m1.jpg"),
        m("m5", "Barack", "Q1", "m5"),
        m("m6", "Seine", "Q4", "m6.jpg"),
        m("m7", "Eiffel", "Q6", ""),
    ]
    dev = [m("d1", "Louvre", "Q5", "m1.jpg"), m("d2", "Adele", "Q2", ""), m("d3", "x", "nil", "")]
    test = [m("t1", "Seine", "Q4", "m2.jpg"), m("t2", "tower", "Q6", ""), m("t3", "Obama", "Q1", "m5.jpg")]
    if bad:
        train.append({"id": "m8", "mentions": "Obama", "imgPath": "", "answer": "Q1"})
        dev.append(m("d4", "Mystery", "Q999", ""))
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        (root / f"toy_{name}.json").write_text(json.dumps(rows))
    mimg = root / "mention_image"
    _write(mimg / "m1.jpg", jpeg_bytes(400, 300, 11))
    _write(mimg / "m2.jpg", jpeg_bytes(300, 400, 12))
    _write(mimg / "m5.jpg", jpeg_bytes(64, 48, 15))
    _write(mimg / "m6.jpg", GARBAGE)
    return {
        "qids": ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"],
        "counts": {"train": 6, "dev": 2, "test": 3},
        "nil": 2,
        "train_ids": ["m1", "m2", "m3", "m5", "m6", "m7"],
    }


def melbench_records(n: int, shape: str = "str") -> dict[str, dict[str, Any]]:
    """A MELBench-style object id -> record: `str` shape (one mention) or `list` shape (two mentions,
    the second of every fifth record nil)."""
    data: dict[str, dict[str, Any]] = {}
    for i in range(n):
        rid = f"Q{i + 1}"
        if shape == "str":
            data[rid] = {
                "id": rid,
                "sentence": f"sentence {i}",
                "mentions": f"m{i}",
                "entities": f"E{i}",
                "answer": rid,
            }
        else:
            second = "nil" if i % 5 == 0 else f"Q{1000 + i % 7}"
            data[rid] = {
                "id": rid,
                "sentence": f"sentence {i}",
                "mentions": [f"m{i}", f"n{i}"],
                "entities": [f"E{i}", f"F{i % 7}"],
                "answer": [rid, second],
            }
    return data


def write_jsonl(root: Path) -> None:
    """A small dataset in the documented JSONL format."""
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "images" / "e1.jpg", jpeg_bytes(300, 200, 21))
    _write(root / "images" / "q1.jpg", jpeg_bytes(120, 90, 22))
    ents = [
        {"qid": "A", "name": "Alpha", "attrs": ["first", "letter"], "image": "images/e1.jpg"},
        {"qid": "B", "name": "Beta", "attrs": "second", "image": None},
        {"qid": "C", "name": "Gamma"},
    ]
    (root / "entities.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ents))
    rows = {
        "train": [
            {
                "id": "1",
                "mention": "alpha",
                "sentence": "alpha is first",
                "answer": "A",
                "image": "images/q1.png",
            },
            {"id": "2", "mention": "beta", "sentence": "beta is second", "answer": "B"},
        ],
        "dev": [
            {"id": "3", "mention": "gamma", "sentence": "gamma third", "answer": "C"},
            {"id": "4", "mention": "delta", "sentence": "no entity", "answer": "nil"},
        ],
        "test": [{"id": "5", "mention": "a", "sentence": "a", "answer": "A", "image": "images/none.jpg"}],
    }
    for split, items in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
