"""Small, dependency-free statistics used by the paper's reports (numpy only).

Every function takes plain sequences or numpy arrays and returns plain Python numbers or
dictionaries, so results serialise to JSON as they are. The tests check them against SciPy
(``scipy`` is a test-only reference, never imported here).

- :func:`wilson_interval`: score interval of a binomial proportion (the paper's "Wilson 95% CI").
- :func:`median_mad`: median and ``MAD / sqrt(n)`` (raw, unscaled median absolute deviation).
- :func:`wilcoxon_signed_rank`: paired two-sided test; exact null distribution for ``n <= 50``
  without ties or zero differences, else the normal approximation with tie correction and no
  continuity correction (SciPy's ``method="exact"`` / ``"asymptotic"``, ``zero_method="wilcox"``).
- :func:`cliffs_delta`: ``P(x > y) - P(x < y)`` over all pairs, in ``O(n log n)``.
- :func:`bootstrap_ci`, :func:`cluster_bootstrap_ci`: percentile bootstrap intervals.
- :func:`r_squared`: ``1 - SS_res / SS_tot`` (can be negative).
- :func:`fit_gmm_1d`, :func:`compare_gmm_bic`: 1-D Gaussian mixtures by EM and their BIC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

_Z975 = 1.959963984540054  # standard normal 97.5% quantile


def _normal_quantile(level: float) -> float:
    """Two-sided standard-normal critical value for a ``level`` interval (0.95 -> 1.96)."""
    if abs(level - 0.95) < 1e-12:
        return _Z975
    # Acklam-free route: invert erf by bisection (only used for unusual levels).
    target = 0.5 + level / 2
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes / n``; ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return (math.nan, math.nan)
    z = _normal_quantile(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """``(median, MAD / sqrt(n))`` with the raw median absolute deviation (no 1.4826 factor)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    return med, mad / math.sqrt(x.size)


def rankdata(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) and the sizes of the tie groups."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    boundaries = np.flatnonzero(np.diff(sorted_x) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [x.size]])
    ranks = np.empty(x.size, dtype=float)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks, (ends - starts)


def _exact_signed_rank_cdf(n: int) -> np.ndarray:
    """``P(R+ <= s)`` for s = 0..n(n+1)/2 under H0 (no ties): subset-sum counts of {1..n}."""
    top = n * (n + 1) // 2
    counts = [0] * (top + 1)
    counts[0] = 1
    for k in range(1, n + 1):
        for s in range(top, k - 1, -1):
            counts[s] += counts[s - k]
    total = 2**n
    return np.cumsum(np.array(counts, dtype=object)) / total


