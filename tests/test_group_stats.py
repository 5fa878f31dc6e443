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
    x, y, cl = _cohorts(rng, 1, k, r, su, sv, sw, delta, sb)
    return x[0], y[0], cl


def _cohorts(rng, n, k, r, su, sv, sw, delta, sb):
    """``n`` independent cohorts of ``_cohort`` at once: x, y ``[n, k·r]`` and the cluster labels."""
    u = rng.normal(0, su, (n, k, 1))
    b = rng.normal(0, sb, (n, k, 1))
    x = u + rng.normal(0, sv, (n, k, r))
    y = x + delta + b + rng.normal(0, sw, (n, k, r))
    return x.reshape(n, -1), y.reshape(n, -1), np.repeat(np.arange(k), r)


def _true_ccc(su, sv, sw, delta, sb):
    v = su**2 + sv**2
    return 2 * v / (2 * v + sb**2 + sw**2 + delta**2)


PARAMS = dict(su=1.0, sv=1.0, sw=0.5, delta=0.3, sb=0.5)


def _coverage(clustered=True, n_cohorts=2000, n_boot=1000, k=30, r=10, seed=20261121, level=0.95):
    """Coverage of the CCC and of the mean-difference CIs of ``agreement`` over simulated
    cohorts, and the mean CCC CI width. The cohorts are drawn at once; each goes through the
    public ``agreement`` (its default level unless ``level`` is given)."""
    rng = np.random.default_rng(seed)
    true_ccc = _true_ccc(**PARAMS)
    true_diff = -PARAMS["delta"]  # agreement reports x − y, and y = x + δ + ...
    xs, ys, cl = _cohorts(rng, n_cohorts, k, r, **PARAMS)
    groups = cl if clustered else np.arange(k * r)
    kw = {} if level == 0.95 else {"level": level}
    hits_ccc = hits_diff = 0
    widths = []
    for x, y in zip(xs, ys):
        res = stats.agreement(x, y, groups, n_bootstrap=n_boot, rng=rng, **kw)
        hits_ccc += res.ccc_ci_low <= true_ccc <= res.ccc_ci_high
        hits_diff += res.mean_diff_ci_low <= true_diff <= res.mean_diff_ci_high
        widths.append(res.ccc_ci_high - res.ccc_ci_low)
    return hits_ccc / n_cohorts, hits_diff / n_cohorts, float(np.mean(widths))


def test_clustered_bootstrap_ci_coverage_near_nominal():
    # 2000 simulated cohorts of 30 participants × 10 regions, 1000 replicates each (~3 s).
    # The percentile interval under-covers a little with 30 clusters. Measured coverage of the
    # 95 % intervals: CCC 0.9295, mean difference 0.935 at this seed; over seeds 0-4 CCC
    # 0.916-0.926 and mean difference 0.927-0.943. A 90 % interval reported as 95 % measures
    # CCC 0.856-0.881 and mean difference 0.874-0.894 on the same six seeds. Binomial SD of a
    # coverage near 0.93 over 2000 cohorts: 0.006. The bands sit between the two.
    coverage_ccc, coverage_diff, _ = _coverage()
    assert 0.905 <= coverage_ccc <= 0.97, coverage_ccc
    assert 0.91 <= coverage_diff <= 0.97, coverage_diff


def test_percentile_ci_is_the_central_interval_of_the_stated_level():
    # 0, 1, …, 1000: the q-quantile (linear interpolation) is 1000·q exactly.
    reps = np.arange(1001.0)
    assert stats.percentile_ci(reps) == pytest.approx((25.0, 975.0), abs=1e-9)
    assert stats.percentile_ci(reps, level=0.90) == pytest.approx((50.0, 950.0), abs=1e-9)
    # NaN replicates (degenerate resamples) are left out, not counted as values.
    assert stats.percentile_ci(np.r_[reps, np.nan, np.nan]) == pytest.approx((25.0, 975.0), abs=1e-9)


