"""Benchmark ``otmel.ot.sinkhorn`` against POT's per-plan loop and a row softmax, in one run.

Run: ``.venv/bin/python bench/sinkhorn.py`` (threads: ``OTMEL_BENCH_THREADS``, default 2).

Workload: B = 256 plans of 40 x 50, float32 costs uniform in [0, 1) (the range of ``cosine_cost``),
reg 0.05. All candidates are timed interleaved (round-robin, so load drift hits all alike), after
warm-up; each figure is the median over the rounds.

- ours: ``sinkhorn`` (float32) at 3 and 50 iterations, in its default ``method="auto"`` (kernel
  path here) and forced ``method="log"``; plus, as the scheme it replaces, an explicit logsumexp
  update of the potentials f, g.
- POT: ``ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", numItermax=k, stopThr=0)`` called in a
  Python loop over the 256 plans, on float64 numpy (POT's usual dtype) and on float32 numpy; the
  speed-up is taken against the faster of the two.
- softmax: ``torch.softmax(-cost / reg, -1)`` on the same (256, 40, 50) float32 tensor (what an
  attention-style assignment costs).
- masked: the same with masks like the model's (text lengths 5..40, 10% of images missing).
- forward + backward: ``(plan * w).sum().backward()`` w.r.t. the cost, ours vs softmax.

Everything is measured twice: with glibc's default allocator settings, whose trimming returns freed
2 MB blocks to the OS so that later allocations page-fault (it slows every eager op here, softmax
included, by up to ~5x, depending on the heap's history), and then with trimming switched off via
``mallopt`` (steady state). Ratios within one phase are side by side in the same run.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from otmel.ot import sinkhorn  # noqa: E402

B, N, M, REG = 256, 40, 50, 0.05


def naive_logsumexp(cost: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Textbook log-domain Sinkhorn: explicit logsumexp updates of the potentials (the replaced scheme)."""
    mr = cost * (-1.0 / REG)
    n, m = cost.shape[-2:]
    f = cost.new_zeros(cost.shape[:-1])
    g = cost.new_zeros(cost.shape[:-2] + (m,))
    for _ in range(n_iters):
        g = -math.log(m) - torch.logsumexp(mr + f.unsqueeze(-1), dim=-2)
        f = -math.log(n) - torch.logsumexp(mr + g.unsqueeze(-2), dim=-1)
    return torch.exp(mr + f.unsqueeze(-1) + g.unsqueeze(-2))


def pot_loop(costs: np.ndarray, n_iters: int) -> list[np.ndarray]:
    a = np.full(N, 1.0 / N, dtype=costs.dtype)
    b = np.full(M, 1.0 / M, dtype=costs.dtype)
    return [
        ot.sinkhorn(a, b, c, REG, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0, warn=False) for c in costs
    ]


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], cost: torch.Tensor, w: torch.Tensor) -> None:
    x = cost.detach().requires_grad_(True)
    (fn(x) * w).sum().backward()


