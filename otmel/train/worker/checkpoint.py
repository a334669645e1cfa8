"""Checkpoints: everything a resumed run needs to continue exactly where an uninterrupted one would be.

Layout of one checkpoint directory (Ray Train merges the per-rank files into one directory):
- `model.safetensors`      model weights (rank 0)
- `best.safetensors`       weights of the best dev-MRR epoch so far, when one exists (rank 0)
- `state.json`             epoch, step in epoch, global step, best MRR/epoch, history, the run config (rank 0)
- `optim-rank{r}.pt`       that rank's optimizer state (its ZeRO partition), LR scheduler and RNG states
- `manifest-rank{r}.json`  sizes and sha256 of the files rank r wrote, written last

A checkpoint written by W ranks loads on W' ranks (an elastic run that grew or shrank, `otmel.train.worker.
elastic`): the model and state are rank 0's, the optimizer is merged from every saved rank's file
(`Engine.load_optimizer_state`), and a rank the saving run did not have starts from its seeded RNG.
- `extra.safetensors`      run-level tensors, when any (rank 0): the mined hard-negative table

Weights are safetensors; the `.pt` files hold only tensors and plain Python values and are read with
`torch.load(weights_only=True)`: loading a checkpoint never unpickles code. Every file is written to a
temporary name and renamed, so a crash never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from otmel.checkpoints import BEST_FILE, EXTRA_FILE, MODEL_FILE, STATE_FILE
from otmel.data.shards import sha256_file
from otmel.errors import UserError
from otmel.io import atomic_json, atomic_path
from otmel.train.worker.engine import Engine, load_state_file, save_state_file


def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                        durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _atomic_json(obj: Any, path: Path, durable: bool = True) -> None:
    atomic_json(path, obj, durable, indent=2, sort_keys=True)


def rng_state() -> dict[str, Any]:
    # the legacy tuple (numpy's stubs give the no-argument call the legacy=False overload's dict)
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU worker: dropout's RNG, per visible device
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():  # the same GPUs visible
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    directory: Path,
    *,
    rank: int,
    model: nn.Module,
    engine: Engine,
    state: dict[str, Any],
    best: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    durable: bool = True,
) -> None:
    """Write this rank's part of a checkpoint into `directory`, every file under a temporary name then renamed, the
    rank's manifest (sizes, sha256) last. `durable=False` for a staging folder that Ray Train copies into the run's
    storage and deletes: fsyncing files about to be copied protects nothing (the copy is what a resume reads, and
    `verify_checkpoint` checks it against the manifests), and costs ~6 s per 3 GB checkpoint (test_full_size.py)."""
    try:
        _save_files(directory, rank, model, engine, state, best, config, extra, durable)
    except OSError as exc:  # ENOSPC, EDQUOT, EIO ...: say so in one line; the previous checkpoint is untouched
        raise CheckpointWriteError(f"writing checkpoint {directory} failed on rank {rank}: {exc.strerror or exc} "
                                   f"({type(exc).__name__}, errno {exc.errno}); the previous checkpoint is intact "
                                   "(files are written to temporary names and renamed)") from exc


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full)."""


def _save_files(directory: Path, rank: int, model: nn.Module, engine: Engine, state: dict[str, Any],
                best: dict[str, torch.Tensor] | None, config: dict[str, Any],
                extra: dict[str, torch.Tensor] | None, durable: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    written = [f"optim-rank{rank}.pt"]
    save_state_file(
        {"optimizer": engine.optimizer_state(), "scheduler": engine.scheduler_state(), "rng": rng_state()},
        directory / written[0], durable,
    )
    if rank == 0:
        meta = {"format": "otmel-checkpoint-1"}
        _atomic_safetensors(model.state_dict(), directory / MODEL_FILE, meta, durable)
        written.append(MODEL_FILE)
        if best is not None:
            _atomic_safetensors(best, directory / BEST_FILE, meta, durable)
            written.append(BEST_FILE)
        if extra:
            _atomic_safetensors(extra, directory / EXTRA_FILE, meta, durable)
            written.append(EXTRA_FILE)
        _atomic_json({**state, "config": config}, directory / STATE_FILE, durable)
        written.append(STATE_FILE)
    # written last: a rank's part of a checkpoint is complete exactly when its manifest exists
    _atomic_json({"files": {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)}
                            for n in written}}, directory / f"manifest-rank{rank}.json", durable)


