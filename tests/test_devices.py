"""Device placement of a training worker, as far as a CPU-only machine can check it (no GPU run here): the batch
helper, the collectives' device rule, the engine's placement of the model and DDP's device ids, the worker's choice
of its device. That every batch of a real worker run goes through the helper: tests/test_train.py."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from otmel.errors import UserError
from otmel.model import OTMEL
from otmel.model.testing import random_batch, tiny_cfg
from otmel.runconfig import TrainConfig
from otmel.train.worker.devices import ddp_device_kwargs, model_device, to_device
from otmel.train.worker.distributed import collective_device
from otmel.train.worker.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
ZERO1 = str(ROOT / "configs/deepspeed/zero1.json")
META = torch.device("meta")


def test_to_device_moves_every_tensor_and_keeps_dtypes_and_the_rest() -> None:
    batch: dict[str, Any] = {**random_batch(), "note": ["a", "b", "c"], "n": 3}
    out = to_device(batch, META)
    assert out is not batch and set(out) == set(batch)
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert out[k].device == META and out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert v.device.type == "cpu"  # the loader's batch is left as it was
        else:
            assert out[k] is v
    assert {v.dtype for v in out.values() if torch.is_tensor(v)} >= {torch.long, torch.float32, torch.bool}
    same = to_device(batch, "cpu")
    assert all(same[k] is v for k, v in batch.items())  # already there: no copy


def test_model_device_is_the_parameters_device() -> None:
    model = OTMEL(tiny_cfg())
    assert model_device(model) == torch.device("cpu")
    assert model_device(model.to(META)) == META and model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_collectives_use_cuda_tensors_with_nccl_and_cpu_ones_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule `all_reduce_sum`, the uneven gathers and the evaluation's reductions share (a faked backend)."""
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    assert collective_device() == torch.device("cuda", 2)
    assert collective_device(torch.device("cuda", 5)) == torch.device("cuda", 5)  # the features' own GPU
    assert collective_device(torch.device("cpu")) == torch.device("cuda", 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert collective_device() == collective_device(torch.device("cuda", 5)) == torch.device("cpu")


def test_ddp_device_arguments() -> None:
    assert ddp_device_kwargs(torch.device("cuda", 1)) == {"device_ids": [1], "output_device": 1}
    assert ddp_device_kwargs(torch.device("cpu")) == {} and ddp_device_kwargs(META) == {}


def _ddp_train() -> TrainConfig:
    return TrainConfig(lr=1e-3, strategy="ddp", warmup_steps=1, deepspeed_config=ZERO1)


def test_the_ddp_engine_puts_the_model_on_the_device_before_the_optimizer() -> None:
    model = OTMEL(tiny_cfg())
    eng = Engine(model, _ddp_train(), total_steps=10, world_size=1, use_gpu=False, device=META)
    assert eng.device == META and eng.forward_module is model
    assert all(p.device == META for p in model.parameters())
    params = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters() if p.requires_grad}  # the optimizer holds the moved ones


def test_the_ddp_engine_wraps_the_moved_model_with_its_cuda_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """world_size 2 on `cuda:1` (recorded, not run: no GPU here): the model is moved to cuda:1 first, then DDP gets
    device_ids=[1]; on another device DDP gets no device ids."""
    events: list[tuple[str, Any]] = []

    class FakeDDP:
        def __init__(self, module: torch.nn.Module, **kwargs: Any) -> None:
            events.append(("ddp", kwargs))

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    model = OTMEL(tiny_cfg())
    monkeypatch.setattr(model, "to", lambda device: events.append(("to", device)) or model)
    eng = Engine(model, _ddp_train(), total_steps=10, world_size=2, use_gpu=True, device=torch.device("cuda", 1))
    assert isinstance(eng.forward_module, FakeDDP)
    assert events == [("to", torch.device("cuda", 1)), ("ddp", {"device_ids": [1], "output_device": 1})]
    events.clear()
    Engine(OTMEL(tiny_cfg()), _ddp_train(), total_steps=10, world_size=2, use_gpu=False, device=META)
    assert events == [("ddp", {})]


def test_a_deepspeed_engine_on_another_gpu_than_the_workers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed moves the model itself (to its LOCAL_RANK's GPU): the engine checks it is the worker's device
    (`deepspeed.initialize` faked: no GPU here)."""
    import deepspeed

    def initialize(model: Any, optimizer: Any, config: dict[str, Any]) -> tuple[Any, ...]:
        return types.SimpleNamespace(device=torch.device("cuda", 0)), optimizer, None, object()

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    train = TrainConfig(strategy="deepspeed", deepspeed_config=ZERO1)
    eng = Engine(OTMEL(tiny_cfg()), train, total_steps=10, world_size=2, use_gpu=True, device="cuda:0")
    assert eng.device == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"DeepSpeed placed the model on cuda:0.*cuda:1.*LOCAL_RANK"):
        Engine(OTMEL(tiny_cfg()), train, total_steps=10, world_size=2, use_gpu=True, device="cuda:1")


def test_the_worker_device_is_ray_trains_gpu_under_use_gpu_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch

    from otmel.train.worker.loop import worker_device

    given: list[torch.device] = [torch.device("cuda", 3)]
    current: list[torch.device] = []
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: given[0])
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert worker_device(True) == torch.device("cuda", 3) and current == [torch.device("cuda", 3)]
    assert worker_device(False) == torch.device("cpu") and len(current) == 1  # Ray is not asked
    given[0] = torch.device("cpu")  # a GPU run on a node whose torch has no CUDA
    with pytest.raises(UserError, match=r"scaling\.use_gpu=true, but this worker has no CUDA device"):
        worker_device(True)