def wilcoxon_signed_rank(
    x: Sequence[float], y: Sequence[float] | None = None, method: str = "auto"
) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of the paired differences ``x - y`` (or of ``x``).

    Zero differences are dropped (``zero_method="wilcox"``). ``method``: ``"exact"`` (needs no
    ties among ``|d|``), ``"asymptotic"``, or ``"auto"`` (exact when ``n <= 50`` and there are no
    ties or zeros, else asymptotic). Returns ``statistic`` (``min(R+, R-)``), ``p_value``, ``z``
    (asymptotic only, signed so that ``z > 0`` means ``x > y``), ``n`` (non-zero differences),
    ``r_plus``, ``r_minus`` and the ``method`` used.
    """
    d = np.asarray(x, dtype=float) - (0.0 if y is None else np.asarray(y, dtype=float))
    n_zero = int(np.count_nonzero(d == 0))
    d = d[d != 0]
    n = d.size
    if n == 0:
        return dict(statistic=math.nan, p_value=math.nan, z=math.nan, n=0, r_plus=0.0, r_minus=0.0, method="none")
    ranks, ties = rankdata(np.abs(d))
    r_plus = float(ranks[d > 0].sum())
    r_minus = float(ranks[d < 0].sum())
    has_ties = bool((ties > 1).any())
    if method == "auto":
        method = "exact" if (n <= 50 and not has_ties and n_zero == 0) else "asymptotic"
    statistic = min(r_plus, r_minus)
    if method == "exact":
        if has_ties:
            raise ValueError("The exact signed-rank distribution assumes no ties; use method='asymptotic'.")
        cdf = _exact_signed_rank_cdf(n)
        p = float(min(1.0, 2 * cdf[int(round(statistic))]))
        return dict(statistic=statistic, p_value=p, z=math.nan, n=n, r_plus=r_plus, r_minus=r_minus, method="exact")
    if method != "asymptotic":
        raise ValueError(f"method must be 'auto', 'exact' or 'asymptotic', not {method!r}.")
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - float((ties**3 - ties).sum()) / 48
    z = (r_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2))
    return dict(statistic=statistic, p_value=p, z=z, n=n, r_plus=r_plus, r_minus=r_minus, method="asymptotic")


def cliffs_delta(x: Sequence[float], y: Sequence[float]) -> float:
    """Cliff's delta ``P(X > Y) - P(X < Y)`` over all ``len(x) * len(y)`` pairs (ties count 0)."""
    xs = np.asarray(x, dtype=float)
    ys = np.sort(np.asarray(y, dtype=float))
    if xs.size == 0 or ys.size == 0:
        return math.nan
    less = np.searchsorted(ys, xs, side="left")  # ys strictly below each x
    less_equal = np.searchsorted(ys, xs, side="right")
    greater = ys.size - less_equal  # ys strictly above each x
    return float((less.sum() - greater.sum()) / (xs.size * ys.size))


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    if statistic is np.mean:
        stats = x[idx].mean(axis=1)
    elif statistic is np.median:
        stats = np.median(x[idx], axis=1)
    else:
        stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the pooled mean when whole clusters (e.g. atoms) are resampled."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    keys = list(dict.fromkeys(clusters))
    index = {key: i for i, key in enumerate(keys)}
    cluster_of = np.array([index[c] for c in clusters])
    sums = np.bincount(cluster_of, weights=x, minlength=len(keys))
    counts = np.bincount(cluster_of, minlength=len(keys)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n_resamples, len(keys)))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def r_squared(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (negative when worse than the mean)."""
    y = np.asarray(measured, dtype=float)
    f = np.asarray(predicted, dtype=float)
    if y.size == 0:
        return math.nan
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - f) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else -math.inf
    return 1.0 - ss_res / ss_tot


# ---------------------------------------------------------------- 1-D Gaussian mixtures
def _log_normal_pdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * math.pi * var) + (x[:, None] - mean) ** 2 / var)


def fit_gmm_1d(
    values: Sequence[float],
    n_components: int,
    n_init: int = 10,
    max_iter: int = 500,
    tol: float = 1e-10,
    min_var: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a ``n_components`` 1-D Gaussian mixture by EM (best of ``n_init`` starts).

    Starts: quantile-spread means first, then random data points. ``min_var`` floors each
    variance (default ``1e-6 * var(x)``) so a component cannot collapse onto one point.
    Returns ``weights``, ``means``, ``variances`` (components sorted by mean), ``log_likelihood``,
    ``bic`` (``-2 logL + p ln n`` with ``p = 3k - 1`` free parameters), ``n`` and
    ``responsibilities`` (``[n, k]``, as a numpy array).
    """
    x = np.asarray(values, dtype=float)
    n, k = x.size, n_components
    if n < k:
        raise ValueError(f"Need at least {k} values to fit {k} components, got {n}.")
    total_var = float(x.var()) if n > 1 else 1.0
    floor = min_var if min_var is not None else max(1e-6 * total_var, 1e-300)
    rng = np.random.default_rng(seed)
    best: dict[str, Any] | None = None
    for start in range(n_init):
        if start == 0:
            means = np.quantile(x, (np.arange(k) + 0.5) / k)
        else:
            means = rng.choice(x, size=k, replace=False)
        variances = np.full(k, max(total_var, floor))
        weights = np.full(k, 1.0 / k)
        previous = -math.inf
        for _ in range(max_iter):
            log_joint = _log_normal_pdf(x, means, variances) + np.log(weights)
            log_norm = np.logaddexp.reduce(log_joint, axis=1)
            log_likelihood = float(log_norm.sum())
            resp = np.exp(log_joint - log_norm[:, None])
            mass = resp.sum(axis=0) + 1e-300
            weights = mass / n
            means = (resp * x[:, None]).sum(axis=0) / mass
            variances = np.maximum((resp * (x[:, None] - means) ** 2).sum(axis=0) / mass, floor)
            if log_likelihood - previous < tol * max(1.0, abs(log_likelihood)):
                break
            previous = log_likelihood
        log_joint = _log_normal_pdf(x, means, variances) + np.log(weights)
        log_norm = np.logaddexp.reduce(log_joint, axis=1)
        log_likelihood = float(log_norm.sum())
        if best is None or log_likelihood > best["log_likelihood"]:
            order = np.argsort(means)
            best = dict(
                weights=weights[order].tolist(),
                means=means[order].tolist(),
                variances=variances[order].tolist(),
                log_likelihood=log_likelihood,
                responsibilities=np.exp(log_joint - log_norm[:, None])[:, order],
            )
    assert best is not None
    n_params = 3 * k - 1
    best["bic"] = -2 * best["log_likelihood"] + n_params * math.log(n)
    best["n"] = n
    return best


def compare_gmm_bic(values: Sequence[float], seed: int = 0, n_init: int = 10) -> dict[str, Any]:
    """Two-component vs one-component mixture: ``delta_bic = BIC(2) - BIC(1)`` (< 0 favours 2)."""
    one = fit_gmm_1d(values, 1, n_init=1, seed=seed)
    two = fit_gmm_1d(values, 2, n_init=n_init, seed=seed)
    return dict(one=one, two=two, delta_bic=two["bic"] - one["bic"])


__all__ = [
    "wilson_interval",
    "median_mad",
    "rankdata",
    "wilcoxon_signed_rank",
    "cliffs_delta",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "r_squared",
    "fit_gmm_1d",
    "compare_gmm_bic",
]
