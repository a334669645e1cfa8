"""Experiment tracking on rank 0: W&B, offline unless an API key is configured; never fatal.

A missing network, a missing login or a W&B outage degrades to a warning (and to offline mode where
possible): tracking must never fail a training run.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import warnings
from typing import Any, Literal, cast

from otmel.runconfig import WandbConfig


def resolve_mode(cfg: WandbConfig) -> str:
    """`auto` -> online only when a key is configured (WANDB_API_KEY or a netrc login for W&B)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any(h.endswith("wandb.ai") for h in rc.hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class Tracker:
    def __init__(self, cfg: WandbConfig, *, enabled: bool, name: str, config: dict[str, Any], directory: str) -> None:
        self.run: Any = None
        if not (enabled and cfg.enabled):
            return
        mode = resolve_mode(cfg)
        if mode == "disabled":
            return
        try:
            import wandb

            os.makedirs(directory, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project, group=cfg.group, name=name, id=name, resume="allow", config=config,
                dir=directory,
                mode=cast("Literal['online', 'offline', 'disabled', 'shared']", mode),  # WANDB_MODE as written
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
        except Exception as exc:  # noqa: BLE001 - tracking is best effort by design
            warnings.warn(f"W&B could not start ({type(exc).__name__}: {exc}); continuing without it", stacklevel=2)
            self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B log failed ({exc}); tracking disabled for this run", stacklevel=2)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            with contextlib.suppress(Exception):
                self.run.finish()
