"""Small-sample statistics for seed studies: Student-t intervals and paired tests (`scipy.stats`).

A comparison of two models trained with the same seeds is *paired*: the seed fixes the initialisation and the
data order of both, so the per-seed difference d_s = a_s - b_s removes the seed-to-seed variation they share.
For n seeds with mean difference d and sample standard deviation s_d:

- 95% confidence interval: d +- t_{0.975, n-1} * s_d / sqrt(n) (`scipy.stats.t.ppf`);
- paired t-test: t = d / (s_d / sqrt(n)), two-sided p (`scipy.stats.ttest_rel`);
- exact sign-flip (permutation) test: under "no difference" each d_s is as likely to be -d_s, so p is the
  fraction of the 2^n sign patterns whose |mean| is at least the observed |mean| (no normality assumed;
  `scipy.stats.permutation_test` with ``permutation_type="samples"``, which flips signs for one sample, over
  all 2^n patterns).

A difference is *called* only when its 95% interval excludes zero.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

MAX_SIGN_FLIP_SEEDS = 16  # the exact test enumerates 2^n sign patterns


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
    return Summary(n, mean, sd, float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n))


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
    """Exact two-sided sign-flip p-value of the mean of `diffs` (all 2^n patterns; n <= 16)."""
    n = len(diffs)
    if n == 0:
        return math.nan
    if n == 1:  # both patterns have the observed |mean|
        return 1.0
    if n > MAX_SIGN_FLIP_SEEDS:
        raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; use at most {MAX_SIGN_FLIP_SEEDS} seeds")
    res = sps.permutation_test((np.asarray(diffs, dtype=np.float64),), np.mean, permutation_type="samples",
                               vectorized=True, n_resamples=2 ** n, alternative="two-sided")
    return float(res.pvalue)


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Compare per-seed values a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    sm = summarize(d)
    if sm.n < 2:
        return Paired(sm, math.nan, math.nan, sign_flip_p(d))
    if sm.sd == 0:  # a constant difference: the t statistic is infinite (or 0 / 0 when there is none)
        t = math.copysign(math.inf, sm.mean) if sm.mean != 0 else 0.0
        p = 0.0 if sm.mean != 0 else 1.0
    else:
        with warnings.catch_warnings():  # a near-constant difference: p is ~0 either way (3 decimals are shown)
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            res = sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        t, p = float(res.statistic), float(res.pvalue)
    return Paired(sm, t, p, sign_flip_p(d))


__all__ = ["MAX_SIGN_FLIP_SEEDS", "Paired", "Summary", "paired", "sign_flip_p", "summarize"]
