"""Peak memory of a training step, by kind, measured on any device (CPU included) by watching tensor storages.

`StorageWatch` is a `TorchDispatchMode`: every tensor an operator returns (forward, backward, optimizer) is looked at
once per storage; a storage first seen inside the mode is *new* and counted from then until Python frees it (a
weakref finalizer). Storages that existed before (parameters, buffers, the input batch, gradients and optimizer
states of an earlier step) are never counted, so the figure is what one step adds on top of the model states. Each
new storage is labelled:

- `weight_casts`: a copy of a parameter in another dtype (autocast's bf16 weights; under DeepSpeed bf16 the weights
  *are* bf16 and this memory is part of the model states instead);
- `gradients`: storages allocated in backward (`backward()` of the watch) with exactly a parameter's size in bytes:
  the parameters' `.grad` and the weight gradients in flight to them (a tower run twice per step, on the mentions
  and on the entities, keeps one pass's weight gradients in autograd's input buffers until the other pass reaches
  the same layer). On a GPU they are part of the model states' gradient buffers;
- `activations`: everything else: the towers' saved activations, the matcher's plans (kept, or recomputed in
  backward under `model.match_checkpoint`), temporaries, the loss. `otmel plan` splits towers from matcher by how
  the peak grows with the batch and the pool (`otmel.plan._fit`).

`Timeline.peak()` replays the allocations and frees in order and returns the largest sum of the kinds asked for, with
the split at that moment. The watch sees what operators return, not the scratch space inside a kernel (cuBLAS /
cuDNN workspaces on a GPU): `otmel plan` adds a stated allowance for those.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("activations", "weight_casts", "gradients")


@dataclass
class Timeline:
    """Allocation (+bytes) and free (-bytes) events of new storages, in order, each with its storage's key."""

    events: list[tuple[int, int]] = field(default_factory=list)  # (key, +nbytes | -nbytes)
    kind: dict[int, str] = field(default_factory=dict)  # key -> kind

    def peak(self, kinds: Iterable[str] = ("activations",)) -> tuple[int, dict[str, int]]:
        """(largest live bytes over `kinds`, live bytes of every kind at that moment)."""
        wanted = set(kinds)
        live = dict.fromkeys(KINDS, 0)
        best, split = 0, dict(live)
        for key, delta in self.events:
            k = self.kind[key]
            live[k] += delta
            total = sum(v for kk, v in live.items() if kk in wanted)
            if total > best:
                best, split = total, dict(live)
        return best, split


class StorageWatch(TorchDispatchMode):
    """Counts the storages that operators allocate while it is active (see the module docstring)."""

    def __init__(self, model: nn.Module, keep: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.timeline = Timeline()
        self._live: dict[int, int] = {}  # key -> nbytes of new storages still alive
        self._old = {_ptr(t) for t in [*model.parameters(), *model.buffers(), *keep] if _ptr(t)}
        self._params = {_ptr(p) for p in model.parameters()}
        self._param_sizes = {p.untyped_storage().nbytes() for p in model.parameters()}
        self._next = 0
        self._in_backward = False

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, with what it allocates at a parameter's size labelled `gradients`."""
        self._in_backward = True
        try:
            loss.backward()
        finally:
            self._in_backward = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        cast = func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and any(
            isinstance(a, torch.Tensor) and _ptr(a) in self._params for a in tree_flatten(args)[0])
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._note(t, "weight_casts" if cast else "activations")
        return out

    def _note(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if not ptr or ptr in self._old or ptr in self._live:
            return
        key, self._next = self._next, self._next + 1
        nbytes = st.nbytes()
        if self._in_backward and nbytes in self._param_sizes:
            kind = "gradients"
        self._live[ptr] = key
        self.timeline.kind[key] = kind
        self.timeline.events.append((key, nbytes))
        weakref.finalize(st, self._free, ptr, key, nbytes)

    def _free(self, ptr: int, key: int, nbytes: int) -> None:
        if self._live.get(ptr) == key:
            del self._live[ptr]
            self.timeline.events.append((key, -nbytes))


def _ptr(t: torch.Tensor) -> int:
    return 0 if t.is_meta else int(t.untyped_storage().data_ptr())
