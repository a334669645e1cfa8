"""The paper config at full size, as a user runs it (slow; in CI): `otmel train --config configs/wikimel.yaml`
through the console script and a local Ray of its own, on a randomly initialised full-size CLIP ViT-B/32 saved to a
local directory (no download), a small dataset in the cleaned layout with 224-pixel images, DeepSpeed ZeRO-1 from
the config's JSON with `train.precision=bf16` (bf16 autocast on CPU), a mid-epoch checkpoint, a worker killed right
after it and restarted by Ray Train from it, whole-KG evaluation. Every size knob is as small as honest (3 steps of
batch 2, 40 entities); the model is the paper's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from otmel.config import ModelConfig
from otmel.data.manifest import num_entities
from otmel.data.synth import generate
from otmel.model.encoder import build_preprocessor, load_tokenizer
from otmel.runconfig import RunConfig
from otmel.tokenizer import build_tiny_tokenizer
from otmel.train.worker.checkpoint import verify_checkpoint
from otmel.train.worker.loop import FAULT_ENV, FAULT_MARKER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("otmel") or str(Path(sys.executable).parent / "otmel")
TOWERS = ("encoder.text_model.", "encoder.vision_model.", "encoder.text_projection.", "encoder.visual_projection.")


def save_full_size_clip(directory: Path) -> int:
    """A randomly initialised `CLIPModel(CLIPConfig())` (ViT-B/32 shapes) and the locally built byte-level BPE
    tokenizer, saved with `save_pretrained` (safetensors) as a hub snapshot would hold them; returns the CLIP's
    parameter count without its own logit scale (OT-MEL keeps its towers and projections, not that scalar)."""
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig())
    clip.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return sum(p.numel() for n, p in clip.named_parameters() if n != "logit_scale")


def test_the_wikimel_config_at_full_size_trains_in_bf16_resumes_and_evaluates_the_whole_kg(tmp_path: Path) -> None:
    clip_dir, src, shards, runs = tmp_path / "clip", tmp_path / "src", tmp_path / "shards", tmp_path / "runs"
    tower_params = save_full_size_clip(clip_dir)
    assert 151_000_000 < tower_params < 152_000_000  # ViT-B/32: 151.3M
    # the tokenizer loads back exactly as `load_tokenizer` loads it for model.pretrained=<dir>, ids within CLIP's vocab
    tok = load_tokenizer(ModelConfig(pretrained=str(clip_dir)))
    pair = ("Forik Bedar", "Visitors photographed Forik Bedar with a blue star.")
    ids = tok(*pair)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(clip_dir)(*pair)["input_ids"] == build_tiny_tokenizer()(*pair)[
        "input_ids"]  # the pair template survived the round trip
    assert len(ids) > 8 and max(ids) < CLIPConfig().text_config.vocab_size == 49408 and len(tok) < 49408
    # ~40 entities, 30 mentions (21 train, 3 dev, 6 test; one nil) with 224-pixel images
    stats = generate(src, seed=0, scale=0.02, image_size=224, workers=1, mentions=30)
    assert stats["n_entities"] == 40
    with Image.open(next((src / "kb_image").iterdir())) as img:
        assert img.size == (224, 224)

    overrides = [
        f"data.source={src}", f"data.shards={shards}", "data.num_workers=0", f"model.pretrained={clip_dir}",
        "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1", "train.batch_size=2",
        "train.epochs=1", "train.steps_per_epoch=3", "train.warmup_steps=1", "train.precision=bf16",
        "train.checkpoint_every=2", "train.eval_every=1", "train.eval_batch_size=8", "train.progress=false",
        "wandb.enabled=false", f"run.storage={runs}", "run.name=full",
    ]
    # the worker dies once, abruptly, at global step 2: right after the step-2 checkpoint (FAULT_ENV, loop.py)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled",
           "OTMEL_DEBUG": "", FAULT_ENV: "2"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([EXE, "train", "--config", "configs/wikimel.yaml", *overrides], capture_output=True,
                             text=True, timeout=900, env=env, cwd=ROOT)
        run_dir = runs / "full"
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        res = json.loads((run_dir / "results.json").read_text())
        cfg = RunConfig.from_dict(res["config"])

        # the paper config's model, as configured: ViT-B/32 at 224 px, 40 tokens, hidden width 96, bf16, ZeRO-1
        assert (cfg.name, cfg.model.pretrained, cfg.model.max_len, cfg.model.hidden_dim) == (
            "wikimel", str(clip_dir), 40, 96)
        pre = build_preprocessor(cfg.model)
        assert (pre.image_size, pre.max_len) == (224, 40)
        assert cfg.train.precision == "bf16" and Path(cfg.train.deepspeed_config).name == "zero1.json"
        log = (run_dir / "logs" / "worker-rank0.log").read_text()
        assert "[otmel] precision: bf16 autocast (cpu)" in log

        # the worker died after the step-2 checkpoint and Ray Train restarted it from that checkpoint
        assert (run_dir / FAULT_MARKER).exists()
        [resume] = res["resumes"]
        assert (resume["global_step"], resume["epoch"], resume["step_in_epoch"]) == (2, 0, 2)
        assert f"resumed from {resume['checkpoint']} at global step 2" in log
        assert res["metrics"]["global_step"] == 3 and [h["epoch"] for h in res["history"]] == [1]  # exact count
        assert res["history"][0]["train/nonfinite_steps"] == 0 and res["history"][0]["train/loss"] > 0

        # dev and test ranked over the whole KG: every one of its 40 entities
        m = res["metrics"]
        assert m["eval/kg_entities"] == num_entities(shards) == 40
        for split in ("dev", "test"):
            assert 0.0 <= m[f"{split}/H@1"] <= m[f"{split}/H@3"] <= m[f"{split}/H@5"] <= 1.0
            assert 1.0 / 40 <= m[f"{split}/MRR"] <= 1.0 and 1.0 <= m[f"{split}/MR"] <= 40

        # the final checkpoint verifies and holds the full-size model in float32 (bf16 was autocast only), trained
        ckpt = Path(res["checkpoint"])
        verify_checkpoint(ckpt, rank=0)
        assert {"model.safetensors", "best.safetensors", "state.json", "optim-rank0.pt", "manifest-rank0.json"} <= {
            p.name for p in ckpt.iterdir()}
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f, \
                safe_open(str(clip_dir / "model.safetensors"), "pt") as init:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118  # safe_open is no mapping
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
            numel = {k: int(torch.tensor(s).prod()) for k, s in shapes.items()}
            assert sum(n for k, n in numel.items() if k.startswith(TOWERS)) == tower_params
            assert sum(numel.values()) > tower_params + 1_000_000  # plus OT-MEL's heads (~2.5M at width 512)
            assert dtypes == {"F32"}
            assert shapes["encoder.vision_model.embeddings.position_embedding.weight"] == [50, 768]  # (224/32)^2 + 1
            assert shapes["match_t.ca.wq.weight"] == [96, 512] and shapes["fusion.t2v.wk.weight"] == [96, 512]
            # the towers trained. The schedule (warm-up from 0) gives steps 1 and 2 an LR of 0: the weights move at
            # step 3 only, the step after the resume, whose LR is the restored schedule's (engine.load_scheduler_state)
            name = "vision_model.encoder.layers.0.mlp.fc1.weight"
            assert not torch.equal(f.get_tensor(f"encoder.{name}"), init.get_tensor(name))
    finally:  # ~3 GB per checkpoint: not left for pytest's kept temporary folders
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(clip_dir, ignore_errors=True)
