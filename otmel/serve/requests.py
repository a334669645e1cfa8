"""What the linking service accepts: parsing and checking a request body, decoding its image safely.

Pure Python + PIL (no Ray, no HTTP framework), so every rule is tested directly. A rule broken raises
`RequestError(field, rule)`; the service answers it as a 4xx JSON body `{"error": {"field", "rule"}}`, which names
the offending field and never echoes the value (nothing a client sent is logged or reflected).

Limits (`Limits`, all configurable): the body's bytes (checked while it is read, before parsing), the text and
mention lengths, `k`, the number of items of a batch, the image's encoded bytes, and its pixels — read from the
image header before anything is decoded, so a decompression bomb (a few KB of PNG that would inflate to
gigabytes) is refused without allocating its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from otmel.data.images import to_rgb
from otmel.link.linker import LinkInputError, LinkQuery, check_options

FIELDS = ("text", "mention", "image", "k", "mode")

ADMIN_LOOPBACK_RULE = "/admin/reload is accepted from loopback only"  # the 403 of a non-loopback client


@dataclass(frozen=True)
class Limits:
    """Request limits of the service (`otmel serve` flags of the same names)."""

    max_body_bytes: int = 16 * 2**20  # a request body above this gets 413 before it is parsed
    max_text_chars: int = 10_000  # the tokenizer keeps max_len tokens anyway; longer is a client bug
    max_mention_chars: int = 500
    max_k: int = 100
    max_batch_items: int = 256  # items of one POST /link/batch
    max_image_bytes: int = 10 * 2**20  # decoded base64 bytes
    max_image_pixels: int = 40_000_000  # width x height from the header, checked before decoding
    # longest / shortest side: the CLIP resize scales the shortest side up to the model's size, so a 1 x 40M strip
    # would become size x (size x 40M) pixels; real photos stay far below 20
    max_image_aspect: float = 20.0


class RequestError(ValueError):
    """A request breaks a rule: `field` names where (e.g. `k`, `items[3].image`), `rule` says what is required."""

    def __init__(self, field: str, rule: str, status: int = 400) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule, self.status = field, rule, status

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "rule": self.rule}}

    def at(self, prefix: str) -> RequestError:
        """The same error for an item of a batch (`items[i].field`)."""
        return RequestError(f"{prefix}.{self.field}" if self.field != "body" else prefix, self.rule, self.status)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a body (UTF-8), or `RequestError('body', ...)`."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:  # e.g. 100,000 nested "[": a client must not get a 5xx
        raise RequestError("body", "must not nest JSON arrays / objects that deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise RequestError("body", f"must be valid UTF-8 JSON ({type(exc).__name__} at byte "
                           f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _string(obj: dict[str, Any], field: str, limit: int) -> str:
    if field not in obj:
        raise RequestError(field, "is required (a non-empty string)")
    v = obj[field]
    if not isinstance(v, str):
        raise RequestError(field, f"must be a string, got {_json_type(v)}")
    if not v.strip():
        raise RequestError(field, "must not be empty")
    if len(v) > limit:
        raise RequestError(field, f"must be at most {limit} characters, got {len(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no text the tokenizer can take
        raise RequestError(field, "must be valid Unicode (no lone surrogate escapes)") from None
    return v


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request whose image is still encoded (decoding happens off the event loop)."""

    text: str
    mention: str
    image_b64: str | None
    k: int
    mode: str | None


def parse_link_request(obj: Any, limits: Limits) -> ParsedRequest:
    """Check one `/link` object: fields, types, lengths, `k` in 1..max_k, a known mode, no unknown fields."""
    if not isinstance(obj, dict):
        raise RequestError("body", f"must be a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(str(unknown[0])[:64], f"is not a field; the fields are {list(FIELDS)}")
    text = _string(obj, "text", limits.max_text_chars)
    mention = _string(obj, "mention", limits.max_mention_chars)
    k, mode = obj.get("k", 10), obj.get("mode")
    try:
        check_options(mode=mode, k=k, max_k=limits.max_k)  # the linker's own rules (plus the service's max_k)
    except LinkInputError as exc:
        raise RequestError(exc.field, exc.rule) from None
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise RequestError("image", f"must be a base64 string or null, got {_json_type(image)}")
    return ParsedRequest(text, mention, image or None, k, mode)


def parse_batch_request(obj: Any, limits: Limits) -> list[ParsedRequest | RequestError]:
    """A `/link/batch` body: a JSON array of `/link` objects (or `{"items": [...]}`); each item is checked alone."""
    items = obj.get("items") if isinstance(obj, dict) and set(obj) == {"items"} else obj
    if not isinstance(items, list):
        raise RequestError("body", "must be a JSON array of /link objects (or {\"items\": [...]})")
    if not items:
        raise RequestError("body", "must hold at least one item")
    if len(items) > limits.max_batch_items:
        raise RequestError("body", f"must hold at most {limits.max_batch_items} items, got {len(items)}", 413)
    out: list[ParsedRequest | RequestError] = []
    for i, item in enumerate(items):
        try:
            out.append(parse_link_request(item, limits))
        except RequestError as exc:
            out.append(exc.at(f"items[{i}]"))
    return out


def decode_image_field(b64: str, limits: Limits) -> Image.Image:
    """base64 → a decoded RGB image, or `RequestError('image', ...)`: not base64, too many bytes, not an image,
    too many pixels (from the header, before decoding), or truncated / corrupt data."""
    if len(b64) > 4 * (limits.max_image_bytes // 3 + 1) + 8:
        raise RequestError("image", f"must be at most {limits.max_image_bytes} bytes once decoded", 413)
    try:
        data = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image", "must be standard base64 (RFC 4648, with padding)") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError("image", f"must be at most {limits.max_image_bytes} bytes once decoded", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img: Image.Image = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w < 1 or h < 1:
                raise RequestError("image", "must have a positive width and height")
            if w * h > limits.max_image_pixels:
                raise RequestError("image", f"must have at most {limits.max_image_pixels} pixels, got {w}x{h}", 413)
            if max(w, h) > limits.max_image_aspect * min(w, h):
                raise RequestError("image", f"must have an aspect ratio of at most {limits.max_image_aspect:g}:1, "
                                   f"got {w}x{h}")
            img.load()
            return to_rgb(img)
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL's own ceiling (2 x MAX_IMAGE_PIXELS), if above ours
        raise RequestError("image", f"must have at most {limits.max_image_pixels} pixels", 413) from None
    except Exception as exc:  # PIL raises many types for hostile input; any of them means "not an image"
        raise RequestError("image", f"must be an image PIL decodes (JPEG, PNG, GIF, WebP, ...): "
                           f"{type(exc).__name__}") from None


def to_query(req: ParsedRequest, limits: Limits) -> LinkQuery:
    """The linker's query of a checked request, its image decoded (call off the event loop)."""
    image = decode_image_field(req.image_b64, limits) if req.image_b64 is not None else None
    return LinkQuery(text=req.text, mention=req.mention, image=image, k=req.k, mode=req.mode)


__all__ = ["FIELDS", "Limits", "ParsedRequest", "RequestError", "decode_image_field", "parse_batch_request",
           "parse_json", "parse_link_request", "to_query"]
