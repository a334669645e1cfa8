"""What a step costs a GPU: matmul FLOPs (torch's FLOP counter) and the memory traffic of everything else.

A GPU runs the matmuls, convolutions and attention of a step near its peak FLOP/s; the rest (Sinkhorn's exp /
multiply / normalise iterations, softmax, layer norms, GELUs, copies) is bound by memory bandwidth. So a step's time
is projected as  matmul_flops / (tflops x mfu) + traffic_bytes / (bandwidth x bandwidth_efficiency), with

- `flop_counter()`: `torch.utils.flop_counter.FlopCounterMode` plus the CPU kernels of scaled-dot-product attention
  it does not know (HF attention on CPU runs them; on a GPU the flash / efficient kernels it counts run instead);
- `Traffic`: bytes read and written by every other operator that computes (inputs + outputs; views, which move
  nothing, and the counted matmul-class operators are left out). An unfused upper bound: a compiled or fused kernel
  moves less.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _sdpa_cpu_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                       **kwargs: Any) -> int:
    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA)


def _is_view(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    return any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns)


_MATMUL = set(flop_counter().flop_registry)  # the operators the FLOP counter counts (overload packets)
_FREE = {aten.detach.default, aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default,
         aten.ones.default, aten.full.default, aten.lift_fresh.default}


class Traffic(TorchDispatchMode):
    """Bytes in + out of the non-matmul, non-view operators run while active (`bytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "overloadpacket", None)
        if packet not in _MATMUL and func not in _FREE and not _is_view(func):
            tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out
