"""The statistics of the paper's reports, from SciPy and scikit-learn (docs/method.md, "Statistics").

Thin adapters: each names the library call it makes and returns plain Python numbers (so results
serialise to JSON as they are).

- :func:`wilson_interval`: ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
- :func:`signed_rank_test`: ``scipy.stats.wilcoxon`` of paired samples, with its alternative.
- :func:`paired_cliffs_delta`: Cliff's delta over *paired* observations, ``P(x > y) - P(x < y)``
  over the pairs ``(x_i, y_i)`` (the paper's +0.825 = 2 * 0.9125 - 1).
- :func:`bootstrap_ci`, :func:`cluster_bootstrap_ci`: ``scipy.stats.bootstrap`` percentile
  intervals; the cluster form resamples whole clusters (e.g. prompts) as paired (sum, count) data.
- :func:`median_mad`: the median and ``MAD / sqrt(n)`` (raw MAD, the paper's "median ± MAD").
- :func:`r_squared`: ``sklearn.metrics.r2_score``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import numpy as np
from scipy import stats
from sklearn.metrics import r2_score

Alternative = Literal["two-sided", "less", "greater"]


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes / n``; ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """``(median, MAD / sqrt(n))`` with the raw median absolute deviation (no 1.4826 factor)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    return float(np.median(x)), float(stats.median_abs_deviation(x)) / math.sqrt(x.size)


def signed_rank_test(
    x: Sequence[float], y: Sequence[float], alternative: Alternative = "two-sided"
) -> dict[str, float | int | str]:
    """Wilcoxon signed-rank test of the paired differences ``x - y`` (``scipy.stats.wilcoxon``,
    zero differences dropped). ``alternative="less"`` tests ``x < y`` (e.g. ``KL_atom < KL_delete``).

    Returns ``statistic`` (SciPy's: ``R+``, the rank sum of positive differences, for a one-sided
    test; ``min(R+, R-)`` for two-sided), ``p_value``, ``alternative``, ``method`` (``"exact"`` when
    at most 50 non-zero differences without ties, else ``"approx"``, the normal approximation) and
    ``n`` (non-zero differences).
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return dict(statistic=math.nan, p_value=math.nan, alternative=alternative, method="none", n=0)
    ties = np.unique(np.abs(d)).size < d.size
    method = "exact" if d.size <= 50 and not ties else "approx"
    res = stats.wilcoxon(d, alternative=alternative, method=method)
    return dict(statistic=float(res.statistic), p_value=float(res.pvalue), alternative=alternative, method=method,
                n=int(d.size))


def paired_cliffs_delta(x: Sequence[float], y: Sequence[float]) -> float:
    """``P(x_i > y_i) - P(x_i < y_i)`` over the pairs (ties count 0): the paired Cliff's delta.
    With ``x = KL_delete``, ``y = KL_atom`` it is ``2 P(atom < delete) - 1`` when nothing ties."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    return float(np.sign(d).mean()) if d.size else math.nan


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)`` (``scipy.stats.bootstrap``)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(statistic(x)), float(statistic(x)))
    res = stats.bootstrap((x,), lambda s, axis: statistic(s, axis=axis), n_resamples=n_resamples,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the pooled mean when whole clusters (e.g. prompts) are resampled:
    ``scipy.stats.bootstrap`` on the paired per-cluster ``(sum, count)`` with statistic
    ``sum(sums) / sum(counts)``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    index = {key: i for i, key in enumerate(dict.fromkeys(clusters))}
    cluster_of = np.array([index[c] for c in clusters])
    sums = np.bincount(cluster_of, weights=x)
    counts = np.bincount(cluster_of).astype(float)
    if sums.size == 1:
        mean = float(sums[0] / counts[0])
        return (mean, mean)
    res = stats.bootstrap((sums, counts), lambda s, c, axis: s.sum(axis=axis) / c.sum(axis=axis), paired=True,
                          vectorized=True, n_resamples=n_resamples, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def r_squared(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (``sklearn.metrics.r2_score``; negative
    when worse than the mean; nan for fewer than two points)."""
    y = np.asarray(measured, dtype=float)
    if y.size < 2:
        return math.nan
    return float(r2_score(y, np.asarray(predicted, dtype=float)))


__all__ = [
    "wilson_interval",
    "median_mad",
    "signed_rank_test",
    "paired_cliffs_delta",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "r_squared",
]