def bench(cases: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, float]:
    """Median seconds per call; cases: name -> (fn, calls per round). Interleaved round-robin."""
    for fn, reps in cases.values():  # warm-up: as many calls as one round (>= 1)
        for _ in range(reps):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (fn, reps) in cases.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def set_malloc_trim_off() -> bool:
    """Switch off glibc's heap trimming / mmap of large blocks (steady-state allocator)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok1 = libc.mallopt(m_trim_threshold, 1 << 30)
    ok2 = libc.mallopt(m_mmap_threshold, 1 << 28)
    return bool(ok1 and ok2)


def run_phase(title: str, cost: torch.Tensor, w: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> None:
    cost64 = cost.double().numpy()
    cost32 = cost.numpy()
    ms = 1e3
    # ours: auto picks the kernel path here (cost range 1 / reg = 20 <= 30); checked below
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "ours auto  3 it": (lambda: sinkhorn(cost, reg=REG, n_iters=3), 10),
        "ours log   3 it": (lambda: sinkhorn(cost, reg=REG, n_iters=3, method="log"), 10),
        "ours auto  3 it masked": (lambda: sinkhorn(cost, mx, my, reg=REG, n_iters=3), 10),
        "ours log   3 it masked": (lambda: sinkhorn(cost, mx, my, reg=REG, n_iters=3, method="log"), 10),
        "ours auto 50 it": (lambda: sinkhorn(cost, reg=REG, n_iters=50), 3),
        "ours log  50 it": (lambda: sinkhorn(cost, reg=REG, n_iters=50, method="log"), 3),
        "naive lse  3 it": (lambda: naive_logsumexp(cost, 3), 3),
        "softmax": (lambda: torch.softmax(-cost / REG, -1), 10),
        "POT f64    3 it": (lambda: pot_loop(cost64, 3), 1),
        "POT f32    3 it": (lambda: pot_loop(cost32, 3), 1),
        "POT f64   50 it": (lambda: pot_loop(cost64, 50), 1),
        "POT f32   50 it": (lambda: pot_loop(cost32, 50), 1),
        "fwd+bwd ours auto 3 it": (lambda: fwd_bwd(lambda x: sinkhorn(x, reg=REG, n_iters=3), cost, w), 5),
        "fwd+bwd ours log  3 it": (
            lambda: fwd_bwd(lambda x: sinkhorn(x, reg=REG, n_iters=3, method="log"), cost, w),
            5,
        ),
        "fwd+bwd softmax": (lambda: fwd_bwd(lambda x: torch.softmax(-x / REG, -1), cost, w), 5),
    }
    t = bench(cases, rounds=5)
    print(f"\n== {title} ==")
    print(f"{'case':28s} {'median ms':>10s}")
    for name, sec in t.items():
        print(f"{name:28s} {sec * ms:10.3f}")

    def ratio(num: str, den: str) -> float:
        return t[num] / t[den]

    pot3 = min(t["POT f64    3 it"], t["POT f32    3 it"])
    pot50 = min(t["POT f64   50 it"], t["POT f32   50 it"])
    print("ratios (same run, same phase):")
    s3 = pot3 / t["ours auto  3 it"]
    s50 = pot50 / t["ours auto 50 it"]
    log3, log50 = pot3 / t["ours log   3 it"], pot50 / t["ours log  50 it"]
    print(f"  speed-up vs POT loop,  3 it: auto {s3:7.1f}x   log {log3:7.1f}x  (target >= 30x)")
    print(f"  speed-up vs POT loop, 50 it: auto {s50:7.1f}x   log {log50:7.1f}x  (target >= 30x)")
    r3 = ratio("ours auto  3 it", "softmax")
    print(
        f"  vs softmax, 3 it:            auto {r3:7.2f}x   log {ratio('ours log   3 it', 'softmax'):7.2f}x"
        "  (target <= 3x)"
    )
    print(
        f"  masked vs (unmasked) softmax, 3 it: auto {ratio('ours auto  3 it masked', 'softmax'):.2f}x"
        f"   log {ratio('ours log   3 it masked', 'softmax'):.2f}x"
    )
    print(f"  naive logsumexp loop vs softmax, 3 it: {ratio('naive lse  3 it', 'softmax'):.2f}x")
    print(
        f"  fwd+bwd vs softmax fwd+bwd, 3 it: auto {ratio('fwd+bwd ours auto 3 it', 'fwd+bwd softmax'):.2f}x"
        f"   log {ratio('fwd+bwd ours log  3 it', 'fwd+bwd softmax'):.2f}x"
    )
    met = s3 >= 30 and s50 >= 30 and r3 <= 3
    print(f"  targets met (auto): {'yes' if met else 'NO'}")


def main() -> None:
    threads = int(os.environ.get("OTMEL_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    print(
        f"torch {torch.__version__}, POT {ot.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    print(
        f"torch.set_num_threads({threads}) -> torch.get_num_threads() = {torch.get_num_threads()}; "
        f"os.cpu_count() = {os.cpu_count()}; load average at start = {os.getloadavg()}"
    )
    print(f"workload: B={B} plans of {N}x{M}, float32 costs ~ U[0,1), reg={REG}")

    torch.manual_seed(0)
    cost = torch.rand(B, N, M)
    w = torch.rand(B, N, M)
    _, info = sinkhorn(cost, reg=REG, n_iters=3, return_info=True)
    print(f"method='auto' ran the {info['method']!r} path on this workload")
    # correctness against POT (float64) at equal iteration counts
    c64 = cost.double()
    for k in (3, 50):
        ref = np.stack(pot_loop(c64[:8].numpy(), k))
        for meth in ("auto", "log"):
            ours = sinkhorn(c64[:8], reg=REG, n_iters=k, method=meth).numpy()
            print(f"max |ours({meth}, f64) - POT| at {k} it over 8 plans: {np.abs(ours - ref).max():.2e}")

    # masks like the model's: text lengths 5..40, 10% of images missing (all 50 patches masked)
    mx = torch.arange(N) < torch.randint(5, N + 1, (B, 1))
    my = (torch.rand(B, 1) > 0.1).expand(B, M)
    run_phase("phase 1: glibc malloc defaults", cost, w, mx, my)
    trimmed = set_malloc_trim_off()
    run_phase(f"phase 2: mallopt trim/mmap thresholds raised ({'ok' if trimmed else 'FAILED'})", cost, w, mx, my)
    print(f"\nload average at end = {os.getloadavg()}")


if __name__ == "__main__":
    main()
