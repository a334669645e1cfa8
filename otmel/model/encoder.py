"""The CLIP encoder shared by mentions and entities (Sec. 3.1).

`pretrained="tiny"` builds a small randomly initialised `CLIPModel` from a config and the local tokenizer
(no downloads); anything else is loaded with `CLIPModel.from_pretrained(path_or_id)`.

Outputs, for a batch of B texts / images, in the common width d (= CLIP's projection_dim):
- token states `T` (B, Lt, d) and the pooled text embedding `t` (B, d)
- patch states `V` (B, Lv, d) (class token included) and the pooled image embedding `v` (B, d)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from otmel.config import ModelConfig
from otmel.tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from otmel.data.transforms import Preprocessor


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
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


def build_clip(cfg: ModelConfig) -> CLIPModel:
    if cfg.pretrained == "tiny":
        vocab = len(load_tokenizer(cfg))
        return CLIPModel(_tiny_clip_config(cfg, vocab))
    return CLIPModel.from_pretrained(cfg.pretrained)


def image_size_of(cfg: ModelConfig) -> int:
    if cfg.pretrained == "tiny":
        return cfg.tiny_image_size
    return int(CLIPConfig.from_pretrained(cfg.pretrained).vision_config.image_size)


def build_preprocessor(cfg: ModelConfig) -> Preprocessor:
    """The data-side half of the encoder: tokenizer + image size, run inside DataLoader workers."""
    from otmel.data.transforms import Preprocessor

    return Preprocessor(tokenizer=load_tokenizer(cfg), image_size=image_size_of(cfg), max_len=cfg.max_len)


class Encoder(nn.Module):
    """CLIP towers plus the projections of token / patch states to the common width d."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        clip = build_clip(cfg)
        self.dim = d = int(clip.config.projection_dim)
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        # The release projects token states 512->512 and patch states 768->512, then LayerNorm.
        self.token_proj = nn.Sequential(nn.Linear(clip.config.text_config.hidden_size, d), nn.LayerNorm(d))
        if cfg.use_images:
            self.vision_model = clip.vision_model
            self.visual_projection = clip.visual_projection
            self.patch_proj = nn.Sequential(nn.Linear(clip.config.vision_config.hidden_size, d), nn.LayerNorm(d))
            self.num_patches = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2 + 1

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state  # (B, Lt, Ht), final LayerNorm applied
        # Pool at the LAST real token (the final <eos>): CLIP's text transformer is causal, so only that
        # position has seen both the mention and its sentence (HF's pooler takes the first <eos>).
        last = attention_mask.long().sum(-1).clamp(min=1) - 1  # (B,)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, Ht)
        return self.token_proj(h), self.text_projection(pooled)  # (B, Lt, d), (B, d)

    def encode_image(self, pixel_values: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the vision tower only on the images that exist; missing ones get zero states (masked later)."""
        B = pixel_values.shape[0]
        V = pixel_values.new_zeros(B, self.num_patches, self.dim)  # (B, Lv, d)
        v = pixel_values.new_zeros(B, self.dim)  # (B, d)
        idx = image_mask.nonzero(as_tuple=True)[0]
        if idx.numel():
            out = self.vision_model(pixel_values=pixel_values[idx])
            V = V.index_copy(0, idx, self.patch_proj(out.last_hidden_state))
            v = v.index_copy(0, idx, self.visual_projection(out.pooler_output))
        return V, v
