"""The analysis statistics against SciPy (a test-only reference) and closed-form cases."""

import math

import numpy as np
import pytest

from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cliffs_delta,
    cluster_bootstrap_ci,
    compare_gmm_bic,
    fit_gmm_1d,
    median_mad,
    r_squared,
    wilcoxon_signed_rank,
    wilson_interval,
)

stats = pytest.importorskip("scipy.stats")


def test_wilson_interval_matches_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (4482, 4851), (1, 1)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paper_headline_interval_is_reproduced():
    # 92.4% of n = 4,851 firings, Wilson 95% CI [91.6, 93.1] (paper section 3.2).
    lo, hi = wilson_interval(round(0.924 * 4851), 4851)
    assert round(100 * lo, 1) == 91.6 and round(100 * hi, 1) == 93.1


@pytest.mark.parametrize("n", [5, 12, 30, 50])
def test_wilcoxon_exact_matches_scipy(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(0.3, size=n)
    ours = wilcoxon_signed_rank(x, y)
    ref = stats.wilcoxon(x, y, method="exact")
    assert ours["method"] == "exact"
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)


@pytest.mark.parametrize("n,ties", [(51, False), (400, False), (300, True)])
def test_wilcoxon_asymptotic_matches_scipy(n, ties):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(0.1, size=n)
    if ties:  # rounded differences: ties among |d| and some exact zeros
        x, y = np.round(x, 1), np.round(y, 1)
    ours = wilcoxon_signed_rank(x, y)
    ref = stats.wilcoxon(x, y, method="asymptotic", correction=False, zero_method="wilcox")
    assert ours["method"] == "asymptotic"
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)


def test_wilcoxon_tiny_p_values_do_not_underflow_early():
    rng = np.random.default_rng(0)
    x = rng.normal(size=3000)
    out = wilcoxon_signed_rank(x + 1.0, x)
    assert 0 < out["p_value"] < 1e-200 or out["p_value"] == 0.0
    assert out["z"] > 0


def test_cliffs_delta_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 33).astype(float)
    brute = np.sign(x[:, None] - y[None, :]).mean()
    assert cliffs_delta(x, y) == pytest.approx(brute)
    assert cliffs_delta([2, 3], [0, 1]) == 1.0 and cliffs_delta([0], [1]) == -1.0


def test_median_mad_and_r_squared():
    med, se = median_mad([1, 2, 3, 4, 100])
    assert med == 3 and se == pytest.approx(1 / math.sqrt(5))
    y = np.array([1.0, 2.0, 3.0])
    assert r_squared(y, y) == 1.0
    assert r_squared(y, np.full(3, 2.0)) == pytest.approx(0.0)
    assert r_squared(y, -y) < 0
    ref = stats.linregress(y, [1.1, 1.9, 3.2])
    fitted = ref.intercept + ref.slope * y
    assert r_squared([1.1, 1.9, 3.2], fitted) == pytest.approx(ref.rvalue**2)


def test_bootstrap_intervals_cover_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, size=200)
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo < x.mean() < hi
    clusters = np.repeat(np.arange(20), 10)
    lo_c, hi_c = cluster_bootstrap_ci(x, clusters, seed=1)
    assert lo_c < x.mean() < hi_c


def test_gmm_recovers_two_components_and_bic_prefers_them():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 0.01, 300), rng.normal(0.3, 0.05, 100)])
    fit = compare_gmm_bic(x)
    assert fit["delta_bic"] < -50
    two = fit["two"]
    assert two["means"][0] == pytest.approx(0.0, abs=0.005) and two["means"][1] == pytest.approx(0.3, abs=0.02)
    assert two["weights"][1] == pytest.approx(0.25, abs=0.03)
    # One Gaussian: the 1-component fit is the maximum-likelihood normal, and BIC does not want 2.
    y = rng.normal(size=400)
    one = fit_gmm_1d(y, 1)
    assert one["means"][0] == pytest.approx(y.mean()) and one["variances"][0] == pytest.approx(y.var())
    assert one["log_likelihood"] == pytest.approx(stats.norm(y.mean(), y.std()).logpdf(y).sum())
    assert compare_gmm_bic(y)["delta_bic"] > 0
