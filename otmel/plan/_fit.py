"""From a few measured steps to any batch and pool: the linear cost models of one training step.

A step of `b` mentions per worker, a pool of `P` entity columns and the matcher chunked over `c` entities:

    activations(b, P, c) = m0 + a * rows + p * b * P + t * b * c        (bytes, on top of the model states)
    flops(b, P)          = f0 + f_row * rows + f_pair * b * P           (matmul FLOPs, forward + backward)
    traffic(b, P)        = g0 + g_row * rows + g_pair * b * P           (bytes of the other operators)

with `rows = 2 b` samples through the towers (mentions and their gold entities; hard negatives add entity rows).
`a` is what the towers keep per sample for backward; `p` what the matcher keeps per (mention, entity) pair (its
(Bm, c) score blocks, the chunk inputs a recomputation needs); `t` its working set per pair of the chunk being
computed or recomputed (the plans, Le x Lm per pair, Sinkhorn's iterates), so the matcher's peak grows with
`b * c`, not `b * P`, under `model.match_checkpoint`. The probes (`PROBES`) vary `b`, `P` and `c` so that each
coefficient is determined: memory is a deterministic function of the shapes, so four probes solve the four
coefficients exactly and a fifth checks them (`otmel plan --check-batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from otmel.plan._step import Probe

# (b, P, c), chosen before any measurement: each difference moves one term (probe 2 - 1: rows, with pairs and chunk
# pairs in proportion; 3 - 1: pairs alone, over 112 of them; 4 - 3: chunk pairs alone, over 48), so the four memory
# coefficients are identifiable, and the pair terms are measured over enough pairs to stand well above the few
# hundred KB by which a step's peak moves between runs. The pool costs no tower compute (gathered features), so a
# pool of 64 is cheap; the towers, the expensive part, see at most 8 samples.
PROBES: tuple[tuple[int, int, int], ...] = ((2, 8, 8), (4, 8, 8), (2, 64, 8), (2, 64, 32))


@dataclass(frozen=True)
class StepModel:
    """The fitted coefficients (see the module docstring)."""

    m0: float
    per_row: float  # bytes per tower sample
    per_pair: float  # bytes kept per (mention, entity) pair
    per_chunk_pair: float  # working bytes per (mention, chunk entity) pair
    f0: float
    flops_per_row: float
    flops_per_pair: float
    g0: float
    bytes_per_row: float
    bytes_per_pair: float

    def activations(self, b: int, P: int, c: int, rows: int | None = None) -> float:
        rows = 2 * b if rows is None else rows
        return self.m0 + self.per_row * rows + self.per_pair * b * P + self.per_chunk_pair * b * min(c, P)

    def towers(self, rows: int) -> float:
        return self.per_row * rows

    def matcher(self, b: int, P: int, c: int) -> float:
        return self.per_pair * b * P + self.per_chunk_pair * b * min(c, P)

    def flops(self, b: int, P: int, rows: int | None = None) -> float:
        rows = 2 * b if rows is None else rows
        return self.f0 + self.flops_per_row * rows + self.flops_per_pair * b * P

    def traffic(self, b: int, P: int, rows: int | None = None) -> float:
        rows = 2 * b if rows is None else rows
        return self.g0 + self.bytes_per_row * rows + self.bytes_per_pair * b * P


def fit(probes: Sequence[Probe]) -> StepModel:
    """Least squares over the probes (exact for `PROBES`); negative coefficients (noise) are clipped to 0."""
    if len(probes) < 4:
        raise ValueError(f"the step model needs 4 probes, got {len(probes)}")
    X = np.array([[1.0, p.rows, p.b * p.P, p.b * min(p.c, p.P)] for p in probes])
    y = np.array([float(p.peak_bytes) for p in probes])
    mem = np.linalg.lstsq(X, y, rcond=None)[0]
    Xf = np.array([[1.0, p.rows, p.b * p.P] for p in probes])
    f0, fr, fp = (float(v) for v in np.linalg.lstsq(Xf, np.array([float(p.flops) for p in probes]), rcond=None)[0])
    g0, gr, gp = (float(v) for v in np.linalg.lstsq(Xf, np.array([float(p.traffic) for p in probes]), rcond=None)[0])
    m0, a, pp, t = (float(v) for v in mem)
    return StepModel(m0=m0, per_row=max(a, 0.0), per_pair=max(pp, 0.0), per_chunk_pair=max(t, 0.0),
                     f0=f0, flops_per_row=max(fr, 0.0), flops_per_pair=max(fp, 0.0),
                     g0=g0, bytes_per_row=max(gr, 0.0), bytes_per_pair=max(gp, 0.0))
