"""Group statistics against closed-form values, published examples and simulation."""

from __future__ import annotations

import numpy as np
import pytest

from bids_qmri.group import stats


def test_ccc_closed_form():
    # x = 1..4, y = x + 1: means 2.5/3.5, population variances 1.25, covariance 1.25
    # ccc = 2·1.25 / (1.25 + 1.25 + 1²) = 5/7
    assert stats.ccc([1, 2, 3, 4], [2, 3, 4, 5]) == pytest.approx(5 / 7, abs=1e-12)
    # y = 2x on 1..3: vx = 2/3, vy = 8/3, sxy = 4/3, (x̄ − ȳ)² = 4 -> ccc = (8/3)/(22/3) = 4/11
    assert stats.ccc([1, 2, 3], [2, 4, 6]) == pytest.approx(4 / 11, abs=1e-12)
    assert stats.ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert stats.ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_ccc_from_sums_equals_direct():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50)
    y = 0.8 * x + rng.normal(scale=0.3, size=50) + 0.2
    # One replicate that draws every cluster exactly once is the original sample.
    per = np.stack([np.ones(50), x, y, x * x, y * y, x * y], -1).sum(0)
    c, d = stats._ccc_from_sums(per)
    assert c == pytest.approx(stats.ccc(x, y), rel=1e-10)
    assert d == pytest.approx(np.mean(x - y), rel=1e-10)


def test_agreement_bland_altman_and_mean_difference():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 0.2, 60)
    y = x - 0.05 + rng.normal(0, 0.02, 60)
    cl = np.repeat(np.arange(6), 10)
    res = stats.agreement(x, y, cl, n_bootstrap=500, rng=np.random.default_rng(1))
    d = x - y
    assert res.mean_diff == pytest.approx(d.mean())
    assert res.sd_diff == pytest.approx(d.std(ddof=1))
    assert res.loa_low == pytest.approx(d.mean() - 1.96 * d.std(ddof=1))
    assert res.loa_high == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    assert res.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert res.n_obs == 60 and res.n_clusters == 6
    assert res.ccc_ci_low <= res.ccc <= res.ccc_ci_high
    assert res.mean_diff_ci_low <= res.mean_diff <= res.mean_diff_ci_high
    # Reproducible with the same seed.
    again = stats.agreement(x, y, cl, n_bootstrap=500, rng=np.random.default_rng(1))
    assert (again.ccc_ci_low, again.ccc_ci_high) == (res.ccc_ci_low, res.ccc_ci_high)


def test_agreement_single_participant_has_no_ci():
    x = np.linspace(1, 2, 10)
    res = stats.agreement(x, x + 0.1, np.zeros(10), n_bootstrap=100,
                          rng=np.random.default_rng(0))
    assert np.isnan(res.ccc_ci_low) and np.isnan(res.mean_diff_ci_high)
    assert np.isfinite(res.ccc)


def _cohort(rng, k, r, su, sv, sw, delta, sb):
    """k participants × r regions. x = u_k + v_kr; y = x + δ + b_k + w_kr.

    Population CCC = 2(σu² + σv²) / (2(σu² + σv²) + σb² + σw² + δ²): b_k is a participant-level
    disagreement shared by all regions of that participant (within-participant correlation).
    """
    u = rng.normal(0, su, (k, 1))
    b = rng.normal(0, sb, (k, 1))
    x = u + rng.normal(0, sv, (k, r))
    y = x + delta + b + rng.normal(0, sw, (k, r))
    return x.ravel(), y.ravel(), np.repeat(np.arange(k), r)


def _true_ccc(su, sv, sw, delta, sb):
    v = su**2 + sv**2
    return 2 * v / (2 * v + sb**2 + sw**2 + delta**2)


PARAMS = dict(su=1.0, sv=1.0, sw=0.5, delta=0.3, sb=0.5)


def _coverage(clustered: bool, n_cohorts=200, n_boot=1000, k=30, r=10, seed=20261121):
    rng = np.random.default_rng(seed)
    true = _true_ccc(**PARAMS)
    hits, widths = 0, []
    for _ in range(n_cohorts):
        x, y, cl = _cohort(rng, k, r, **PARAMS)
        groups = cl if clustered else np.arange(len(x))
        reps, _ = stats.cluster_bootstrap_replicates(x, y, groups, n_boot, rng)
        lo, hi = stats.percentile_ci(reps)
        hits += lo <= true <= hi
        widths.append(hi - lo)
    return hits / n_cohorts, float(np.mean(widths))


