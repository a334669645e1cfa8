"""Collectives for data-parallel training and evaluation: the global negative pool and uneven gathers.

No Ray here: like open_clip's `gather_features(..., rank, world_size)`, the caller tells these functions its
rank and the world size; they never ask the cluster (only the default collectives use torch.distributed).

Global negative pool (training, `negatives: global`). Each of the W workers holds B mentions and their B gold
entities. `gather_features` all-gathers the entity features, so every worker scores its B LOCAL mentions
against the W*B GLOBAL entities (rank order; this worker's gold columns start at `rank * B`). The loss L_r
of worker r is the mean over its local mentions. One worker with the whole global batch (W*B mentions)
would minimise L = (1/W) sum_r L_r (equal B on every rank), and with `gather_with_grad=True` data
parallelism yields exactly dL/dtheta:

* the autograd all-gather's backward is a reduce-scatter with SUM: worker s receives, for its own entity
  features e_s, sum_r dL_r/de_s (every worker's loss sees e_s as negatives, or as gold on s);
* so worker s's parameter gradient is g_s = (direct terms of L_s: its mentions, the logit scale)
  + sum_r dL_r/de_s * de_s/dtheta, and sum_s g_s = d(sum_r L_r)/dtheta: every path from theta to some L_r
  is counted exactly once;
* DDP / DeepSpeed average the gradients over workers: (1/W) sum_s g_s = d((1/W) sum_r L_r)/dtheta = dL/dtheta.

With `gather_with_grad=False` (open_clip's default) the other workers' entities are constants: the loss is
the same, the gradient drops the terms dL_r/de_s for r != s (cheaper, no longer equal to one big batch).
`tests/test_global_pool.py` checks both claims on a real 2-process gloo group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, TypeVar, overload

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from otmel.model.features import EntityFeatures, FeatureBundle

AllGather = Callable[[torch.Tensor, bool], list[torch.Tensor]]
"""`(tensor, with_grad) -> one tensor per rank, in rank order` (what tests monkeypatch)."""
EntityPool = Callable[[EntityFeatures], tuple[EntityFeatures, int]]
"""What `OTMEL.forward(batch, entity_pool=...)` takes: local entity features -> (pool, column offset)."""
B_ = TypeVar("B_", bound=FeatureBundle)


def default_all_gather(tensor: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
    """All-gather over the default process group (all ranks pass the same shape).

    `with_grad`: autograd-aware gather whose backward reduce-scatters (SUM) the gradients of every rank
    into the owner. This is `_functional_collectives.all_gather_single_autograd`, the replacement that
    torch 2.13 names for the deprecated `torch.distributed.nn.functional.all_gather` (same semantics, no
    FutureWarning on every call)."""
    world_size = dist.get_world_size()
    if with_grad:
        assert dist.group.WORLD is not None  # set once initialised, which get_world_size() above requires
        return list(funcol.all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD).chunk(world_size))
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor.detach().contiguous())
    return out


def gather_features(
    features: EntityFeatures,
    rank: int,
    world_size: int,
    *,
    gather_with_grad: bool = True,
    all_gather: AllGather | None = None,
) -> tuple[EntityFeatures, int]:
    """All-gather every tensor field of `features` (same batch size B on every rank).

    Returns the global bundle (rank order) and the column offset of this rank's entities (`rank * B`).
    Floating fields: autograd-aware gather if `gather_with_grad`, else a plain gather whose local slice is
    replaced by the local tensor (gradient through the local part only). Bool / integer fields (ids,
    masks, has_image) are gathered without grad. `world_size == 1` returns `features` unchanged."""
    if world_size == 1:
        return features, 0
    gather = all_gather or default_all_gather

    def one(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return torch.cat(gather(t, False), 0)
        if gather_with_grad:
            return torch.cat(gather(t, True), 0)
        parts = list(gather(t.detach(), False))
        parts[rank] = t
        return torch.cat(parts, 0)

    return features.map(one), rank * len(features)


def make_entity_pool(rank: int, world_size: int, *, gather_with_grad: bool = True) -> EntityPool:
    """The `entity_pool` of `OTMEL.forward` for a global negative pool (picklable)."""
    return functools.partial(gather_features, rank=rank, world_size=world_size, gather_with_grad=gather_with_grad)


def entity_pool_for(
    negatives: Literal["local", "global"], rank: int, world_size: int, *, gather_with_grad: bool = True
) -> EntityPool | None:
    """`None` (in-batch negatives of this worker only) for "local", the gathered pool for "global"."""
    if negatives == "local":
        return None
    if negatives == "global":
        return make_entity_pool(rank, world_size, gather_with_grad=gather_with_grad)
    raise ValueError(f"negatives must be 'local' or 'global', got {negatives!r}")


# ---------------------------------------------------------------------------------- evaluation (no grad)


def collective_device(like: torch.device | None = None) -> torch.device:
    """The device a tensor must be on to go through a collective of the default group: NCCL takes CUDA tensors only
    (`like` when it is a CUDA device, else the current one); any other backend (gloo, the CPU runs') CPU ones. The
    features of a GPU run (NCCL) and of a CPU run (gloo) are there already: no copy. Needs the default group."""
    if dist.get_backend() == "nccl":
        return like if like is not None and like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_sizes(n: int, device: torch.device, world_size: int) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=collective_device(device))
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Pad `t` to max(sizes) rows, gather, strip each rank's padding, concatenate (rank order); on `t`'s device."""
    t = t.detach().contiguous()
    n = max(sizes)
    if n == 0:
        return t
    home, t = t.device, t.to(collective_device(t.device))
    buf = torch.cat([t, t.new_zeros((n - len(t), *t.shape[1:]))], 0) if len(t) < n else t
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)], 0).to(home)


def all_gather_tensor_uneven(t: torch.Tensor, world_size: int | None = None) -> torch.Tensor:
    """Concatenate (rank order) a tensor whose leading size differs between ranks; no grad.

    `world_size` defaults to the default group's (1 without a process group)."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size == 1:
        return t
    return _gather_padded(t, _gather_sizes(len(t), t.device, world_size))


@overload
def all_gather_uneven(bundle: torch.Tensor, world_size: int) -> torch.Tensor: ...


@overload
def all_gather_uneven(bundle: B_, world_size: int) -> B_: ...


def all_gather_uneven(bundle: B_ | torch.Tensor, world_size: int) -> B_ | torch.Tensor:
    """Concatenate (rank order) the rows every rank holds, e.g. after an exactly-once evaluation stream
    where ranks hold different numbers of rows. Any `FeatureBundle` (EntityFeatures, MentionFeatures) or a plain
    tensor; sizes are gathered once, then each field padded to the largest rank's. No grad."""
    if isinstance(bundle, torch.Tensor):
        return all_gather_tensor_uneven(bundle, world_size)
    if world_size == 1:
        return bundle
    first = next(iter(bundle.tensors().values()))
    sizes = _gather_sizes(len(first), first.device, world_size)
    return bundle.map(lambda t: _gather_padded(t, sizes))


__all__ = [
    "AllGather", "EntityPool", "all_gather_tensor_uneven", "all_gather_uneven", "all_reduce_sum", "collective_device",
    "default_all_gather", "entity_pool_for", "gather_features", "make_entity_pool",
]


def all_reduce_sum(value: float, world_size: int) -> float:
    """The sum of a number over ranks (the number itself with world_size 1: no collective)."""
    if world_size <= 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())  # NCCL: CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0])