class CheckpointCorruptError(UserError, RuntimeError):
    """A checkpoint's file is missing or differs from its manifest (truncated, corrupted, half-written)."""


def saved_world_size(directory: Path) -> int | None:
    """The number of ranks that wrote the checkpoint (state.json's `world_size`; None for checkpoints written before
    it was recorded, or when state.json cannot be read)."""
    try:
        value = json.loads((directory / STATE_FILE).read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value >= 1 else None


def verify_checkpoint(directory: Path, rank: int) -> None:
    """Check every rank's files against their manifests (so that all ranks judge a checkpoint alike and resume
    from the same one); rank 0's (model, state) must be there, and every rank of the saving run's world (their
    optimizer partitions are all read on resume), or `rank`'s own for a checkpoint that does not record its world.
    Raises `CheckpointCorruptError` naming the first bad file."""
    present = {int(p.name[len("manifest-rank"):-len(".json")]) for p in directory.glob("manifest-rank*.json")
               if p.name[len("manifest-rank"):-len(".json")].isdigit()}
    _verify_rank(directory, 0)
    world = saved_world_size(directory)
    needed = set(range(world)) if world is not None else {rank}
    for r in sorted((present | needed) - {0}):
        _verify_rank(directory, r)


def _verify_rank(directory: Path, r: int) -> None:
    mpath = directory / f"manifest-rank{r}.json"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointCorruptError(f"checkpoint {directory}: {mpath.name} missing or unreadable ({exc})") \
            from None
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {directory}: {name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise CheckpointCorruptError(f"checkpoint {directory}: {name} has {path.stat().st_size} bytes, its "
                                         f"manifest says {want['bytes']} (truncated)")
        if sha256_file(path) != want["sha256"]:
            raise CheckpointCorruptError(f"checkpoint {directory}: {name} differs from its manifest (sha256)")


def previous_valid_checkpoint(latest: Path, rank: int) -> Path | None:
    """The newest sibling `checkpoint_*` folder of `latest` (Ray Train names them by time) that verifies."""
    for cand in sorted(latest.parent.glob("checkpoint_*"), reverse=True):
        if cand.resolve() == latest.resolve() or not cand.is_dir():
            continue
        try:
            verify_checkpoint(cand, rank)
        except CheckpointCorruptError:
            continue
        return cand
    return None


def load_checkpoint(
    directory: Path, *, rank: int, model: nn.Module, engine: Engine | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model (+ optimizer, scheduler, and this rank's RNG when the saving run had this rank); returns
    (train state, best weights). The saving run's world size may differ from this one's (module docstring)."""
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    state = json.loads((directory / STATE_FILE).read_text())
    state.pop("config", None)
    best = load_file(str(directory / BEST_FILE)) if (directory / BEST_FILE).exists() else None
    if engine is not None:
        world = saved_world_size(directory)
        ranks = range(world) if world is not None else [rank]
        blobs = {r: load_state_file(directory / f"optim-rank{r}.pt") for r in ranks}
        if engine.zero_stage >= 1 and world is None:  # an older checkpoint: this rank's own partition only
            engine.load_legacy_optimizer_state(blobs[rank]["optimizer"])
        else:
            engine.load_optimizer_state([blobs[r]["optimizer"] for r in ranks])
        engine.load_scheduler_state(blobs[min(blobs)]["scheduler"])
        if rank in blobs:
            set_rng_state(blobs[rank]["rng"])
    return state, best


def load_extra(directory: Path) -> dict[str, torch.Tensor]:
    """The run-level tensors saved with `extra=` ({} when none were)."""
    path = Path(directory) / EXTRA_FILE
    return load_file(str(path)) if path.exists() else {}
