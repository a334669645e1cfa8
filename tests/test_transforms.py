"""Transforms: decode, CLIP preprocessing (checked against transformers), the Preprocessor, normalisation."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from data_fixtures import GARBAGE, jpeg_bytes, make_tokenizer
from PIL import Image

from otmel.data.images import normalize_image
from otmel.data.records import EntityRecord, MentionRecord
from otmel.data.transforms import CLIP_MEAN, CLIP_STD, Preprocessor, clip_preprocess, decode_image


@pytest.mark.parametrize(("w", "h", "size"), [(97, 61, 32), (61, 97, 32), (300, 200, 224), (224, 168, 224)])
def test_clip_preprocess_matches_transformers(w: int, h: int, size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(proc(img, return_tensors="np")["pixel_values"][0]))
    ours = clip_preprocess(img, size)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-2)
    assert proc.image_mean == pytest.approx(list(CLIP_MEAN)) and proc.image_std == pytest.approx(
        list(CLIP_STD)
    )


def test_decode_image() -> None:
    assert decode_image(GARBAGE) is None and decode_image(None) is None and decode_image(b"") is None
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img is not None and img.mode == "RGB" and img.size == (10, 6)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent → white background
    gray = io.BytesIO()
    Image.new("L", (5, 5), 7).save(gray, format="JPEG")
    assert decode_image(gray.getvalue()).mode == "RGB"  # type: ignore[union-attr]


def test_normalize_image_bounds_and_determinism() -> None:
    big = jpeg_bytes(640, 400, seed=3)
    out = normalize_image(big)
    assert out is not None and out == normalize_image(big)
    img = Image.open(io.BytesIO(out))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (224, 140)
    small = normalize_image(jpeg_bytes(100, 60, fmt="PNG"))
    assert Image.open(io.BytesIO(small)).size == (100, 60)  # type: ignore[arg-type]  # never upscaled
    assert normalize_image(GARBAGE) is None


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(make_tokenizer(["adele", "singer", "sang"]), image_size=32, max_len=12)


def test_preprocessor_mention_and_entity(pre: Preprocessor) -> None:
    tok = pre.tokenizer
    out = pre.mention(MentionRecord("1", "Adele", "adele sang", "Q1", jpeg_bytes(80, 50)))
    assert set(out) == {"m_input_ids", "m_attention_mask", "m_pixel_values", "m_image_mask"}
    assert out["m_input_ids"].shape == (12,) and out["m_input_ids"].dtype == torch.long
    assert out["m_attention_mask"].dtype == torch.long and out["m_pixel_values"].shape == (3, 32, 32)
    assert (
        out["m_image_mask"].dtype == torch.bool
        and out["m_image_mask"].shape == ()
        and bool(out["m_image_mask"])
    )
    ids = out["m_input_ids"].tolist()
    expected = tok.convert_tokens_to_ids(["<s>", "adele", "</s>", "adele", "sang", "</s>"])
    assert ids[:6] == expected and out["m_attention_mask"].tolist() == [1] * 6 + [0] * 6
    assert ids[6:] == [tok.pad_token_id] * 6
    ent = pre.entity({"name": "Adele", "attrs": "singer", "image": None})
    assert set(ent) == {"e_input_ids", "e_attention_mask", "e_pixel_values", "e_image_mask"}
    assert not bool(ent["e_image_mask"]) and torch.count_nonzero(ent["e_pixel_values"]) == 0
    rec = pre.entity(EntityRecord("Q1", "Adele", "singer"))
    assert torch.equal(rec["e_input_ids"], ent["e_input_ids"])


def test_preprocessor_truncates_longest_first(pre: Preprocessor) -> None:
    out = pre.mention({"mention": "adele", "sentence": " ".join(["sang"] * 40), "image": None})
    ids = out["m_input_ids"].tolist()
    tok = pre.tokenizer
    assert len(ids) == 12 and out["m_attention_mask"].tolist() == [1] * 12
    assert ids[:3] == tok.convert_tokens_to_ids(["<s>", "adele", "</s>"])  # the short mention is kept
    assert ids[-1] == tok.eos_token_id


def test_preprocessor_counts_bad_images_and_pickles(pre: Preprocessor) -> None:
    p = Preprocessor(pre.tokenizer, image_size=16, max_len=8)
    bad = p.mention({"mention": "x", "sentence": "y", "image": GARBAGE})
    assert not bool(bad["m_image_mask"]) and torch.count_nonzero(bad["m_pixel_values"]) == 0
    p.entity({"name": "x", "attrs": "", "image": None})
    good = p.mention({"mention": "x", "sentence": "y", "image": jpeg_bytes(40, 30)})
    assert p.image_stats == {"unreadable": 1, "missing": 1, "ok": 1}
    clone = pickle.loads(pickle.dumps(p))
    again = clone.mention({"mention": "x", "sentence": "y", "image": jpeg_bytes(40, 30)})
    assert all(torch.equal(good[k], again[k]) for k in good)
