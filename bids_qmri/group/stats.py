"""Group statistics: agreement between methods and repeatability across sessions.

Plain NumPy functions on 1-D arrays, tested against closed-form values.

Agreement (SPEC §4, seed 002 Table 4)
    Lin's concordance correlation coefficient (Lin 1989),
    ``ccc = 2 s_xy / (s_x² + s_y² + (x̄ − ȳ)²)`` with 1/n (population) moments as in Lin's
    definition. Its 95 % CI comes from a *clustered* bootstrap: a replicate draws participants with
    replacement and keeps all of a drawn participant's observations (regions and sessions), so
    that the correlation between regions of one participant is carried into the interval
    (seed 002: "to account for the multi-level nature of the data"). The interval is the
    percentile interval (2.5 % and 97.5 % quantiles of the replicates). The same replicates give
    the CI of the mean difference. Bland–Altman limits of agreement are mean ± 1.96 SD (ddof=1)
    of the differences.

Repeatability (seed 004 Eq. 8)
    ``CV [%] = SD_c(κ̂_c) / mean_c(κ̂_c) × 100`` over the C repeated measurements of one
    participant (here: the regional means of the C sessions), computed for all participants at
    once in ``tables.participant_cv``. SD uses ddof=1 (the sample SD of the repeats). ICC(1,1) (one-way random effects, absolute agreement, single measurement,
    Shrout & Fleiss 1979, unbalanced designs via the usual n0 coefficient) and ICC(2,1)
    (two-way random effects, absolute agreement, single measurement; only for balanced designs
    where every participant has the same sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns of the per-cluster sufficient statistics used by the vectorised bootstrap.
_N, _SX, _SY, _SXX, _SYY, _SXY = range(6)


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient of paired samples ``x`` and ``y``."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("ccc needs two 1-D arrays of the same length")
    mx, my = x.mean(), y.mean()
    vx = ((x - mx) ** 2).mean()
    vy = ((y - my) ** 2).mean()
    sxy = ((x - mx) * (y - my)).mean()
    denom = vx + vy + (mx - my) ** 2
    return float(2.0 * sxy / denom) if denom > 0 else float("nan")


def _ccc_from_sums(s: np.ndarray) -> np.ndarray:
    """CCC and mean difference from summed sufficient statistics ``[..., 6]``."""
    n = s[..., _N]
    mx, my = s[..., _SX] / n, s[..., _SY] / n
    vx = s[..., _SXX] / n - mx**2
    vy = s[..., _SYY] / n - my**2
    sxy = s[..., _SXY] / n - mx * my
    denom = vx + vy + (mx - my) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(denom > 0, 2.0 * sxy / denom, np.nan)
    return c, mx - my


def cluster_bootstrap_replicates(
    x, y, clusters, n_bootstrap: int, rng: np.random.Generator, chunk: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates of (CCC, mean difference x − y), resampling whole clusters.

    Each replicate draws as many clusters as there are, with replacement; a cluster drawn twice
    contributes its observations twice. Computed from per-cluster sums, so a replicate costs
    O(number of clusters) however many observations a cluster holds. Pass
    ``clusters=np.arange(len(x))`` for the ordinary (observation-level) bootstrap.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    k = len(labels)
    per_obs = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)
    sums = np.zeros((k, 6))
    np.add.at(sums, inverse, per_obs)
    cccs, diffs = [], []
    done = 0
    while done < n_bootstrap:
        m = min(chunk, n_bootstrap - done)
        # counts[b, j]: how often cluster j is drawn in replicate b (k draws with replacement).
        draws = rng.integers(0, k, size=(m, k)) + k * np.arange(m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=m * k).reshape(m, k)
        c, d = _ccc_from_sums(counts @ sums)
        cccs.append(c)
        diffs.append(d)
        done += m
    return np.concatenate(cccs), np.concatenate(diffs)


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval; NaN replicates (degenerate resamples) are left out."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass
class Agreement:
    n_obs: int
    n_clusters: int
    ccc: float
    ccc_ci_low: float
    ccc_ci_high: float
    pearson_r: float
    mean_diff: float
    mean_diff_ci_low: float
    mean_diff_ci_high: float
    sd_diff: float
    loa_low: float
    loa_high: float


def agreement(
    x, y, clusters, *, n_bootstrap: int, rng: np.random.Generator, level: float = 0.95
) -> Agreement:
    """CCC with clustered-bootstrap percentile CI, mean difference x − y with CI, Bland–Altman.

    With fewer than two clusters the bootstrap cannot vary anything, so the CIs are NaN.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    d = x - y
    n_clusters = len(np.unique(np.asarray(clusters)))
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    mean_d = float(d.mean())
    if n_clusters >= 2 and n_bootstrap > 0:
        rc, rd = cluster_bootstrap_replicates(x, y, clusters, n_bootstrap, rng)
        c_lo, c_hi = percentile_ci(rc, level)
        d_lo, d_hi = percentile_ci(rd, level)
    else:
        c_lo = c_hi = d_lo = d_hi = float("nan")
    if len(x) > 1 and x.std() > 0 and y.std() > 0:
        r = float(np.corrcoef(x, y)[0, 1])
    else:
        r = float("nan")
    return Agreement(
        n_obs=len(x),
        n_clusters=n_clusters,
        ccc=ccc(x, y),
        ccc_ci_low=c_lo,
        ccc_ci_high=c_hi,
        pearson_r=r,
        mean_diff=mean_d,
        mean_diff_ci_low=d_lo,
        mean_diff_ci_high=d_hi,
        sd_diff=sd,
        loa_low=mean_d - 1.96 * sd,
        loa_high=mean_d + 1.96 * sd,
    )


def icc_1_1(values, groups) -> float:
    """ICC(1,1): one-way random effects, single measurement (Shrout & Fleiss 1979, case 1).

    ``values`` are measurements, ``groups`` the participant of each. Groups may have different
    numbers of repeats (n0 replaces k); groups with a single repeat are left out. NaN when fewer
    than two groups have two or more repeats.
    """
    v = np.asarray(values, dtype=float)
    g = np.asarray(groups)
    labels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= 2
    v, g = v[keep], g[keep]
    labels, inverse, n_i = np.unique(g, return_inverse=True, return_counts=True)
    a = len(labels)
    n = len(v)
    if a < 2:
        return float("nan")
    means = np.bincount(inverse, weights=v) / n_i
    grand = v.mean()
    msb = float((n_i * (means - grand) ** 2).sum() / (a - 1))
    msw = float(((v - means[inverse]) ** 2).sum() / (n - a))
    n0 = (n - (n_i**2).sum() / n) / (a - 1)
    denom = msb + (n0 - 1.0) * msw
    return (msb - msw) / denom if denom > 0 else float("nan")


def icc_2_1(table) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single measurement.

    ``table`` is participants × sessions; NaN (not defined here) unless it is complete, i.e.
    every participant has every session. Shrout & Fleiss 1979, case 2:
    (BMS − EMS) / (BMS + (k−1) EMS + k (JMS − EMS) / n).
    """
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2 or not np.isfinite(t).all():
        return float("nan")
    n, k = t.shape
    grand = t.mean()
    ss_rows = k * ((t.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((t.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((t - grand) ** 2).sum() - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems + k * (jms - ems) / n
    return float((bms - ems) / denom) if denom > 0 else float("nan")
