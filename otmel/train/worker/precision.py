"""Training precision (`train.precision`): what the DeepSpeed JSON's `bf16` / `fp16` sections become, and the
autocast every forward pass of a run (the training step's model + loss, whole-KG evaluation, hard-negative mining)
runs under. One rule, written once here; no Ray.

- `auto` (default): on GPU with `strategy=deepspeed` the JSON's sections as written (the paper configs: bf16);
  elsewhere fp32, the sections dropped.
- `bf16`: on GPU with `strategy=deepspeed` the JSON's bf16, enabled even where the JSON lacks it (bf16 weights,
  fp32 master weights in the optimizer); elsewhere (CPU, or `ddp`) fp32 weights and optimizer with every forward
  under `torch.autocast(DEVICE, dtype=torch.bfloat16)`.
- `fp32`: fp32 everywhere, the sections dropped, no autocast.

DeepSpeed on CPU runs fp32 (its engine stays fp32 there), and DDP has no precision setting of its own, so there
bf16 is autocast: the matrix products of the towers and heads run in bfloat16, the weights, gradients and Adam
state stay float32, and the backward pass runs outside the autocast block (as torch recommends). Sinkhorn computes
in float32 inside it (`otmel.ot.sinkhorn`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16")  # the values of `train.precision` (otmel.runconfig.TrainConfig)


@dataclass(frozen=True)
class Precision:
    """A run's resolved precision: the engine's (`engine`: "bf16" / "fp16" when DeepSpeed keeps its weights in that
    type, else "fp32") and the autocast of its forward passes (`autocast_dtype` on `device_type`, or none)."""

    engine: str = "fp32"
    autocast_dtype: torch.dtype | None = None
    device_type: str = "cpu"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward pass of the run goes under (a no-op without autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """'fp32', 'bf16 (DeepSpeed)' or 'bf16 autocast (cpu)': what the worker's log says."""
        if self.autocast_dtype is not None:
            return f"bf16 autocast ({self.device_type})"
        return self.engine if self.engine == "fp32" else f"{self.engine} (DeepSpeed)"


def resolve_precision(precision: str, *, use_gpu: bool, strategy: str, ds_config: dict[str, Any]) -> Precision:
    """The `Precision` of a run (module docstring's table) from `train.precision`, the device, the strategy and
    the DeepSpeed JSON as read."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    device = "cuda" if use_gpu else "cpu"
    engine_casts = use_gpu and strategy == "deepspeed"  # the only place where the engine holds bf16 weights
    if precision == "fp32":
        return Precision(device_type=device)
    if precision == "bf16":
        return Precision(engine="bf16", device_type=device) if engine_casts else \
            Precision(autocast_dtype=torch.bfloat16, device_type=device)
    if engine_casts:  # auto on GPU: the JSON decides
        for kind in ("bf16", "fp16"):
            if ds_config.get(kind, {}).get("enabled", False):
                return Precision(engine=kind, device_type=device)
    return Precision(device_type=device)


def apply_precision(ds_config: dict[str, Any], precision: Precision) -> dict[str, Any]:
    """`ds_config` (changed in place and returned) with the bf16 / fp16 sections the resolved precision asks for:
    only the engine's own type enabled, the other sections dropped."""
    for kind in ("bf16", "fp16"):
        if kind != precision.engine:
            ds_config.pop(kind, None)
    if precision.engine in ("bf16", "fp16"):
        section = ds_config.setdefault(precision.engine, {})
        section["enabled"] = True
    return ds_config


__all__ = ["PRECISIONS", "Precision", "apply_precision", "resolve_precision"]
