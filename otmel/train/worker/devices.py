"""Where a worker's tensors live. No Ray here: the worker (`otmel.train.worker.loop.worker_device`) decides its one
device once — Ray Train's GPU for it under `scaling.use_gpu`, else the CPU — and hands it to the engine (the model
moved there before DDP wraps it; DeepSpeed moves it itself), the whole-KG evaluation and the mining.

`to_device` is the one way a loader's batch reaches the model: the training step, the evaluation's KG and mention
batches, the mining's. The loaders' batches are built on the CPU (DataLoader workers), hard negatives are appended
to the CPU batch (`otmel.data.hard_negatives`), then the batch is moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A new dict with every tensor of `batch` on `device` (dtypes kept; anything else as it is). A tensor in pinned
    memory (a DataLoader with `pin_memory=True`) is copied with `non_blocking=True`, every other one synchronously
    (non_blocking buys nothing from pageable memory); a tensor already there is not copied."""
    return {k: v.to(device, non_blocking=v.is_pinned()) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters): where its batches go when
    the caller names no device."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def ddp_device_kwargs(device: torch.device) -> dict[str, Any]:
    """`DistributedDataParallel`'s device arguments for a single-device module on `device`: its CUDA index as the one
    device id and the output device; none on the CPU (DDP requires `device_ids=None` there)."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device_ids": [index], "output_device": index}


__all__ = ["ddp_device_kwargs", "model_device", "to_device"]
