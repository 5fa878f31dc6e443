"""Cohort tables built from the collected long ROI table (SPEC §4 group outputs).

Keys: a *measure* is one (suffix, method, acq) of an atlas region; the per-region value of a
participant/session is the ``mean`` column of its ROI table (the regional mean).

Sessions
    ``summary``: sessions are averaged per participant first (regional mean and regional SD
    each averaged over the participant's sessions), so that every participant counts once.
    ``agreement``: every (participant, session, region) with both methods is one pair; the
    bootstrap resamples participants with all their sessions and regions, which accounts for
    sessions of one participant being correlated. Methods are paired within an acquisition
    (``acq`` = ``acq_b``) and across acquisitions for maps of the same quantity in the same
    physical units (e.g. T1 from inversion recovery against T1 from pc-bSSFP); maps in arbitrary
    units (e.g. M0) are compared within an acquisition only.
    ``repeatability``: the repeats are a participant's sessions (ROI tables have no run entity).
"""

from __future__ import annotations

import zlib
from itertools import combinations

import numpy as np
import pandas as pd

from . import stats

MEASURE = ["atlas", "region_index", "region", "suffix", "method", "acq", "units"]

SUMMARY_COLUMNS = MEASURE + ["n_participants", "n_sessions", "mean", "sd", "mean_std"]
AGREEMENT_COLUMNS = [
    "atlas", "suffix", "acq", "acq_b", "units", "method_a", "method_b", "n_participants", "n_sessions",
    "n_regions", "n_pairs", "ccc", "ccc_ci_low", "ccc_ci_high", "pearson_r", "mean_diff",
    "mean_diff_ci_low", "mean_diff_ci_high", "sd_diff", "loa_low", "loa_high", "n_bootstrap",
    "ci_method",
]
REPEATABILITY_COLUMNS = MEASURE + [
    "n_participants", "n_sessions", "mean", "cv_mean_percent", "cv_rms_percent",
    "icc_1_1", "icc_2_1",
]
CI_METHOD = "percentile, clustered bootstrap over participants"

# Units in which values of different acquisitions cannot be compared (scaled by the receiver).
ARBITRARY_UNITS = ("arbitrary", "a.u.", "n/a", "")


def method_order() -> tuple[str, ...]:
    """Order in which methods are paired: the registry's (each modality's reference method, e.g.
    the conventional fit, before its networks), so that mean_diff = a − b reads as "reference
    minus network"."""
    from bids_qmri import modalities

    return modalities.method_order()


def _method_key(m: str):
    order = method_order()
    return (order.index(m), m) if m in order else (len(order), m)


def _valid(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isfinite(df["mean"].to_numpy(dtype=float))]


