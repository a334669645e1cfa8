"""DeepSpeed's JIT-built CPU shared-memory all-reduce op, made safe to use (checked on deepspeed 0.19.8, torch 2.13).

On a CPU accelerator every `deepspeed.initialize` builds or loads `deepspeed_shm_comm` through torch's
`cpp_extension.load`, which guards the build folder with a *file baton*: a `lock` file created with O_EXCL and
deleted when the build (or the up-to-date check of a cached build) ends. A process killed while it holds the baton
— a worker lost to a fault, `ray stop --force`, a timeout, Ctrl-C during the ~40 s first build — leaves the file
behind, and from then on every DeepSpeed start on that machine waits on it forever, silently (found in CI: three
Ray + DeepSpeed tests hung behind a baton left by an earlier killed run).

So, on CPU:
- by default (`train.deepspeed_shm: false`) the op is not used at all: DeepSpeed then reduces over the gloo
  process group Ray Train set up, needs no compiler, and starts ~40 s sooner on a fresh machine;
- with `train.deepspeed_shm: true` the op is loaded under an `flock` of our own in the build folder (the kernel
  drops it when its holder dies). Whoever holds that flock is the only otmel process that can hold the baton, so a
  baton found while holding it was left by a dead process: it is removed (with a warning) before the load.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
SHM_OP = "deepspeed_shm_comm"


def disable_shm_op() -> None:
    """Make DeepSpeed treat its CPU shm op as unavailable in this process (it falls back to torch.distributed)."""
    import deepspeed.ops

    # DeepSpeed 0.19.8 caches its compatibility probe in this module-level dict and reads it in
    # deepspeed.comm.torch.build_shm_op (its own comment: "edits to it persist").
    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def build_dir(name: str = SHM_OP) -> Path:
    """The folder torch's cpp_extension builds `name` in (TORCH_EXTENSIONS_DIR or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def clear_stale_baton(folder: Path) -> bool:
    """Remove `folder/lock` if it was left by a dead process; returns whether one was removed. Must be called while
    holding `folder/otmel.flock` (see `load_shm_op_safely`)."""
    baton = folder / "lock"
    if not baton.exists():
        return False
    log.warning("removing a stale build lock %s left by a killed process (it would block every DeepSpeed start)",
                baton)
    baton.unlink(missing_ok=True)
    return True


def load_shm_op_safely() -> None:
    """Build / load the shm op under an flock, clearing a stale baton first. DeepSpeed's own load inside
    `deepspeed.initialize` then returns the module from its per-process cache (`OpBuilder._loaded_ops`) without
    touching the baton, so among otmel workers only the flock holder ever holds it."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    folder = build_dir(builder.name)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "otmel.flock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another worker on this machine builds; dropped on death
        clear_stale_baton(folder)
        builder.load()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def prepare_cpu_comm(use_shm: bool) -> None:
    """Before `deepspeed.initialize` on a CPU worker: disable the shm op, or load it safely."""
    if use_shm:
        load_shm_op_safely()
    else:
        disable_shm_op()


__all__ = ["SHM_OP", "build_dir", "clear_stale_baton", "disable_shm_op", "load_shm_op_safely", "prepare_cpu_comm"]
