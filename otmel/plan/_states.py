"""Model-state memory per GPU: parameters, gradients and AdamW states, by ZeRO stage, world size and precision.

For Psi trainable parameters on N data-parallel ranks (bytes per parameter; "/N" = partitioned across the ranks):

    precision  kept per rank                                   stage 0    stage 1        stage 2        stage 3
    bf16       params 2, grads 2, fp32 master 4, fp32 grads 4,  20         4 + 16/N       2 + 18/N       18/N + layer
               Adam m 4, v 4
    fp32       params 4, grads 4, Adam m 4, v 4                16         8 + 8/N        4 + 12/N       16/N + layer

Stage 1 partitions the fp32 optimizer side (master weights, fp32 gradients, m, v), stage 2 also the 16-bit
gradients, stage 3 also the parameters, which are gathered a layer at a time ("layer": 4 bytes x the largest
module's own parameters, as DeepSpeed counts it). The bf16 stage-2 and stage-3 rows are DeepSpeed 0.19's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, no offload; equal in
tests). Like DeepSpeed's, these count model states only: activations, the matcher's plans and allocator slack are
measured and added by `otmel plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from torch import nn


@dataclass(frozen=True)
class ModelStates:
    """Exact (fractional) bytes of each part; `total` rounds down once, as DeepSpeed's estimators do."""

    params: Fraction
    grads: Fraction
    optimizer: Fraction  # fp32 master weights + fp32 gradients (bf16) + Adam m and v
    gathered_layer: Fraction  # ZeRO-3's working copy of the largest layer

    @property
    def total(self) -> int:
        return int(self.params + self.grads + self.optimizer + self.gathered_layer)


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3 gathers at once."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def model_states(n_params: int, stage: int, world: int, bf16: bool, largest_layer: int = 0) -> ModelStates:
    """Bytes of model states on one of `world` ranks (see the module docstring)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    half = 2 if bf16 else 4  # bytes of the working parameters and gradients
    opt = 16 if bf16 else 8  # fp32 master + fp32 grads + m + v, or m + v

    def part(nbytes: int, from_stage: int) -> Fraction:
        return Fraction(n_params * nbytes, world if stage >= from_stage else 1)

    layer = Fraction(4 * largest_layer if stage == 3 else 0)
    if stage == 3 and bf16:  # DeepSpeed's count: 18/N for everything but the gathered layer
        return ModelStates(params=part(2, 3), grads=Fraction(0), optimizer=part(16, 1), gathered_layer=layer)
    return ModelStates(params=part(half, 3), grads=part(half, 2), optimizer=part(opt, 1), gathered_layer=layer)
