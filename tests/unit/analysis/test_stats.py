"""The report statistics: the paper's worked values, and SciPy's own calls recomputed by hand-free
references (the adapters must pass the right arguments: alternative, pairing, clusters)."""

import math

import numpy as np
import pytest
from scipy import stats

from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cluster_bootstrap_ci,
    median_mad,
    paired_cliffs_delta,
    r_squared,
    signed_rank_test,
    wilson_interval,
)


def test_paper_headline_interval_is_reproduced():
    # 92.4% of n = 4,851 firings, Wilson 95% CI [91.6, 93.1] (paper section 3.2).
    lo, hi = wilson_interval(round(0.924 * 4851), 4851)
    assert round(100 * lo, 1) == 91.6 and round(100 * hi, 1) == 93.1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paired_cliffs_delta_is_the_papers_worked_value():
    """AUDIT item 2: the paper's +0.825 is 2 * 0.9125 - 1 over paired prompts. The unpaired
    (all-pairs) Cliff's delta of the same samples is a different number."""
    rng = np.random.default_rng(0)
    atom = rng.exponential(size=800)
    delete = atom.copy()
    wins = np.zeros(800, dtype=bool)
    wins[:730] = True  # 730 / 800 = 0.9125
    delete[wins] = atom[wins] * rng.uniform(1.5, 3, size=730)
    delete[~wins] = atom[~wins] * rng.uniform(0.2, 0.7, size=70)
    assert paired_cliffs_delta(delete, atom) == pytest.approx(0.825)
    unpaired = np.sign(delete[:, None] - atom[None, :]).mean()
    assert abs(unpaired - 0.825) > 0.1


def test_signed_rank_test_is_one_sided_and_directional():
    """AUDIT item 3: the one-sided test of x < y; its p is small when x < y and large otherwise."""
    rng = np.random.default_rng(1)
    y = rng.exponential(size=200)
    x = y * rng.uniform(0.3, 1.05, size=200)
    less = signed_rank_test(x, y, alternative="less")
    assert less["alternative"] == "less" and less["p_value"] < 1e-10
    assert signed_rank_test(x, y, alternative="greater")["p_value"] > 0.99
    d = x - y
    # R+ (rank sum of positive differences) is SciPy's statistic for a one-sided test.
    ranks = stats.rankdata(np.abs(d))
    assert less["statistic"] == pytest.approx(ranks[d > 0].sum())
    assert less["method"] == "approx" and less["n"] == 200
    small = signed_rank_test(x[:20], y[:20], alternative="less")
    assert small["method"] == "exact"
    assert small["p_value"] == pytest.approx(stats.wilcoxon(x[:20], y[:20], alternative="less", method="exact").pvalue)


def test_cluster_bootstrap_resamples_whole_clusters():
    """Two clusters that disagree completely: the cluster interval spans both cluster means, the
    plain bootstrap of the pooled mean is much narrower."""
    values = np.r_[np.ones(50), np.zeros(50)]
    clusters = [0] * 50 + [1] * 50
    lo, hi = cluster_bootstrap_ci(values, clusters, seed=0)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    plain = bootstrap_ci(values, seed=0)
    assert plain[1] - plain[0] < 0.3
    assert cluster_bootstrap_ci([1.0, 0.0], ["a", "a"]) == (0.5, 0.5)


def test_median_mad_and_r_squared():
    assert median_mad([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx((3.0, 1.0 / math.sqrt(5)))
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert r_squared(y, y) == 1.0 and r_squared(y, np.full(4, y.mean())) == pytest.approx(0.0)
    assert r_squared(y, -y) < 0 and math.isnan(r_squared([1.0], [1.0]))
