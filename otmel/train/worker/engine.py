"""Training engines: DeepSpeed (default) or torch DDP, behind one small interface.

Both read the same DeepSpeed JSON (`configs/deepspeed/*.json`): ZeRO stage, precision (as `train.precision`
resolves it: `otmel.train.worker.precision`), gradient clipping and the LR schedule (`WarmupCosineLR`; DDP uses
DeepSpeed's own scheduler class on a torch optimizer, so the two strategies follow the same schedule). The
optimizer is always torch's AdamW: DeepSpeed's own "AdamW" JIT-builds a fused CPU Adam (~50 s on CPU).

Device (`otmel.train.worker.devices`): the worker's one device. DDP: the model is moved there before the optimizer
and the wrapper are built, and a CUDA device is DDP's one device id. DeepSpeed moves the model itself (to its
accelerator's device of the worker's LOCAL_RANK); a GPU engine that lands elsewhere than the worker's device is an
error, since every batch goes to the worker's device.
"""

from __future__ import annotations

import contextlib
import copy
import json
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otmel.io import atomic_path
from otmel.runconfig import TrainConfig
from otmel.train.worker.devices import ddp_device_kwargs
from otmel.train.worker.precision import Precision, apply_precision, resolve_precision


def load_ds_config(train: TrainConfig, total_steps: int, use_gpu: bool, batch_size: int | None = None
                   ) -> dict[str, Any]:
    """The DeepSpeed JSON with the run's values filled in (batch size: `batch_size`, default `train.batch_size`;
    clipping, schedule over `total_steps`, precision). ZeRO 1/2 write their optimizer state in DeepSpeed's elastic
    layout (padding stripped), so that W ranks' partitions load on W' ranks (`Engine.load_optimizer_state`)."""
    with open(train.deepspeed_config) as f:
        ds = json.load(f)
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = batch_size or train.batch_size
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):
        zero["elastic_checkpoint"] = True
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = train.grad_clip
    sched = ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    # DeepSpeed's WarmupCosineLR refuses 0 warm-up steps; one step of warm-up from warmup_min_ratio is the nearest
    sched["params"].update(total_num_steps=max(1, total_steps), warmup_num_steps=max(1, train.warmup_steps))
    # train.precision ("auto": the JSON's bf16 on GPU, fp32 on CPU, where DeepSpeed runs fp32): precision.py
    apply_precision(ds, run_precision(train, use_gpu, ds))
    ds.setdefault("steps_per_print", 10**9)
    return ds


def run_precision(train: TrainConfig, use_gpu: bool, ds_config: dict[str, Any]) -> Precision:
    """The run's `Precision` (`train.precision` on this device and strategy, the JSON as read)."""
    return resolve_precision(train.precision, use_gpu=use_gpu, strategy=train.strategy, ds_config=ds_config)


TOWER_PREFIXES = ("encoder.text_model.", "encoder.vision_model.")  # the (pre)trained backbones in OTMEL