def test_clustered_bootstrap_ci_coverage_near_nominal():
    # 200 simulated cohorts of 30 participants × 10 regions, 1000 replicates each. The binomial
    # SD of a coverage of 0.95 over 200 cohorts is 0.015; the percentile interval is known to
    # under-cover slightly for small clusters counts, hence the band.
    coverage, _ = _coverage(clustered=True)
    assert 0.88 <= coverage <= 0.99, coverage


def test_region_level_bootstrap_undercovers_clustered_data():
    # Same cohorts, resampling regions as if independent: the participant-level disagreement is
    # ignored, the interval is too narrow and misses the truth far more often than 5 %.
    coverage_cl, width_cl = _coverage(clustered=True, n_cohorts=100)
    coverage_rg, width_rg = _coverage(clustered=False, n_cohorts=100)
    assert coverage_rg < 0.85, coverage_rg
    assert coverage_rg < coverage_cl - 0.1
    assert width_cl > 1.4 * width_rg


def test_clustered_equals_region_level_without_within_participant_correlation():
    # With independent observations the two schemes estimate the same thing: similar widths.
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, 400)
    y = x + rng.normal(0, 0.5, 400)
    cl = np.repeat(np.arange(40), 10)
    w = []
    for groups in (cl, np.arange(400)):
        reps, _ = stats.cluster_bootstrap_replicates(x, y, groups, 3000, rng)
        lo, hi = stats.percentile_ci(reps)
        w.append(hi - lo)
    assert 0.75 < w[0] / w[1] < 1.33, w


def test_strong_within_participant_correlation_widens_clustered_ci():
    rng = np.random.default_rng(11)
    x, y, cl = _cohort(rng, 20, 20, su=1.0, sv=1.0, sw=0.2, delta=0.0, sb=0.8)
    r1 = stats.agreement(x, y, cl, n_bootstrap=2000, rng=np.random.default_rng(1))
    r2 = stats.agreement(x, y, np.arange(len(x)), n_bootstrap=2000, rng=np.random.default_rng(1))
    assert r1.ccc == r2.ccc
    assert (r1.ccc_ci_high - r1.ccc_ci_low) > 2 * (r2.ccc_ci_high - r2.ccc_ci_low)
    assert (r1.mean_diff_ci_high - r1.mean_diff_ci_low) > 2 * (
        r2.mean_diff_ci_high - r2.mean_diff_ci_low)


# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(1,1) = .17,
# ICC(2,1) = .29 from BMS 11.24, WMS 6.26, JMS 32.49, EMS 1.02 (their Table 3).
SF = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
              dtype=float)


def test_icc_shrout_fleiss_published_values():
    groups = np.repeat(np.arange(6), 4)
    assert stats.icc_1_1(SF.ravel(), groups) == pytest.approx((11.24 - 6.26) / (11.24 + 3 * 6.26),
                                                              abs=2e-3)
    assert round(stats.icc_1_1(SF.ravel(), groups), 2) == 0.17
    hand_21 = (11.24 - 1.02) / (11.24 + 3 * 1.02 + 4 * (32.49 - 1.02) / 6)
    assert stats.icc_2_1(SF) == pytest.approx(hand_21, abs=2e-3)
    assert round(stats.icc_2_1(SF), 2) == 0.29


def test_icc_1_1_unbalanced_hand_computed():
    # Groups A: 1, 3 (mean 2); B: 4, 6, 8 (mean 6); C: 5 alone (left out).
    # grand mean 22/5 = 4.4; SSB = 2(2−4.4)² + 3(6−4.4)² = 11.52 + 7.68 = 19.2, MSB = 19.2
    # SSW = 2 + 8 = 10, MSW = 10/3; n0 = (5 − 13/5)/1 = 2.4
    # ICC = (19.2 − 10/3) / (19.2 + 1.4·10/3)
    v = [1, 3, 4, 6, 8, 5]
    g = ["A", "A", "B", "B", "B", "C"]
    assert stats.icc_1_1(v, g) == pytest.approx((19.2 - 10 / 3) / (19.2 + 1.4 * 10 / 3))
    assert np.isnan(stats.icc_1_1([1, 2, 3], ["A", "A", "B"]))
    assert np.isnan(stats.icc_2_1([[1.0, 2.0]]))
    assert np.isnan(stats.icc_2_1([[1.0, 2.0], [3.0, np.nan]]))  # unbalanced
