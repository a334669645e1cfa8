"""Drawing for the synthetic benchmark (`otmel.data.synth`): the object vocabulary and the two renderers.

An *object* is a `(colour, shape)` pair such as `("red", "circle")`. Eight colours are chosen far apart in
RGB (every pair differs by at least ~70 in some channel) so that they survive JPEG compression, the pale
backgrounds and the pixel noise; six shapes are chosen so that none turns into another under the small
rotations used here (a square is rotated at most 20 degrees, never into a diamond).

Two renderers, one per side of the link:
- `draw_entity` is the knowledge graph's canonical picture: white background, objects in fixed 2x2 slots,
  fixed size, upright. Same objects -> same picture.
- `draw_mention` is a "photo" of the same objects: random pale background with a soft gradient, random
  positions (non-overlapping), random sizes and rotations, optional distractor object, Gaussian pixel noise.
  It shows the same objects as the gold entity's picture without being a pixel copy of it.

Shapes are drawn at twice the target size and downsampled (LANCZOS) for anti-aliased edges. All randomness
comes from the `numpy.random.Generator` passed in; `render_jobs` seeds one per picture from
`(seed, side, index)`, so a picture never depends on which worker process drew it or in which order.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from otmel.io import atomic_write

Obj = tuple[str, str]  # (colour, shape)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (235, 215, 0),
    "green": (30, 150, 50),
    "cyan": (0, 185, 205),
    "blue": (30, 60, 220),
    "purple": (130, 40, 170),
    "pink": (245, 110, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Words the mention sentences may use instead of the canonical ones (the attributes always use the canonical
# word): a text model has to learn that "crimson disc" and "red circle" name the same object.
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("amber", "tangerine"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "leafy"),
    "cyan": ("teal", "turquoise"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "fuchsia"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "dot"),
    "square": ("box", "block"),
    "triangle": ("wedge", "trigon"),
    "star": ("pentagram", "starburst"),
    "cross": ("plus", "plus sign"),
    "diamond": ("rhombus", "lozenge"),
}

ALL_OBJECTS: tuple[Obj, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

_SS = 2  # supersampling factor


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy) inside a circle of radius r, rotated by `angle` radians."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r * 0.95) for k in range(4)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r) for k in range(4)]
        pts = [(a, rr * (1.0 if k % 2 else 0.7)) for k, (a, rr) in enumerate(pts)]  # taller than wide
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    elif shape == "cross":
        w = r * 0.36
        xy = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
              (-r, -w), (-w, -w)]
        pts = [(math.atan2(y, x), math.hypot(x, y)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for a, rr in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, r: float, angle: float) -> None:
    colour, shape = obj
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _finish(canvas: Image.Image, size: int) -> Image.Image:
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def draw_entity(objects: tuple[Obj, ...], size: int = 64) -> Image.Image:
    """The canonical KG picture: white background, objects upright in fixed 2x2 slots, in the given order."""
    if not 1 <= len(objects) <= 4:
        raise ValueError("an entity picture holds 1 to 4 objects")
    big = size * _SS
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    r = big * 0.2
    for k, obj in enumerate(objects):
        cx = big * (0.27 + 0.46 * (k % 2))
        cy = big * (0.27 + 0.46 * (k // 2))
        _draw_object(draw, obj, cx, cy, r, 0.0)
    return _finish(canvas, size)


def _place(n: int, big: int, rng: np.random.Generator, scales: list[float] | None = None
           ) -> list[tuple[float, float, float]]:
    """n non-overlapping discs (cx, cy, r) inside a big x big canvas, disc k `scales[k]` times the usual radius;
    shrinks the radii until they fit."""
    scale = 1.0
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            if len(placed) == n:
                break
            r = big * scale * float(rng.uniform(0.13, 0.2)) * (scales[len(placed)] if scales else 1.0)
            cx, cy = (float(v) for v in rng.uniform(r + 1, big - r - 1, size=2))
            if all(math.hypot(cx - x, cy - y) >= (r + rr) * 1.02 for x, y, rr in placed):
                placed.append((cx, cy, r))
        if len(placed) == n:
            return placed
        scale *= 0.9


def draw_mention(objects: tuple[Obj, ...], size: int, rng: np.random.Generator,
                 noise: float = 6.0, big: int = -1, big_scale: float = 1.5) -> Image.Image:
    """A jittered "photo" of `objects` (all of them, each once, nothing else): pale random background with a
    gradient, random non-overlapping positions, sizes and +-20 degree rotations, Gaussian noise. The object at
    index `big` (if >= 0) is drawn `big_scale` times larger than the others."""
    side = size * _SS
    base = rng.uniform(205, 250, size=3)
    tilt = rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    direction = rng.integers(0, 2)
    grad = ramp[:, None] if direction == 0 else ramp[None, :]
    bg = base[None, None, :] + grad[..., None] * tilt[None, None, :]
    bg = np.broadcast_to(bg, (side, side, 3)).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(canvas)
    scales = [big_scale if k == big else 1.0 for k in range(len(objects))]
    for obj, (cx, cy, r) in zip(objects, _place(len(objects), canvas.size[0], rng, scales), strict=True):
        _draw_object(draw, obj, cx, cy, r, math.radians(float(rng.uniform(-20, 20))))
    img = _finish(canvas, size)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return img


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of `img` (deterministic for the same pixels and quality)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def colour_pixel_counts(img: Image.Image, tol: int = 35) -> dict[str, int]:
    """How many pixels of `img` lie within `tol` (per channel) of each palette colour: a crude detector of
    which coloured objects a picture shows, for tests and sanity checks."""
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    out = {}
    for name, rgb in COLOURS.items():
        close = (np.abs(arr - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1)
        out[name] = int(close.sum())
    return out


write_atomic = atomic_write  # `otmel.io.atomic_write`: a temporary name beside `path`, then renamed over it


# (side "kb" | "mention", index, objects, output path, index of the object drawn larger or -1)
RenderJob = tuple[str, int, tuple[Obj, ...], str, int]
_SIDE = {"kb": 0, "mention": 1}


def render_jobs(args: tuple[int, int, list[RenderJob]]) -> int:
    """Draw and write a chunk of pictures; `args` = (seed, image size, jobs). Runs in worker processes.

    KB pictures are canonical (no randomness); mention pictures use `default_rng([seed, side, index])`.
    """
    seed, size, jobs = args
    for side, idx, objs, path, big in jobs:
        if side == "kb":
            img = draw_entity(objs, size)
        else:
            img = draw_mention(objs, size, np.random.default_rng([seed, _SIDE[side], idx]), big=big)
        write_atomic(Path(path), encode_jpeg(img))
    return len(jobs)