def param_groups(model: nn.Module, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """AdamW parameter groups: one at `lr`, or with `head_lr` the towers (`TOWER_PREFIXES`) at `lr` and every
    other trainable parameter at `head_lr` (group 0 = towers)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    towers = [p for n, p in named if n.startswith(TOWER_PREFIXES)]
    heads = [p for n, p in named if not n.startswith(TOWER_PREFIXES)]
    return [g for g in ({"params": towers, "lr": lr}, {"params": heads, "lr": head_lr}) if g["params"]]


class Engine:
    """model + optimizer + LR schedule; `forward`, `step(loss)`, and state for checkpoints."""

    def __init__(self, model: nn.Module, train: TrainConfig, total_steps: int, world_size: int, use_gpu: bool,
                 batch_size: int | None = None, device: torch.device | str = "cpu") -> None:
        self.strategy, self.device = train.strategy, torch.device(device)
        self.ds_config = load_ds_config(train, total_steps, use_gpu, batch_size)
        # the filled JSON resolves as the JSON did (its bf16 / fp16 section is there exactly when the engine's)
        self.precision = run_precision(train, use_gpu, self.ds_config)  # `autocast()`: every forward's context
        self.module = model
        if self.strategy != "deepspeed":
            model.to(self.device)  # before the optimizer and DDP see its parameters
        optimizer = torch.optim.AdamW(param_groups(model, train.lr, train.head_lr), lr=train.lr,
                                      weight_decay=train.weight_decay)
        sched_params = self.ds_config["scheduler"]["params"]
        if self.strategy == "deepspeed":
            import deepspeed

            if not use_gpu:
                from otmel.train.worker.ds_ops import prepare_cpu_comm

                prepare_cpu_comm(train.deepspeed_shm)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.ds_config
            )
            placed = torch.device(self.engine.device) if self.engine.device is not None else None
            if self.device.type == "cuda" and placed != self.device:
                raise RuntimeError(f"DeepSpeed placed the model on {placed}, but this worker's device (Ray Train's) is "
                                   f"{self.device}: LOCAL_RANK does not index this worker's GPU")
            self.forward_module: nn.Module = self.engine
        else:
            from deepspeed.runtime.lr_schedules import WarmupCosineLR

            self.optimizer = optimizer
            self.scheduler = WarmupCosineLR(optimizer, **sched_params)
            self.forward_module = (
                nn.parallel.DistributedDataParallel(model, **ddp_device_kwargs(self.device)) if world_size > 1
                else model
            )
        self.grad_clip = train.grad_clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_module(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast of the run's forward passes (`train.precision`; a no-op unless bf16 off the engine)."""
        return self.precision.autocast()

    def step(self, loss: torch.Tensor, lr_iteration: float | None = None) -> None:
        """Backward + optimizer step; then the LR schedule moves to `lr_iteration` (the run's clock,
        `otmel.train.worker.elastic.SampleClock.lr_iteration`), or one step on without it."""
        lr_kwargs = {"last_batch_iteration": lr_iteration} if lr_iteration is not None else {}
        if self.strategy == "deepspeed":
            self.engine.backward(loss)
            self.engine.step(lr_kwargs=lr_kwargs)
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step(**lr_kwargs)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0)) if self.strategy == "deepspeed" else 0

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state (its ZeRO partition) in types `torch.load(weights_only=True)` accepts."""
        return _plain(self.optimizer.state_dict())

    def load_optimizer_state(self, states: list[dict[str, Any]]) -> None:
        """Restore the optimizer from the states every rank of the saving run wrote (`optimizer_state`, in rank
        order), whatever that run's world size was. Without ZeRO every rank holds the whole state: rank 0's is
        loaded. ZeRO 1/2 (elastic layout, `load_ds_config`): DeepSpeed merges the W saved partitions and cuts this
        rank's partition of the W' ranks now running; the fp32 master weights come from the saved partitions too."""
        if self.zero_stage == 0:
            self.optimizer.load_state_dict(states[0])
            return
        if self.zero_stage > 2:
            raise NotImplementedError("resuming ZeRO stage 3 optimizer state is not supported; use stage 1 or 2")
        import torch.distributed as dist

        self.optimizer.load_state_dict(zero_state_list(states, dist.get_world_size()), load_from_fp32_weights=True)
        # DeepSpeed 0.19.8 restores a state it did not hold yet (a fresh engine's) padded to one dimension, torch's
        # scalar Adam `step` included; a later save would then cut the step like a partition: keep it a scalar
        for state in self.optimizer.optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step) and step.dim():
                state["step"] = step.reshape(-1)[0].clone()

    def load_legacy_optimizer_state(self, state: dict[str, Any]) -> None:
        """This rank's ZeRO partition from a checkpoint of the same world written before the elastic layout (it
        holds no world size): ZeRO reads its own entry of a per-rank list."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        self.optimizer.load_state_dict([state if r == rank else None for r in range(world)])

    def scheduler_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        """Restore the schedule's position and set the optimizer's LR to it. DeepSpeed's ZeRO 1/2 optimizer load does
        not restore the param groups' LR: they kept the fresh schedule's pre-start LR (0), so the first step after a
        resume took no step at all (found by tests/test_full_size.py); the scheduler's own load sets no LR."""
        self.scheduler.load_state_dict(state)
        self.scheduler.step(last_batch_iteration=self.scheduler.last_batch_iteration)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def zero_state_list(states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The list DeepSpeed's ZeRO 1/2 `load_state_dict` takes (one entry per rank; it reads its own rank's for the
    global settings and merges the partitions of all entries), for `world_size` ranks from the states of
    `len(states)` saved ranks. More ranks than saved: the extra entries are rank 0's state with empty partitions,
    which add nothing to the merge (DeepSpeed itself only accepts a list at least as long as the world)."""
    # DeepSpeed reads the step from the state's top level, where it only writes one its optimizer keeps in the
    # param groups (torch's AdamW keeps it per parameter): give it the step of the saved state itself
    step = states[0]["base_optimizer_state"][0].get("step", 0)
    states = [{"base_optimizer_state_step": step, **s} for s in states]
    if len(states) >= world_size:
        return states
    first = states[0]
    partitions = [t.numel() for t in first["single_partition_of_fp32_groups"]]

    def empty_like_partitions(group_states: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: (v.new_empty(0) if torch.is_tensor(v) and v.dim() == 1 and v.numel() == n else v)
                 for k, v in g.items()} for g, n in zip(group_states, partitions, strict=True)]

    filler = {**first, "base_optimizer_state": empty_like_partitions(first["base_optimizer_state"]),
              "single_partition_of_fp32_groups": [t.new_empty(0) for t in first["single_partition_of_fp32_groups"]]}
    return [*states, *([filler] * (world_size - len(states)))]


def _plain(obj: Any) -> Any:
    """Strip DeepSpeed's Python objects from an optimizer state: enums become their values; the loss
    scaler (static in fp32/bf16) and the param-slice mappings (rebuilt at initialisation) are dropped."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k not in ("loss_scaler", "param_slice_mappings")}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, Enum):
        return obj.value
    return obj


def save_state_file(obj: Any, path: Path, durable: bool = True) -> None:
    """torch.save to a temp name, then rename: a crash never leaves a half-written file (`durable`: fsync too,
    `otmel.io.atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        torch.save(obj, tmp)


def load_state_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
