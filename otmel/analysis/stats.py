"""Small-sample statistics for seed studies: Student-t intervals and paired tests (plain Python, no SciPy).

A comparison of two models trained with the same seeds is *paired*: the seed fixes the initialisation and the
data order of both, so the per-seed difference d_s = a_s - b_s removes the seed-to-seed variation they share.
For n seeds with mean difference d and sample standard deviation s_d:

- 95% confidence interval: d +- t_{0.975, n-1} * s_d / sqrt(n);
- paired t-test: t = d / (s_d / sqrt(n)), two-sided p = 2 * (1 - F_t(|t|; n - 1));
- exact sign-flip (permutation) test: under "no difference" each d_s is as likely to be -d_s, so p is the
  fraction of the 2^n sign patterns whose |mean| is at least the observed |mean| (no normality assumed).

A difference is *called* only when its 95% interval excludes zero. The t CDF is integrated numerically
(composite Simpson rule on the density, accurate to ~1e-9 for the degrees of freedom used here) and inverted
by bisection.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass


def t_pdf(x: float, df: int) -> float:
    """Density of Student's t with `df` degrees of freedom."""
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """P(T <= x) for Student's t (Simpson's rule from 0 to |x|, by symmetry)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    a = abs(x)
    if a == 0:
        return 0.5
    h = a / steps
    s = t_pdf(0.0, df) + t_pdf(a, df)
    s += 4 * sum(t_pdf((2 * k - 1) * h, df) for k in range(1, steps // 2 + 1))
    s += 2 * sum(t_pdf(2 * k * h, df) for k in range(1, steps // 2))
    half = min(0.5, s * h / 3)
    return 0.5 + half if x > 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on `t_cdf`)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and the 95% t-interval half-width of n values (nan where undefined)."""

    n: int
    mean: float
    sd: float
    ci95: float

    @property
    def lo(self) -> float:
        return self.mean - self.ci95

    @property
    def hi(self) -> float:
        return self.mean + self.ci95


def summarize(xs: list[float]) -> Summary:
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(xs)
    if n == 1:
        return Summary(1, mean, math.nan, math.nan)
    sd = statistics.stdev(xs)
    return Summary(n, mean, sd, t_quantile(0.975, n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """A paired comparison a - b over common seeds."""

    diff: Summary
    t: float
    p_t: float
    p_sign: float

    @property
    def called(self) -> str:
        """">" / "<" when the 95% interval of the difference excludes zero, else "≈" (or "?" with < 2 seeds)."""
        d = self.diff
        if d.n < 2 or math.isnan(d.ci95):
            return "?"
        if d.lo > 0:
            return ">"
        if d.hi < 0:
            return "<"
        return "≈"


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip p-value of the mean of `diffs` (2^n patterns; n <= 16)."""
    n = len(diffs)
    if n == 0:
        return math.nan
    if n > 16:
        raise ValueError("the exact sign-flip test enumerates 2^n patterns; use at most 16 seeds")
    obs = abs(sum(diffs)) - 1e-12
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= obs
               for signs in itertools.product((1, -1), repeat=n))
    return hits / 2 ** n


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Compare per-seed values a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    sm = summarize(d)
    if sm.n < 2:
        return Paired(sm, math.nan, math.nan, sign_flip_p(d))
    if sm.sd == 0:
        t = math.inf if sm.mean != 0 else 0.0
        p = 0.0 if sm.mean != 0 else 1.0
    else:
        t = sm.mean / (sm.sd / math.sqrt(sm.n))
        p = 2 * (1 - t_cdf(abs(t), sm.n - 1))
    return Paired(sm, t, p, sign_flip_p(d))


__all__ = ["Paired", "Summary", "paired", "sign_flip_p", "summarize", "t_cdf", "t_pdf", "t_quantile"]
