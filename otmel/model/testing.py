"""A small model config and random batches of the model's input contract (docs/design.md, "Tensors handed to the
model"), for tests, benchmarks and smoke checks that need a model but no data."""

from __future__ import annotations

import torch

from otmel.config import ModelConfig

L, S = 16, 16  # tokens per text, image pixels (patch 8 -> 4 patches + class token)


def tiny_cfg(variant: str = "OT", **kw: object) -> ModelConfig:
    """The `variant` preset on a one-layer, 32-wide `tiny` encoder with L-token texts and S-pixel images."""
    base: dict[str, object] = dict(tiny_width=32, tiny_layers=1, tiny_heads=2, tiny_image_size=S, tiny_patch_size=8,
                                   max_len=L, hidden_dim=16, match_chunk=64)
    return ModelConfig.from_variant(variant, **{**base, **kw})


def random_batch(B: int = 6, *, seed: int = 0, images: bool = True,
                 missing: tuple[int, ...] = (4,)) -> dict[str, torch.Tensor]:
    """A batch of B (mention, gold entity) pairs for `tiny_cfg` with varied text lengths; mention `i` of `missing`
    and entity `i + 1` have no image."""
    g = torch.Generator().manual_seed(seed)
    b: dict[str, torch.Tensor] = {}
    for p in "me":
        ids = torch.randint(4, 500, (B, L), generator=g)
        lens = torch.randint(4, L + 1, (B,), generator=g)
        am = (torch.arange(L).unsqueeze(0) < lens.unsqueeze(1)).long()
        b[f"{p}_input_ids"] = ids * am
        b[f"{p}_attention_mask"] = am
        b[f"{p}_pixel_values"] = torch.randn(B, 3, S, S, generator=g)
        mask = torch.full((B,), images)
        for i in missing:
            mask[i if p == "m" else (i + 1) % B] = False
        b[f"{p}_image_mask"] = mask
    b["e_index"] = torch.arange(B) * 3  # gold entity rows in some KG
    b["m_index"] = torch.arange(B)
    return b


def entity_batch(b: dict[str, torch.Tensor], idx: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """The entity half of a batch (as a KG stream yields it), restricted to `idx`."""
    return {k: v[idx] for k, v in b.items() if k.startswith("e_")}


__all__ = ["entity_batch", "random_batch", "tiny_cfg"]
