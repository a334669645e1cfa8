"""A run whose world can change: the batch a worker takes at world size W, and the run's clock in samples.

Ray Train restarts every worker from the newest checkpoint when an elastic run grows or shrinks (or loses a node).
What a restarted worker must agree on with the run it continues is defined here, in *training samples*, so that a
run that resizes ends where a fixed-size run ends:

- the reference global batch `g_ref = train.batch_size * MAX` (MAX: `scaling.num_workers`, or its upper bound);
- one epoch is `E = steps_per_epoch(MAX) * g_ref` samples; epoch k ends at the first step after which the run has
  seen `(k + 1) * E` samples in all, so a run that resized ends at `epochs * E` samples, at most one global batch
  past it (a fixed-size run: exactly);
- the LR schedule (`WarmupCosineLR`: `warmup_steps`, decay to the end) runs on reference steps, `samples / g_ref`,
  and `train.checkpoint_every` counts reference steps from the start of the epoch; `train.eval_every` counts
  epochs.

At a fixed size every one of these is exactly what a step count gives, so a fixed-size run is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from otmel.runconfig import ScalingConfig


def worker_batch(scaling: ScalingConfig, batch_size: int, world_size: int) -> int:
    """The per-worker batch at `world_size` workers under `scaling.elastic_batch` (see ScalingConfig)."""
    if not scaling.elastic or scaling.elastic_batch == "per_worker":
        return batch_size
    batch = max(1, batch_size * scaling.max_workers // world_size)
    return min(batch, scaling.max_batch_per_worker) if scaling.max_batch_per_worker else batch


@dataclass(frozen=True)
class SampleClock:
    """The run's schedule in samples (module docstring). `reference_batch` = g_ref, `epoch_samples` = E."""

    reference_batch: int
    epoch_samples: int
    epochs: int

    @property
    def total_samples(self) -> int:
        return self.epochs * self.epoch_samples

    @property
    def reference_steps(self) -> int:
        """The run's length in reference steps: what the LR schedule decays over."""
        return self.total_samples // self.reference_batch

    def stream_steps(self, global_batch: int) -> int:
        """Batches an epoch's training stream must hold at a global batch of `global_batch`."""
        return math.ceil(self.epoch_samples / global_batch)

    def epoch_done(self, epoch: int, samples: int) -> bool:
        return samples >= (epoch + 1) * self.epoch_samples

    def lr_iteration(self, samples: float) -> float:
        """The scheduler's `last_batch_iteration` after `samples` samples: reference steps taken, minus one (the
        scheduler counts from -1); an integer at a fixed size."""
        return samples / self.reference_batch - 1

    def checkpoint_due(self, every: int, epoch: int, before: int, after: int) -> bool:
        """Whether a mid-epoch checkpoint falls between `before` and `after` samples of the run: every `every`
        reference steps counted from the start of `epoch`, never at its end (the epoch's own checkpoint follows)."""
        if not every or self.epoch_done(epoch, after):
            return False
        period, start = every * self.reference_batch, epoch * self.epoch_samples
        return (after - start) // period > (before - start) // period


__all__ = ["SampleClock", "worker_batch"]
