"""The service's request rules (no Ray, no HTTP): every class of bad request names its field and rule; images are
checked from their header before decoding; `Linker.link_batch` answers good items and isolates bad ones."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from otmel.link import Linker
from otmel.link.linker import LinkInputError, LinkQuery
from otmel.serve.requests import (
    Limits,
    RequestError,
    decode_image_field,
    parse_batch_request,
    parse_json,
    parse_link_request,
    to_query,
)
from tests.ranking_helpers import assert_same_ranking
from tests.test_link import ckpt, index_dir, kg, linker, mentions  # noqa: F401  (session fixtures)

L = Limits()
GOOD = {"text": "Ada Lovelace wrote the first program.", "mention": "Ada Lovelace"}


def _png(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h pixels with a tiny (truncated) body: decoding it would allocate w*h*3."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _err(fn, *a) -> RequestError:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError) as info:
        fn(*a)
    return info.value


def test_a_good_request_parses_with_defaults() -> None:
    r = parse_link_request(GOOD, L)
    assert (r.text, r.mention, r.k, r.mode, r.image_b64) == (GOOD["text"], GOOD["mention"], 10, None, None)
    r = parse_link_request({**GOOD, "k": 3, "mode": "exhaustive", "image": None}, L)
    assert (r.k, r.mode) == (3, "exhaustive")


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"mention": "Ada"}, "text", "required"),
    ({"text": "Ada"}, "mention", "required"),
    ({**GOOD, "text": ""}, "text", "empty"),
    ({**GOOD, "mention": "   "}, "mention", "empty"),
    ({**GOOD, "text": 5}, "text", "string"),
    ({**GOOD, "text": "x" * 10_001}, "text", "at most 10000"),
    ({**GOOD, "mention": "x" * 501}, "mention", "at most 500"),
    ({**GOOD, "k": 0}, "k", "between 1 and 100"),
    ({**GOOD, "k": 101}, "k", "between 1 and 100"),
    ({**GOOD, "k": 2.5}, "k", "integer"),
    ({**GOOD, "k": True}, "k", "integer"),
    ({**GOOD, "k": "3"}, "k", "integer"),
    ({**GOOD, "mode": "fast"}, "mode", "one of"),
    ({**GOOD, "image": 7}, "image", "base64"),
    ({**GOOD, "img": "x"}, "img", "not a field"),
    (["not", "an", "object"], "body", "JSON object"),
])
def test_every_rule_names_its_field(body: object, field: str, words: str) -> None:
    e = _err(parse_link_request, body, L)
    assert e.field == field and words in e.rule and e.status == 400
    assert e.body() == {"error": {"field": field, "rule": e.rule}}
    if isinstance(body, dict) and isinstance(body.get("text"), str) and len(body["text"]) > 100:
        assert body["text"] not in e.rule  # the value is never echoed


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b'{"text": NaN}', b"", b"[" * 100_000])
def test_invalid_json_is_a_body_error(raw: bytes) -> None:
    e = _err(parse_json, raw)
    assert e.field == "body" and "JSON" in e.rule


def test_a_lone_surrogate_is_refused_before_the_tokenizer_sees_it() -> None:
    body = parse_json(b'{"text": "Ada \\ud800 wrote", "mention": "Ada"}')
    e = _err(parse_link_request, body, L)
    assert e.field == "text" and "Unicode" in e.rule


def test_images_bad_base64_not_an_image_too_big_and_bombs() -> None:
    good = base64.b64encode(_png(40, 30)).decode()
    img = decode_image_field(good, L)
    assert img.size == (40, 30) and img.mode == "RGB"
    assert "base64" in _err(decode_image_field, "not base64 !!", L).rule
    e = _err(decode_image_field, base64.b64encode(b"GIF89a but not really an image").decode(), L)
    assert e.field == "image" and "PIL decodes" in e.rule and e.status == 400
    small = Limits(max_image_bytes=1000)
    e = _err(decode_image_field, base64.b64encode(b"\0" * 2000).decode(), small)
    assert e.status == 413 and "1000 bytes" in e.rule
    # a decompression bomb: 50,000 x 50,000 pixels declared in ~1 KB, refused from the header
    bomb = base64.b64encode(png_bomb(50_000, 50_000)).decode()
    assert len(bomb) < 4000
    e = _err(decode_image_field, bomb, L)
    assert e.status == 413 and "pixels" in e.rule  # (PIL's own ceiling already refuses this one at open)
    e = _err(decode_image_field, base64.b64encode(png_bomb(10_000, 8_000)).decode(), L)  # 80 MP: ours refuses it
    assert e.status == 413 and "at most 40000000 pixels, got 10000x8000" in e.rule
    # under the pixel limit but truncated: a decode error, not a crash
    e = _err(decode_image_field, base64.b64encode(png_bomb(300, 300)).decode(), L)
    assert e.status == 400 and "PIL decodes" in e.rule
    # a 1 x 800 strip: few pixels, but the CLIP resize would blow it up by the model's size
    e = _err(decode_image_field, base64.b64encode(_png(1, 800)).decode(), L)
    assert e.status == 400 and "aspect ratio of at most 20:1, got 1x800" in e.rule
    assert decode_image_field(base64.b64encode(_png(20, 400)).decode(), L).size == (20, 400)  # 20:1 passes
    # RGBA is flattened on white
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, format="PNG")
    assert decode_image_field(base64.b64encode(buf.getvalue()).decode(), L).getpixel((0, 0)) == (255, 255, 255)


def test_batch_items_fail_alone_and_the_batch_has_limits() -> None:
    items = parse_batch_request([GOOD, {**GOOD, "k": 0}, {"text": "x"}], L)
    assert not isinstance(items[0], RequestError)
    assert isinstance(items[1], RequestError) and items[1].field == "items[1].k"
    assert isinstance(items[2], RequestError) and items[2].field == "items[2].mention"
    assert len(parse_batch_request({"items": [GOOD]}, L)) == 1
    assert _err(parse_batch_request, [], L).field == "body"
    assert _err(parse_batch_request, {"text": "x"}, L).field == "body"
    e = _err(parse_batch_request, [GOOD] * 3, Limits(max_batch_items=2))
    assert e.status == 413 and "at most 2 items" in e.rule


def test_link_batch_equals_link_and_isolates_bad_items(linker: Linker, kg: Path) -> None:  # noqa: F811
    from otmel.link.evaluate import read_split

    _, ms = read_split(kg, "test", linker.pre)
    picked = ms[:5]
    queries = [LinkQuery(m["sentence"], m["mention"], k=k, mode=mode)
               for m, k, mode in zip(picked, (1, 5, 10, 3, 7), ("two-stage", None, "exhaustive", None, "exhaustive"),
                                     strict=True)]
    bad = LinkQuery("some text", "  ")
    answers = linker.link_batch([queries[0], bad, *queries[1:]])
    assert isinstance(answers[1], LinkInputError)
    answers = [answers[0], *answers[2:]]
    for q, got in zip(queries, answers, strict=True):
        assert not isinstance(got, LinkInputError)
        want = linker.link(q.text, q.mention, k=q.k, mode=q.mode)
        assert len(got) == q.k and [a.rank for a in got] == list(range(1, q.k + 1))
        assert_same_ranking(got, want)  # one batch vs one mention: equal up to float noise at near-ties
    only_bad = linker.link_batch([bad])
    assert len(only_bad) == 1 and isinstance(only_bad[0], LinkInputError) and "empty" in str(only_bad[0])


def test_to_query_decodes_the_image(linker: Linker) -> None:  # noqa: F811
    req = parse_link_request({**GOOD, "image": base64.b64encode(_png(20, 20)).decode()}, L)
    q = to_query(req, L)
    assert isinstance(q.image, Image.Image) and q.image.size == (20, 20)
    got = linker.link_batch([q])[0]
    want = linker.link(GOOD["text"], GOOD["mention"], image=_png(20, 20))
    assert not isinstance(got, LinkInputError)
    assert [e.qid for e in got] == [e.qid for e in want]