def test_bootstrap_draws_every_participant_with_binomial_frequency():
    # Participant j's observations all have x − y = 6^j (5 participants, 3 regions each, labels
    # unsorted). The replicate mean difference is then Σ_j c_j·6^j / 5 with c_j the number of
    # times participant j was drawn (0…5 < 6), so the draw counts of every replicate can be read
    # back exactly as base-6 digits. Each of the 5 draws picks each participant with
    # probability 1/5: c_j ~ Binomial(5, 1/5), E c_j = 1, Σ_j c_j = 5.
    k, r, n_boot = 5, 3, 20000
    labels = np.array(["sub-c", "sub-a", "sub-e", "sub-b", "sub-d"])
    code = (k + 1.0) ** np.arange(k)
    x = np.repeat(code, r)
    _, diffs = stats.cluster_bootstrap_replicates(x, np.zeros_like(x), np.repeat(labels, r), n_boot,
                                                  np.random.default_rng(0))
    total = diffs * k
    assert np.abs(total - np.rint(total)).max() < 1e-9  # whole participants, never single regions
    counts = (np.rint(total).astype(np.int64)[:, None] // (k + 1) ** np.arange(k)) % (k + 1)
    assert (counts.sum(axis=1) == k).all()
    # Mean draws per replicate: SE sqrt(0.8/20000) = 0.0063; measured 0.995-1.003.
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.03)
    # Frequencies of 0, 1, 2 draws against Binomial(5, 1/5) = 0.328, 0.410, 0.205 (SE ≤ 0.0035;
    # measured deviations ≤ 0.004).
    pmf = [0.8**5, 5 * 0.2 * 0.8**4, 10 * 0.04 * 0.8**3]
    for j in range(k):
        freq = np.bincount(counts[:, j], minlength=k + 1)[:3] / n_boot
        np.testing.assert_allclose(freq, pmf, atol=0.015, err_msg=f"participant {labels[j]}")


def test_region_level_bootstrap_undercovers_clustered_data():
    # Same cohorts, resampling regions as if independent: the participant-level disagreement is
    # ignored, the interval is too narrow and misses the truth far more often than 5 %.
    # Measured (this seed; seeds 0-4): region-level coverage 0.71 (0.65-0.76; binomial SD 0.045),
    # clustered minus region-level 0.23 (0.19-0.29), width ratio 1.85 (1.77-1.83 over seeds 0-4).
    coverage_cl, _, width_cl = _coverage(clustered=True, n_cohorts=100)
    coverage_rg, _, width_rg = _coverage(clustered=False, n_cohorts=100)
    assert coverage_rg < 0.80, coverage_rg
    assert coverage_rg < coverage_cl - 0.15
    assert width_cl > 1.7 * width_rg


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
    # Measured ratio 1.007 at this seed; 0.77-1.05 over seeds 0-4 (3000 replicates, 40 clusters).
    assert 0.75 < w[0] / w[1] < 1.25, w


def test_strong_within_participant_correlation_widens_clustered_ci():
    rng = np.random.default_rng(11)
    x, y, cl = _cohort(rng, 20, 20, su=1.0, sv=1.0, sw=0.2, delta=0.0, sb=0.8)
    r1 = stats.agreement(x, y, cl, n_bootstrap=2000, rng=np.random.default_rng(1))
    r2 = stats.agreement(x, y, np.arange(len(x)), n_bootstrap=2000, rng=np.random.default_rng(1))
    assert r1.ccc == r2.ccc
    # Width ratios measured 3.17 (CCC) and 4.33 (mean difference) at this seed; over seeds 0-4
    # 2.99-4.14 and 4.14-4.46.
    assert (r1.ccc_ci_high - r1.ccc_ci_low) > 2.7 * (r2.ccc_ci_high - r2.ccc_ci_low)
    assert (r1.mean_diff_ci_high - r1.mean_diff_ci_low) > 3.7 * (
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
