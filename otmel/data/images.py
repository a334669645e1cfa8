"""Image files: finding them on disk, decoding them, normalising them for the shards.

PIL and the standard library only (no torch), so that `pack`'s worker processes start fast.

Vocabulary used across `otmel.data`:
- an `ImageRef` says where a record's image may be: `None` = the record declares no image; `()` = it
  declares one but no file was found ("missing"); otherwise the candidate files in order, of which the first
  one that decodes is used (a candidate that exists but does not decode is "unreadable").
- an image status is one of `IMAGE_OK`, `IMAGE_NONE`, `IMAGE_MISSING`, `IMAGE_UNREADABLE`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageRef = tuple[str, ...] | None
ImageSource = bytes | tuple[str, ...] | None  # loaded bytes, candidate files, or nothing declared

IMAGE_OK = "ok"
IMAGE_NONE = "none"
IMAGE_MISSING = "missing"
IMAGE_UNREADABLE = "unreadable"

#: extensions tried, in this order, when a name's extension does not match the file on disk
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")

#: longest side of the images stored in the shards, and their JPEG quality
MAX_SIDE = 224
JPEG_QUALITY = 90


def decode_image(data: bytes | None, *, draft_size: int | None = None) -> Image.Image | None:
    """Decode encoded image bytes to an RGB PIL image; `None` when `data` is None or does not decode.

    `draft_size` lets the JPEG decoder scale down by a power of two while decoding (result still at least
    `draft_size` on each side), which is much faster for large photos that are resized afterwards anyway.
    """
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's DecompressionBombWarning, palette transparency
            img: Image.Image = Image.open(io.BytesIO(data))
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = to_rgb(img)
            if img.width < 1 or img.height < 1:
                return None
            return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as RGB; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def normalize_image(data: bytes, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> bytes | None:
    """Re-encode image bytes as an RGB JPEG whose longest side is at most `max_side` (aspect kept).

    Returns `None` when the bytes do not decode. Deterministic: same input bytes → same output bytes.
    """
    img = decode_image(data, draft_size=max_side)
    if img is None:
        return None
    longest = max(img.size)
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)
    return out.getvalue()


def read_first_readable(paths: tuple[str, ...]) -> tuple[bytes | None, str]:
    """The original bytes of the first candidate file that decodes, and an image status."""
    found = False
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        found = True
        if decode_image(data) is not None:
            return data, IMAGE_OK
    return None, IMAGE_UNREADABLE if found else IMAGE_MISSING


def prepare_image(
    source: ImageSource, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY
) -> tuple[bytes | None, str]:
    """Normalised JPEG bytes for one record's image and its status (`pack`'s per-image work).

    `source` is the record's loaded bytes, its candidate files (first that decodes wins; `()` = missing) or
    `None` (no image declared).
    """
    if source is None:
        return None, IMAGE_NONE
    if isinstance(source, bytes):
        out = normalize_image(source, max_side, quality)
        return (out, IMAGE_OK) if out is not None else (None, IMAGE_UNREADABLE)
    found = False
    for path in source:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        found = True
        out = normalize_image(data, max_side, quality)
        if out is not None:
            return out, IMAGE_OK
    return None, IMAGE_UNREADABLE if found else IMAGE_MISSING


def prepare_job(job: tuple[ImageSource, int, int]) -> tuple[bytes | None, str]:
    """`prepare_image` over one tuple (a top-level function, so a process pool can pickle it)."""
    return prepare_image(*job)


def _ext_rank(name: str) -> tuple[int, str]:
    suffix = os.path.splitext(name)[1].lower()
    rank = IMAGE_EXTENSIONS.index(suffix) if suffix in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS)
    return rank, name


class ImageFolder:
    """Resolves image names, as written in a dataset's JSON, to files in one folder.

    The exact relative path wins; otherwise the name's extension is normalised: a file in the folder with
    the same stem and any image extension (or none) is used, e.g. `abc.png` → `abc.jpg`, `abc` → `abc.jpeg`.
    The folder is listed once (lazily), so resolving 160k names costs no per-name directory scans.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._indexes: dict[str, dict[str, list[str]]] = {}

    def _index(self, subdir: str) -> dict[str, list[str]]:
        """stem -> file names (best extension first) of the files directly in `root / subdir`."""
        if subdir in self._indexes:
            return self._indexes[subdir]
        index: dict[str, list[str]] = {}
        folder = self.root / subdir
        if folder.is_dir():
            with os.scandir(folder) as it:
                for entry in it:
                    if not entry.is_file():
                        continue
                    stem, suffix = os.path.splitext(entry.name)
                    if suffix.lower() not in IMAGE_EXTENSIONS:
                        stem = entry.name  # no (image) extension: the whole name is the stem
                    for key in {stem, stem.lower()}:
                        index.setdefault(key, []).append(entry.name)
        for names in index.values():
            names.sort(key=_ext_rank)
        self._indexes[subdir] = index
        return index

    def resolve(self, name: str) -> str | None:
        """The file for `name` (a string path), or `None` when no file matches."""
        name = (name or "").strip().replace("\\", "/")
        if not name:
            return None
        exact = self.root / name
        if exact.is_file():
            return str(exact)
        subdir, _, base = name.rpartition("/")
        stems = list(dict.fromkeys([os.path.splitext(base)[0], base.split(".")[0], base]))
        for folder in dict.fromkeys([subdir, ""]):  # the named sub-folder, then the folder itself
            index = self._index(folder)
            for stem in stems:
                for key in (stem, stem.lower()):
                    names = index.get(key)
                    if names:
                        return str(self.root / folder / names[0])
        return None

    def ref(self, names: list[str] | str | None) -> ImageRef:
        """An `ImageRef` for the image name(s) a record declares (empty names count as not declared)."""
        if names is None:
            return None
        if isinstance(names, str):
            names = [names]
        names = [n for n in names if isinstance(n, str) and n.strip()]
        if not names:
            return None
        resolved = [p for p in (self.resolve(n) for n in names) if p is not None]
        return tuple(dict.fromkeys(resolved))
