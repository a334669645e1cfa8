"""Per-sample transforms: image decode, CLIP preprocessing, and the `Preprocessor` of docs/design.md.

CLIP's recipe, done with PIL + numpy: resize the shortest side to `image_size` (bicubic), centre crop to
`image_size` × `image_size`, scale to [0, 1], normalise with mean / std. It matches
`transformers.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from otmel.data.images import decode_image
from otmel.data.records import EntityRecord, MentionRecord

__all__ = ["CLIP_MEAN", "CLIP_STD", "Preprocessor", "clip_preprocess", "decode_image", "resize_shortest"]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shortest side is `size` (bicubic), the other side `int(size * long / short)`."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_size = (size, new_long) if w <= h else (new_long, size)
    if new_size == img.size:
        return img
    return img.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to `size` × `size` (padding with black when the image is smaller)."""
    w, h = img.size
    if w == size and h == size:
        return img
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def clip_preprocess(
    img: Image.Image,
    image_size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """An RGB PIL image → float tensor (3, S, S) with CLIP's resize, centre crop and normalisation."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = center_crop(resize_shortest(img, image_size), image_size)
    # numpy, not torch: single-threaded whatever torch's thread setting (small tensors + threads = slow)
    chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, S, S), contiguous
    chw *= np.asarray([1.0 / (255.0 * s) for s in std], dtype=np.float32)[:, None, None]
    chw -= np.asarray([m / s for m, s in zip(mean, std, strict=True)], dtype=np.float32)[:, None, None]
    return torch.from_numpy(chw)


def _field(sample: Any, name: str) -> Any:
    if isinstance(sample, Mapping):
        return sample.get(name)
    return getattr(sample, name, None)


@dataclass
class Preprocessor:
    """Turns mention / entity samples into the fixed-shape tensors of docs/design.md. Picklable.

    A sample is a `MentionRecord` / `EntityRecord`, or a mapping with the same text fields (`mention`,
    `sentence` / `name`, `attrs`) and `image`: encoded bytes, a PIL image, or `None`. `image_stats` counts
    images per outcome (`ok`, `missing`, `unreadable`) in this process.
    """

    tokenizer: Any
    image_size: int
    max_len: int = 40
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    image_stats: Counter = field(default_factory=Counter, repr=False, compare=False)

    def text(self, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (long, (max_len,)) of the pair `(first, second)`."""
        enc = self.tokenizer(
            first,
            second,
            truncation="longest_first",
            padding="max_length",
            max_length=self.max_len,
        )
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.long)
        if ids.shape != (self.max_len,):
            raise ValueError(f"tokenizer returned shape {tuple(ids.shape)}, expected ({self.max_len},)")
        return ids, mask

    def image(self, image: bytes | Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (float, (3, S, S)) and image mask (bool, ()); zeros + False when missing / unreadable."""
        if image is None or (isinstance(image, bytes) and not image):
            self.image_stats["missing"] += 1
            return self._blank()
        img = image if isinstance(image, Image.Image) else decode_image(image)
        if img is None:
            self.image_stats["unreadable"] += 1
            return self._blank()
        self.image_stats["ok"] += 1
        return clip_preprocess(img, self.image_size, self.mean, self.std), torch.tensor(True)

    def _blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(3, self.image_size, self.image_size), torch.tensor(False)

    def mention(self, sample: MentionRecord | Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`m_input_ids`, `m_attention_mask`, `m_pixel_values`, `m_image_mask` of one mention."""
        ids, mask = self.text(_field(sample, "mention") or "", _field(sample, "sentence") or "")
        pixels, image_mask = self.image(_field(sample, "image"))
        return {
            "m_input_ids": ids,
            "m_attention_mask": mask,
            "m_pixel_values": pixels,
            "m_image_mask": image_mask,
        }

    def entity(self, sample: EntityRecord | Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`e_input_ids`, `e_attention_mask`, `e_pixel_values`, `e_image_mask` of one entity."""
        ids, mask = self.text(_field(sample, "name") or "", _field(sample, "attrs") or "")
        pixels, image_mask = self.image(_field(sample, "image"))
        return {
            "e_input_ids": ids,
            "e_attention_mask": mask,
            "e_pixel_values": pixels,
            "e_image_mask": image_mask,
        }
