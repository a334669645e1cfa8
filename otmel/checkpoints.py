"""A trained checkpoint for inference: its model, its config and its identity (sha256 of the weight file).

A checkpoint is a directory written by training (`otmel.train.worker.checkpoint`): `model.safetensors`, optionally
`best.safetensors` (the best dev-MRR weights, preferred when present) and `state.json`, whose `config` is the
full run config. A run directory (holding `results.json` with a `"checkpoint"` entry) is accepted too and
resolves to its final checkpoint.

The identity of a checkpoint is the sha256 of the weight file actually loaded: an entity index records it,
and a linker refuses an index built from other weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from otmel.config import ModelConfig
from otmel.data.shards import sha256_file
from otmel.io import atomic_json, atomic_path
from otmel.model import OTMEL

# The files of a checkpoint directory (written by `otmel.train.worker.checkpoint`) and of a run directory.
MODEL_FILE, BEST_FILE, STATE_FILE, RESULTS_FILE = "model.safetensors", "best.safetensors", "state.json", "results.json"
EXTRA_FILE = "extra.safetensors"  # run-level tensors beside the weights (e.g. the mined hard-negative table)


class CheckpointError(FileNotFoundError):
    """A path is not a usable checkpoint (missing files, no config)."""


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode) and where it came from."""

    model: OTMEL
    config: ModelConfig
    path: Path  # the checkpoint directory
    weights: Path  # the weight file loaded (best.safetensors when present)
    sha256: str  # sha256 of `weights`


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory of `path`: itself, or the `"checkpoint"` of a run directory's results.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir() and not (p / STATE_FILE).exists() and (p / RESULTS_FILE).exists():
        ckpt = json.loads((p / RESULTS_FILE).read_text()).get("checkpoint")
        if not ckpt:
            raise CheckpointError(f"run {p}: results.json names no checkpoint")
        p = Path(ckpt)
    if not p.is_dir() or not (p / STATE_FILE).exists():
        raise CheckpointError(f"{p} is not a checkpoint directory (no {STATE_FILE}; expected the folder written "
                              "by `otmel train`, or a run directory with results.json)")
    return p


def weights_file(checkpoint: Path) -> Path:
    """The weight file inference loads: `best.safetensors` when present, else `model.safetensors`."""
    for name in (BEST_FILE, MODEL_FILE):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise CheckpointError(f"checkpoint {checkpoint}: neither {BEST_FILE} nor {MODEL_FILE}")


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint directory (its best weights if present) or of a .safetensors file."""
    return load_file(str(weights_file(path) if Path(path).is_dir() else path))


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 (hex) of the weight file of a checkpoint (or run) directory."""
    return sha256_file(weights_file(resolve_checkpoint(path)))


def model_config_of(checkpoint: Path) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's state.json (the run config's `model` section)."""
    from otmel.runconfig import RunConfig

    state = json.loads((checkpoint / STATE_FILE).read_text())
    if "config" not in state:
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_FILE} holds no `config`")
    return RunConfig.from_dict(state["config"]).model_config()


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Build the model of a checkpoint (or run) directory, load its weights, switch it to eval mode.

    In eval mode a distilled (KD) model runs its student attention, as at inference in the paper."""
    ckpt = resolve_checkpoint(path)
    cfg = model_config_of(ckpt)
    weights = weights_file(ckpt)
    model = OTMEL(cfg)
    model.load_state_dict(load_file(str(weights)))
    model.eval().to(device)
    return LoadedCheckpoint(model=model, config=cfg, path=ckpt, weights=weights, sha256=sha256_file(weights))


def save_model_checkpoint(directory: str | Path, model: OTMEL, extra_state: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `state.json` (run config with this model's config) into `directory`: a
    checkpoint the linker loads, e.g. for a randomly initialised model in tests and timing benches."""
    from otmel.runconfig import RunConfig

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": "otmel-checkpoint-1"})
    state = {**(extra_state or {}), "config": RunConfig(model=model.cfg).to_dict()}
    atomic_json(out / STATE_FILE, state, indent=2, sort_keys=True)
    return out