def per_participant(df: pd.DataFrame) -> pd.DataFrame:
    """Sessions averaged per participant: one row per participant × region × measure."""
    d = _valid(df)
    g = d.groupby(MEASURE + ["participant_id"], dropna=False, sort=True)
    out = g.agg(mean=("mean", "mean"), std=("std", "mean"), n_sessions=("mean", "size"))
    return out.reset_index()


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per region × measure: N participants, mean and SD (ddof=1) across participants of the
    regional mean, and the mean of the regional SD (seed 002 Table 3)."""
    pp = per_participant(df)
    if pp.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    g = pp.groupby(MEASURE, dropna=False, sort=True)
    out = g.agg(
        n_participants=("participant_id", "nunique"),
        n_sessions=("n_sessions", "sum"),
        mean=("mean", "mean"),
        sd=("mean", "std"),  # ddof=1; NaN for a single participant
        mean_std=("std", "mean"),
    ).reset_index()
    out = out.sort_values(["suffix", "acq", "method", "region_index"], key=_sort_key,
                          ignore_index=True)
    return out[SUMMARY_COLUMNS]


def _sort_key(col: pd.Series):
    if col.name == "method":
        return col.map(lambda m: _method_key(m)[0])
    return col


def method_pairs(df: pd.DataFrame) -> list[tuple[str, str, str, str, str, str]]:
    """(atlas, suffix, acq_a, method_a, acq_b, method_b) for every pair of maps of one quantity:
    every two methods of one acquisition, and every two (acquisition, method) of different
    acquisitions whose maps share physical units."""
    pairs = []
    d = _valid(df)
    for (atlas, suffix), sub in d.groupby(["atlas", "suffix"], sort=True):
        measures = sorted({(acq, m) for acq, m in zip(sub["acq"], sub["method"])},
                          key=lambda am: (am[0], _method_key(am[1])))
        units = {am: set(g["units"]) for am, g in sub.groupby(["acq", "method"])}
        for (acq_a, a), (acq_b, b) in combinations(measures, 2):
            if acq_a != acq_b:
                shared = units[(acq_a, a)] & units[(acq_b, b)]
                if len(shared) != 1 or next(iter(shared)) in ARBITRARY_UNITS:
                    continue
            pairs.append((atlas, suffix, acq_a, a, acq_b, b))
    return pairs


def paired_values(df: pd.DataFrame, atlas, suffix, acq, method_a, method_b, acq_b=None) -> pd.DataFrame:
    """Rows (participant, session, atlas region) with both maps: columns x (``method_a`` of
    ``acq``) and y (``method_b`` of ``acq_b``, default the same acquisition).

    Only atlas regions: the tissue rows of the ROI tables (negative ``region_index``: GM, WM,
    CSF, WholeBrain; see ``bids_qmri.anatomy.roistats``) overlap the regions and would count
    the same voxels twice.
    """
    acq_b = acq if acq_b is None else acq_b
    d = _valid(df)
    d = d[(d["atlas"] == atlas) & (d["suffix"] == suffix) & (d["region_index"] >= 0)]
    keys = ["participant_id", "session_id", "region_index", "region"]
    a = d[(d["method"] == method_a) & (d["acq"] == acq)][keys + ["mean", "units"]]
    b = d[(d["method"] == method_b) & (d["acq"] == acq_b)][keys + ["mean", "units"]]
    m = a.merge(b, on=keys, suffixes=("_a", "_b"))
    return m.rename(columns={"mean_a": "x", "mean_b": "y"}).sort_values(keys, ignore_index=True)


def pair_rng(seed: int, *key) -> np.random.Generator:
    """A generator per method pair: results do not depend on which other pairs exist."""
    return np.random.default_rng([int(seed), zlib.crc32("|".join(map(str, key)).encode())])


def agreement_table(tables: dict[str, pd.DataFrame], *, n_bootstrap: int, seed: int
                    ) -> pd.DataFrame:
    """Every method pair of every atlas: Lin's CCC (clustered-bootstrap percentile CI), mean
    difference a − b with CI, Bland–Altman limits (see ``stats``)."""
    rows = []
    for atlas in sorted(tables):
        df = tables[atlas]
        for _, suffix, acq, a, acq_b, b in method_pairs(df):
            p = paired_values(df, atlas, suffix, acq, a, b, acq_b)
            if len(p) < 2:
                continue
            # the same acquisition keeps the generator key it always had
            key = (atlas, suffix, acq, a, b) if acq_b == acq else (atlas, suffix, acq, a, acq_b, b)
            res = stats.agreement(
                p["x"].to_numpy(), p["y"].to_numpy(), p["participant_id"].to_numpy(),
                n_bootstrap=n_bootstrap, rng=pair_rng(seed, *key))
            units = sorted(set(p["units_a"]) | set(p["units_b"]))
            rows.append({
                "atlas": atlas, "suffix": suffix, "acq": acq, "acq_b": acq_b, "units": ",".join(units),
                "method_a": a, "method_b": b,
                "n_participants": res.n_clusters,
                "n_sessions": p[["participant_id", "session_id"]].drop_duplicates().shape[0],
                "n_regions": p["region_index"].nunique(),
                "n_pairs": res.n_obs,
                "ccc": res.ccc, "ccc_ci_low": res.ccc_ci_low, "ccc_ci_high": res.ccc_ci_high,
                "pearson_r": res.pearson_r, "mean_diff": res.mean_diff,
                "mean_diff_ci_low": res.mean_diff_ci_low,
                "mean_diff_ci_high": res.mean_diff_ci_high, "sd_diff": res.sd_diff,
                "loa_low": res.loa_low, "loa_high": res.loa_high,
                "n_bootstrap": n_bootstrap if res.n_clusters >= 2 else 0,
                "ci_method": (CI_METHOD if res.n_clusters >= 2 and n_bootstrap > 0
                              else "n/a (no bootstrap)" if n_bootstrap <= 0
                              else "n/a (fewer than 2 participants)"),
            })
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def has_repeats(df: pd.DataFrame) -> bool:
    d = _valid(df)
    n = d.groupby(MEASURE + ["participant_id"], dropna=False)["session_id"].nunique()
    return bool((n >= 2).any())


def participant_cv(df: pd.DataFrame) -> pd.DataFrame:
    """Seed 004 Eq. 8 per participant × region × measure over the participant's sessions
    (participants with ≥ 2 sessions): CV [%] = SD (ddof=1) / mean × 100 of the regional means.
    Columns MEASURE + participant_id, n_sessions, mean, sd, cv_percent."""
    d = _valid(df)
    g = d.groupby(MEASURE + ["participant_id"], dropna=False, sort=True)["mean"]
    out = g.agg(n_sessions="size", mean="mean", sd="std").reset_index()  # pandas std: ddof=1
    out = out[out["n_sessions"] >= 2].reset_index(drop=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["cv_percent"] = np.where(out["mean"] != 0, out["sd"] / out["mean"] * 100.0, np.nan)
    return out


def _participants_by_sessions(pid, ses, val) -> np.ndarray:
    """participants × sessions table; NaN where a participant lacks a session (unbalanced)."""
    p_lab, p_idx = np.unique(pid, return_inverse=True)
    s_lab, s_idx = np.unique(ses, return_inverse=True)
    t = np.full((len(p_lab), len(s_lab)), np.nan)
    t[p_idx, s_idx] = val
    return t


def repeatability_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per region × measure over participants with ≥ 2 sessions: mean and root-mean-square of
    the per-participant CV (seed 004 Eq. 8), ICC(1,1) and ICC(2,1) (``stats``)."""
    cv = participant_cv(df)
    if cv.empty:
        return pd.DataFrame(columns=REPEATABILITY_COLUMNS)
    cv_by_measure = {k: g["cv_percent"].to_numpy()
                     for k, g in cv.groupby(MEASURE, dropna=False, sort=True)}
    d = _valid(df).merge(cv[MEASURE + ["participant_id"]], on=MEASURE + ["participant_id"])
    rows = []
    for key, sub in d.groupby(MEASURE, dropna=False, sort=True):
        c = cv_by_measure[key]
        finite = np.isfinite(c).any()
        pid, ses, val = (sub[k].to_numpy() for k in ("participant_id", "session_id", "mean"))
        rows.append(dict(zip(MEASURE, key)) | {
            "n_participants": len(np.unique(pid)),
            "n_sessions": len(sub),
            "mean": float(val.mean()),
            "cv_mean_percent": np.nanmean(c) if finite else np.nan,
            "cv_rms_percent": np.sqrt(np.nanmean(c**2)) if finite else np.nan,
            "icc_1_1": stats.icc_1_1(val, pid),
            "icc_2_1": stats.icc_2_1(_participants_by_sessions(pid, ses, val)),
        })
    out = pd.DataFrame(rows, columns=REPEATABILITY_COLUMNS)
    return out.sort_values(["suffix", "acq", "method", "region_index"], key=_sort_key,
                           ignore_index=True)
