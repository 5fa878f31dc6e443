"""bids_qmri-synth: phantom, BIDS validity, reproducibility, ground truth consistency.

Independent truths: the BIDS validator, seed 004 Table 1, the physics functions re-applied to the
written ground truth (one implementation, but the test exercises the whole chain of sampling,
poses, scaling, file writing), the exact EPG simulation against the dictionary interpolation,
and the TB1TFL definition famp = 10 × achieved 80° preparation angle.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from bids_qmri.physics import bssfp, epg, mprage, qmt, relaxation, svd
from bids_qmri.synth import dataset as ds
from bids_qmri.synth import phantom as ph
from helpers import validate_bids

RES = 6.0
FAST_KINDS = ds.ALL_KINDS


def _write(path, **kw):
    opts = dict(participants=1, sessions=2, resolution=RES, seed=3, kinds=FAST_KINDS)
    opts.update(kw)
    return ds.write_dataset(path, ds.SynthOptions(**opts), progress=False)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """One participant, two sessions, motion and noise (the realistic case)."""
    return _write(tmp_path_factory.mktemp("synth") / "noisy")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """No noise, no motion: the data must equal the physics applied to the ground truth."""
    return _write(tmp_path_factory.mktemp("synth") / "clean", sessions=0, snr=math.inf, motion=False)


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj).astype(np.float64)


def _one(root: Path, pattern: str) -> Path:
    hits = sorted(root.rglob(pattern))
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def _gt(root: Path, name: str) -> np.ndarray:
    return _load(_one(root / "derivatives" / "groundtruth", name))


# --------------------------------------------------------------------------------------------
# BIDS validity and layout


def test_raw_dataset_passes_validator(noisy):
    res = validate_bids(noisy)
    assert res.ok, res.summary()


def test_groundtruth_passes_validator_in_derivative_mode(noisy):
    res = validate_bids(noisy / "derivatives" / "groundtruth", derivative=True)
    assert res.ok, res.summary()


def test_sidecars_hold_the_required_metadata(noisy):
    side = lambda p: json.loads(_one(noisy, p).read_text())  # noqa: E731
    b = side("sub-01_ses-01_acq-pc12_part-mag_bSSFP.json")
    assert b["RepetitionTimeExcitation"] == 0.0048 and b["EchoTime"] == 0.0024 and b["FlipAngle"] == 15.0
    np.testing.assert_allclose(b["PhaseIncrements"], [15.0 * (2 * j - 1) for j in range(1, 13)])
    mrf = side("sub-01_ses-01_acq-fisp_desc-svd_part-real_MRF.json")
    assert mrf["MRFSequenceType"] == "FISP" and len(mrf["FlipAngle"]) == len(mrf["RepetitionTimeExcitation"])
    assert 0.0117 <= min(mrf["RepetitionTimeExcitation"]) and max(mrf["RepetitionTimeExcitation"]) <= 0.0143
    # Series: the time per file, the rest inherited from the top-level sidecar.
    tis = [json.loads(p.read_text())["InversionTime"] for p in sorted(noisy.rglob("sub-01_ses-01_*_IRT1.json"))]
    assert tis == list(ds.IRT1_TIS)
    assert "RepetitionTime" in json.loads((noisy / "acq-se_MESE.json").read_text())
    t1w = side("sub-01_ses-01_acq-mprage_T1w.json")
    assert t1w["InversionTime"] == 0.9 and t1w["RepetitionTimePreparation"] == 2.13
    assert (noisy / ".bidsignore").read_text().count("_bSSFP") == 1
    gt = json.loads(_one(noisy, "sub-01_ses-01_acq-pc12_T1map.json").read_text())
    assert gt["Units"] == "s" and gt["ReferenceVolume"] == 6 and len(gt["HeadPose"]) == 4


def test_basis_tsv_round_trip(noisy, tmp_path):
    basis = ds.read_basis_tsv(_one(noisy, "sub-01_ses-01_acq-fisp_desc-svd_MRFbasis.tsv"))
    assert basis.shape == (ds.MRF_FRAMES, ds.MRF_RANK)
    np.testing.assert_allclose(basis.mH @ basis, np.eye(ds.MRF_RANK), atol=1e-8)


# --------------------------------------------------------------------------------------------
# Reproducibility and test-retest structure


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_serial_or_parallel(tmp_path):
    kw = dict(participants=2, sessions=0, resolution=8.0, kinds=("bssfp", "tb1tfl", "irt1", "qmt"))
    opts = ds.SynthOptions(**{**dict(seed=3), **kw})
    a = _digest(ds.write_dataset(tmp_path / "a", opts, progress=False))
    b = _digest(ds.write_dataset(tmp_path / "b", opts, progress=False, nprocs=2))
    assert a == b and len(a) > 80
    c = _digest(_write(tmp_path / "c", seed=4, **kw))
    key = "sub-01/anat/sub-01_acq-pc12_part-mag_bSSFP.nii.gz"
    assert c[key] != a[key]
    assert a[key] != a[key.replace("01", "02")]  # participants differ


def test_sessions_share_tissue_parameters_but_not_noise_or_position(noisy):
    gt = noisy / "derivatives" / "groundtruth" / "sub-01"
    for name in ("T1map", "T2map", "M0map", "m0smap", "dseg"):
        a = _load(gt / "ses-01" / "anat" / f"sub-01_ses-01_{name}.nii.gz")
        b = _load(gt / "ses-02" / "anat" / f"sub-01_ses-02_{name}.nii.gz")
        np.testing.assert_array_equal(a, b)
    # B1/B0 fields, head position and noise are new in each session.
    b1 = [_load(gt / s / "fmap" / f"sub-01_{s}_TB1map.nii.gz") for s in ("ses-01", "ses-02")]
    assert np.abs(b1[0] - b1[1]).max() > 0.01
    poses = [json.loads((gt / s / "anat" / f"sub-01_{s}_acq-pc12_T1map.json").read_text())["HeadPose"]
             for s in ("ses-01", "ses-02")]
    assert not np.allclose(poses[0], poses[1])
    mags = [_load(_one(noisy, f"sub-01_{s}_acq-pc12_part-mag_bSSFP.nii.gz")) for s in ("ses-01", "ses-02")]
    assert not np.allclose(mags[0], mags[1])


def test_noise_level_follows_the_seed_snr_definition(noisy):
    mag = _load(_one(noisy, "sub-01_ses-01_acq-pc12_part-mag_bSSFP.nii.gz"))
    phase = _load(_one(noisy, "sub-01_ses-01_acq-pc12_part-phase_bSSFP.nii.gz"))
    pd_ = _gt(noisy, "sub-01_ses-01_acq-pc12_M0map.nii.gz")
    s = mag * np.exp(1j * phase)
    background = s[pd_ == 0]  # air: pure complex noise
    sigma = 0.074 / (math.sqrt(2) * 25.0)
    assert background.size > 10000
    np.testing.assert_allclose([background.real.std(), background.imag.std()], sigma, rtol=0.05)
    assert abs(background.real.mean()) < 5 * sigma / math.sqrt(background.size) + 1e-4


# --------------------------------------------------------------------------------------------
# Phantom


def test_tissue_parameters_match_table1():
    """Pure-tissue values pooled over many participants: Table 1 means and SDs (and the qMT
    literature values of T2s and Rx, which differ between GM and WM)."""
    assert ph.TISSUE_PARAMETERS["GM"]["T2s"][0] != ph.TISSUE_PARAMETERS["WM"]["T2s"][0]
    assert ph.TISSUE_PARAMETERS["GM"]["Rx"][0] != ph.TISSUE_PARAMETERS["WM"]["Rx"][0]
    grid = ph.reference_grid(8.0)
    n_participants = 300  # the between-participant share dominates the SD: many draws
    for tissue in ("GM", "WM", "CSF", "fat"):
        fractions = {t: np.zeros(grid.shape, np.float32) for t in ph.TISSUES}
        fractions[tissue][:] = 1.0
        values = {p: [] for p in ("T1", "T2", "PD", "T2s", "Rx")}
        for k in range(n_participants):
            maps, means = ph.draw_tissue_parameters(np.random.default_rng([7, k]), grid, fractions)
            for p in values:
                values[p].append(maps[p][::3, ::3, ::3].ravel())
        for p, v in values.items():
            v = np.asarray(v)  # [participants, voxels]
            mu, sd = ph.TISSUE_PARAMETERS[tissue][p]
            # Participant offsets carry BETWEEN_FRACTION of the variance: SE of the pooled mean.
            se = sd * math.sqrt(ph.BETWEEN_FRACTION / n_participants)
            assert abs(v.mean() - mu) < 4 * se + 1e-3 * mu, (tissue, p, v.mean(), mu)
            assert v.std() == pytest.approx(sd, rel=0.15), (tissue, p)


def _tiny_grid_and_mixed_brain():
    grid = ph.Grid((4, 4, 4), np.diag([8.0, 8.0, 8.0, 1.0]))
    fractions = {t: np.full(grid.shape, 1.0 / 3 if t in ph.BRAIN_TISSUES else 0.0, np.float32) for t in ph.TISSUES}
    return grid, fractions


def test_default_population_draws_what_it_drew_before_populations_existed():
    """The phantom's default is unchanged: the tissue means and maps of one draw equal, to the
    last bit, those of the code before ``population`` existed (values recorded from it)."""
    grid, fractions = _tiny_grid_and_mixed_brain()
    for kw in ({}, {"population": "seed004"}):
        maps, means = ph.draw_tissue_parameters(np.random.default_rng(42), grid, fractions, **kw)
        assert means["GM"]["T1"] == 1.4867240012581264 and means["WM"]["T2"] == 0.03499075445632051
        assert means["CSF"]["PD"] == 1.5353067814471832
        assert float(maps["T1"].sum()) == 82.20832824707031 and float(maps["T2"].sum()) == 5.8849029541015625
    assert ph.DEFAULT_POPULATION == ph.POPULATIONS[0] == "seed004"


def test_healthy_population_has_the_cited_between_subject_spread():
    """``healthy``: per-participant brain-tissue T1, T2, PD with the between-subject CVs of Choi
    et al. 2023 (3D MRF, 40 healthy adults at 3 T: T1 3.5 %, T2 7.3 %; PD 3.5 % our choice),
    around seed 004 Table 1's means; the same random stream as the default (the same standard-
    normal offsets, anatomy untouched), the non-brain tissues and the within-head fields as before."""
    grid, fractions = _tiny_grid_and_mixed_brain()
    cited_cv = {"T1": 0.035, "T2": 0.073, "PD": 0.035}
    n = 400
    drawn = {pop: {(t, p): [] for t in ph.TISSUES for p in ("T1", "T2", "PD")} for pop in ph.POPULATIONS}
    for k in range(n):
        for pop in ph.POPULATIONS:
            _, means = ph.draw_tissue_parameters(np.random.default_rng([11, k]), grid, fractions, population=pop)
            for (t, p), v in drawn[pop].items():
                v.append(means[t][p])
    for t in ph.BRAIN_TISSUES:
        for p, cv in cited_cv.items():
            mu, sd = ph.TISSUE_PARAMETERS[t][p]
            h, d = np.asarray(drawn["healthy"][(t, p)]), np.asarray(drawn["seed004"][(t, p)])
            # SD of a sample SD of n normal draws: ~1/sqrt(2n) = 3.5 %; 15 % is > 4 of those
            assert h.std() == pytest.approx(cv * mu, rel=0.15), (t, p, h.std(), cv * mu)
            assert abs(h.mean() - mu) < 4 * cv * mu / math.sqrt(n), (t, p)
            assert d.std() == pytest.approx(sd * math.sqrt(ph.BETWEEN_FRACTION), rel=0.15), (t, p)
            # same standard-normal offsets, only scaled
            np.testing.assert_allclose((h - mu) / (cv * mu), (d - mu) / (sd * math.sqrt(ph.BETWEEN_FRACTION)),
                                       rtol=1e-9, atol=1e-9)
    # e.g. GM T1: 0.28 s between participants in seed004, 49 ms in a healthy cohort
    assert np.std(drawn["healthy"][("GM", "T1")]) < 0.06 < 0.25 < np.std(drawn["seed004"][("GM", "T1")])
    for t in ("skull", "fat"):  # outside the brain: unchanged
        assert drawn["healthy"][(t, "T1")] == drawn["seed004"][(t, "T1")]
    # A phantom: the same anatomy whatever the population, its brain values from the population.
    a = ph.make_phantom(np.random.default_rng(5), 8.0)
    b = ph.make_phantom(np.random.default_rng(5), 8.0, population="healthy")
    assert all(np.array_equal(a.fractions[t], b.fractions[t]) for t in ph.TISSUES)
    assert a.tissue_means["fat"] == b.tissue_means["fat"] and a.tissue_means["GM"] != b.tissue_means["GM"]


def test_unknown_population_is_a_one_line_usage_error():
    from bids_qmri.errors import UsageError

    with pytest.raises(UsageError, match="unknown phantom population 'elderly': choose from seed004, healthy"):
        ph.make_phantom(np.random.default_rng(0), 8.0, population="elderly")


def test_phantom_anatomy_and_fields_are_plausible():
    p = ph.make_phantom(np.random.default_rng(11), 4.0)
    f = ph.make_session_fields(np.random.default_rng(12), p)
    brain = p.brain_mask
    vol_ml = {t: float(p.fractions[t].sum()) * 64e-3 for t in ("GM", "WM", "CSF")}
    assert 500 < vol_ml["GM"] < 1300 and 350 < vol_ml["WM"] < 900 and vol_ml["CSF"] > 40
    assert 0.7 <= f.b1.min() and f.b1.max() <= 1.3 and f.b1[brain].max() > 1.05 and f.b1[brain].min() < 0.95
    # ΔB0: tens of Hz over most of the brain, a strong orbitofrontal bump above the sinus.
    b0 = np.abs(f.b0_hz[brain])
    assert np.median(b0) < 30 and b0.max() > 60
    world = p.grid.world()[:, brain]
    frontal_inferior = (world[1] > 10) & (world[2] < -5)
    assert np.abs(f.b0_hz[brain][frontal_inferior]).max() > 2 * np.percentile(b0[~frontal_inferior], 99)
    # The head shell surrounds the brain: every brain voxel is away from air.
    assert p.head_mask.sum() > 1.3 * brain.sum()


def test_gaussian_mixture_recovers_known_components():
    """The EM behind the colin27 classification, on integer-valued samples (as image intensities)
    of a mixture with known parameters off any grid: shared-variance and per-class fits."""
    rng = np.random.default_rng(4)
    w, mu, sd = np.array([0.09, 0.52, 0.39]), np.array([46.3, 83.7, 108.2]), np.array([8.3, 8.3, 8.3])
    n = 400_000
    cls = rng.choice(3, n, p=w)
    x = np.round(rng.normal(mu[cls], sd[cls]))
    fw, fmu, fsd = ph._gaussian_mixture_1d(x, 3, tied=True)
    # Rounding to integers adds 1/12 to the variance.
    np.testing.assert_allclose(fmu, mu, atol=0.3)
    np.testing.assert_allclose(fsd, np.sqrt(sd**2 + 1 / 12), rtol=0.02)
    np.testing.assert_allclose(fw, w, atol=0.01)
    sd2 = np.array([14.1, 9.2, 4.4])
    x = np.round(rng.normal(mu[cls], sd2[cls]))
    fw, fmu, fsd = ph._gaussian_mixture_1d(x, 3)
    np.testing.assert_allclose(fmu, mu, atol=0.5)
    np.testing.assert_allclose(fsd, np.sqrt(sd2**2 + 1 / 12), rtol=0.03)
    np.testing.assert_allclose(fw, w, atol=0.01)


@pytest.mark.skipif(not ph.COLIN27_BRAIN.is_file(), reason="mricron-data (Colin27) not installed")
def test_colin27_anatomy_is_a_plausible_head_unlike_the_template():
    """The colin27 anatomy: adult tissue volumes, and far from the pipeline's template, so that
    a pipeline that only reproduced its template would score badly on it."""
    from bids_qmri.anatomy.segmentation import dice

    colin, mni = ph._crisp_tissues("colin27"), ph._crisp_tissues("mni152")
    ml = {t: float(v.sum()) / 1e3 for t, v in zip(("GM", "WM", "CSF"), colin[:3])}
    print("Colin27 tissue volumes (ml)", ml)
    assert 650 < ml["GM"] < 1050 and 550 < ml["WM"] < 950 and 0.05 < ml["CSF"] / sum(ml.values()) < 0.15
    assert sum(v.sum() for v in colin[:3]) == np.clip(sum(colin[:3]), 0, 1).sum()  # one tissue per voxel
    # Both anatomies are 1 mm MNI-space grids offset by whole voxels: compare the labels directly.
    offset = np.rint(np.linalg.solve(mni[3], colin[3][:, 3])[:3]).astype(int)
    window = tuple(slice(o, o + n) for o, n in zip(offset, colin[0].shape))
    scores = {t: dice(m[window] > 0.5, c > 0.5) for t, m, c in zip(("GM", "WM", "CSF"), mni[:3], colin[:3])}
    print("template labels vs Colin27 labels, Dice", scores)
    # Measured GM 0.636, WM 0.693, CSF 0.356 (the pipeline reaches GM 0.75-0.82, WM 0.70-0.84 at 3 mm).
    assert scores["GM"] < 0.72 and scores["WM"] < 0.76 and scores["CSF"] < 0.5
    p = ph.make_phantom(np.random.default_rng(11), 6.0, anatomy="colin27")
    assert p.anatomy == "colin27"
    brain = p.brain_mask
    assert brain.sum() * 216e-3 == pytest.approx(sum(ml.values()), rel=0.2)
    # The head shell surrounds the brain inside the grid.
    assert p.head_mask.sum() > 1.3 * brain.sum()
    assert not p.head_mask[[0, -1]].any() and not p.head_mask[:, [0, -1]].any() and not p.head_mask[:, :, -1].any()


def test_unavailable_anatomy_is_a_one_line_usage_error(monkeypatch, tmp_path):
    from bids_qmri.errors import UsageError

    monkeypatch.setattr(ph, "COLIN27_BRAIN", tmp_path / "missing" / "ch2bet.nii.gz")
    with pytest.raises(UsageError, match="apt-get install mricron-data, or use --anatomy mni152"):
        ds.SynthOptions(anatomy="colin27").validate()
    with pytest.raises(UsageError, match="choose from mni152, colin27"):
        ds.SynthOptions(anatomy="icbm").validate()


def test_deformation_is_small_and_invertible():
    grid = ph.reference_grid(4.0)
    scaling, disp = ph._deformation(np.random.default_rng(5), grid, 3.0)
    assert np.abs(disp).max() == pytest.approx(3.0) and np.all(np.abs(scaling - 1) <= 0.05)
    # Jacobian of x -> x/s + u(x) must stay positive (no folding).
    grads = [np.gradient(disp[i], *grid.zooms) for i in range(3)]
    jac = np.empty(grid.shape + (3, 3))
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = (i == j) / scaling[i] + grads[i][j]
    assert np.linalg.det(jac).min() > 0.5


# --------------------------------------------------------------------------------------------
# Ground truth lines up with the data


def _tt(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_bssfp_resimulated_from_ground_truth_equals_data(clean):
    mag = _load(_one(clean, "sub-01_acq-pc12_part-mag_bSSFP.nii.gz"))
    phase = _load(_one(clean, "sub-01_acq-pc12_part-phase_bSSFP.nii.gz"))
    side = json.loads(_one(clean, "sub-01_acq-pc12_part-mag_bSSFP.json").read_text())
    gt = {k: _gt(clean, f"sub-01_acq-pc12_{k}.nii.gz") for k in ("T1map", "T2map", "M0map", "TB1map", "fieldmap")}
    m = gt["M0map"] > 0.05
    sim = bssfp.bssfp_signal(*(_tt(gt[k][m]) for k in ("T1map", "T2map", "M0map", "TB1map", "fieldmap")),
                             tr=side["RepetitionTimeExcitation"], te=side["EchoTime"],
                             flip_rad=math.radians(side["FlipAngle"]),
                             phase_increments_rad=torch.tensor(np.radians(side["PhaseIncrements"])))
    data = torch.from_numpy((mag * np.exp(1j * phase))[m])
    np.testing.assert_allclose(data.abs().numpy(), sim.abs().numpy(), rtol=2e-4, atol=2e-6)
    # The data carry a smooth receiver phase; without it they are the same complex signal.
    a, b = bssfp.remove_receiver_phase(data), bssfp.remove_receiver_phase(sim)
    assert (a - b).abs().max() < 1e-4
    assert m.sum() > 1000


def test_relaxometry_series_resimulated_from_ground_truth(clean):
    t1, t2, pd_, b1 = (_gt(clean, f"sub-01_acq-ir_{k}.nii.gz") for k in ("T1map", "T2map", "M0map", "TB1map"))
    m = pd_ > 0.05
    ir = np.stack([_load(_one(clean, f"sub-01_acq-ir_inv-{j + 1}_IRT1.nii.gz"))[m] for j in range(6)], -1)
    expect = relaxation.inversion_recovery(_tt(pd_[m]), 1 - torch.cos(math.pi * _tt(b1[m])), _tt(t1[m]), ds.IRT1_TIS)
    np.testing.assert_allclose(ir / 1000.0, expect.numpy(), rtol=1e-4, atol=1e-6)
    t1, t2, pd_ = (_gt(clean, f"sub-01_acq-se_{k}.nii.gz") for k in ("T1map", "T2map", "M0map"))
    m = pd_ > 0.05
    se = np.stack([_load(_one(clean, f"sub-01_acq-se_echo-{j + 1}_MESE.nii.gz"))[m] for j in range(6)], -1)
    a = _tt(pd_[m]) * -torch.expm1(-ds.MESE_TR / _tt(t1[m]))
    np.testing.assert_allclose(se / 1000.0, relaxation.t2_decay(a, _tt(t2[m]), ds.MESE_TES).numpy(),
                               rtol=1e-4, atol=1e-6)


def test_mprage_resimulated_from_ground_truth(clean):
    t1, pd_, b1 = (_gt(clean, f"sub-01_acq-mprage_{k}.nii.gz") for k in ("T1map", "M0map", "TB1map"))
    m = pd_ > 0.05
    img = _load(_one(clean, "sub-01_acq-mprage_T1w.nii.gz"))[m] / 1000.0
    expect = mprage.mprage_signal(_tt(t1[m]), _tt(pd_[m]), _tt(b1[m]), **mprage.default_mprage_protocol())
    np.testing.assert_allclose(img, expect.numpy(), rtol=1e-4, atol=1e-6)
    dseg = _gt(clean, "sub-01_acq-mprage_dseg.nii.gz")[m]
    means = [img[dseg == k].mean() for k in (1, 2, 3)]
    assert means[1] > means[0] > means[2]  # T1w contrast: WM > GM > CSF


def test_mrf_coefficients_match_exact_epg_on_ground_truth(clean):
    re = _load(_one(clean, "sub-01_acq-fisp_desc-svd_part-real_MRF.nii.gz"))
    im = _load(_one(clean, "sub-01_acq-fisp_desc-svd_part-imag_MRF.nii.gz"))
    basis = ds.read_basis_tsv(_one(clean, "sub-01_acq-fisp_desc-svd_MRFbasis.tsv"))
    gt = {k: _gt(clean, f"sub-01_acq-fisp_{k}.nii.gz") for k in ("T1map", "T2map", "M0map", "TB1map")}
    brain = _gt(clean, "sub-01_acq-fisp_desc-brain_mask.nii.gz") > 0
    idx = np.flatnonzero(brain)[:: max(1, brain.sum() // 150)]
    coeffs = torch.from_numpy((re + 1j * im).reshape(-1, basis.shape[1])[idx])
    t1, t2, pd_, b1 = (_tt(gt[k].ravel()[idx]) for k in ("T1map", "T2map", "M0map", "TB1map"))
    exact = epg.fisp_mrf(t1, t2, b1, **epg.default_fisp_schedule(ds.MRF_FRAMES)) * pd_[:, None]
    exact_c = svd.compress(exact, basis, real_first=True)
    data_c = svd.compress(svd.expand(coeffs, basis), basis, real_first=True)  # receiver phase removed
    rel = (data_c - exact_c).norm(dim=-1) / exact_c.norm(dim=-1)
    assert float(rel.median()) < 0.005 and float(rel.max()) < 0.03


def test_qmt_coefficients_match_exact_simulation_on_ground_truth(clean):
    re = _load(_one(clean, "sub-01_acq-hybrid_desc-svd_part-real_qMT.nii.gz"))
    im = _load(_one(clean, "sub-01_acq-hybrid_desc-svd_part-imag_qMT.nii.gz"))
    basis = ds.read_basis_tsv(_one(clean, "sub-01_acq-hybrid_desc-svd_qMTbasis.tsv"))
    side = json.loads(_one(clean, "sub-01_acq-hybrid_desc-svd_part-real_qMT.json").read_text())
    assert len(side["FlipAngle"]) == len(side["RFPulseDuration"]) == basis.shape[0]
    assert re.shape[3] == ds.QMT_RANK
    # The whole head is scanned (no slab): the qMT grid spans the phantom's field of view.
    full = ds.acquisition_grid(ph.reference_grid(RES), RES * ds.RES_FACTOR["qmt"], ds.GRID_SHIFT["qmt"])
    assert re.shape[:3] == full.shape
    names = ("m0smap", "T1map", "T2map", "T2smap", "Rxmap", "fieldmap", "TB1map", "M0map")
    gt = {k: _gt(clean, f"sub-01_acq-hybrid_{k}.nii.gz") for k in names}
    brain = _gt(clean, "sub-01_acq-hybrid_desc-brain_mask.nii.gz") > 0
    idx = np.flatnonzero(brain)[:: max(1, brain.sum() // 40)]
    p = [_tt(gt[k].ravel()[idx]) for k in names]
    sched = qmt.default_qmt_schedule()
    assert np.allclose(np.radians(side["FlipAngle"]), sched["flip_rad"].numpy(), atol=1e-8)
    exact = qmt.hybrid_state_signal(*p[:7], **sched) * p[7][:, None]
    exact_c = svd.compress(exact, basis, real_first=True)
    data_c = svd.compress(svd.expand(torch.from_numpy((re + 1j * im).reshape(-1, basis.shape[1])[idx]), basis),
                          basis, real_first=True)
    rel = (data_c - exact_c).norm(dim=-1) / exact_c.norm(dim=-1)
    assert float(rel.max()) < 1e-3  # float32 simulation and file precision
    assert np.ptp(gt["fieldmap"][brain]) > 5  # the qMT data do see the off-resonance field
    # Every slice with brain has qMT signal, and each voxel's own T2s and Rx were simulated.
    head = gt["M0map"] > 1e-3
    energy = np.abs(re + 1j * im).sum(-1)
    assert (energy[head] > 0).all() and (energy[~head] == 0).all()
    assert np.flatnonzero(brain.any(axis=(0, 1))).size >= 6
    assert np.ptp(gt["T2smap"][brain]) > 1e-6 and np.ptp(gt["Rxmap"][brain]) > 5


def test_b1_from_tb1tfl_equals_ground_truth(noisy):
    famp = _load(_one(noisy, "sub-01_ses-01_acq-famp_TB1TFL.nii.gz"))
    b1 = _gt(noisy, "sub-01_ses-01_acq-tb1tfl_TB1map.nii.gz")
    side = json.loads(_one(noisy, "sub-01_ses-01_acq-famp_TB1TFL.json").read_text())
    assert side["FlipAngle"] == 8.0  # the readout angle, not the preparation angle
    m = famp > 0
    assert m.sum() > 500
    np.testing.assert_allclose(famp[m] / 800.0, b1[m], atol=0.5 / 800 + 1e-6)


def test_ground_truth_grid_matches_acquisition_grid(noisy):
    for pattern, gt in (("sub-01_ses-01_acq-pc12_part-mag_bSSFP.nii.gz", "sub-01_ses-01_acq-pc12_T1map.nii.gz"),
                        ("sub-01_ses-01_acq-famp_TB1TFL.nii.gz", "sub-01_ses-01_acq-tb1tfl_TB1map.nii.gz"),
                        ("sub-01_ses-01_acq-se_echo-1_MESE.nii.gz", "sub-01_ses-01_acq-se_dseg.nii.gz")):
        a, b = nb.load(_one(noisy, pattern)), nb.load(_one(noisy, gt))
        assert a.shape[:3] == b.shape and np.allclose(a.affine, b.affine)
    # With motion the brain in the data sits where the acquisition-grid ground truth says.
    mag = _load(_one(noisy, "sub-01_ses-01_acq-pc12_part-mag_bSSFP.nii.gz"))[..., 6]
    head = _gt(noisy, "sub-01_ses-01_acq-pc12_M0map.nii.gz") > 0.3
    assert mag[head].mean() > 5 * mag[~head].mean()


# --------------------------------------------------------------------------------------------
# Command line and montage


def _cli(*args):
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, needle", [
    (["--snr", "-3"], "--snr"),
    (["--participants", "0"], "--participants"),
    (["--resolution", "0.1"], "--resolution"),
    (["--kinds", "dwi"], "--kinds"),
    (["--npc", "2"], "--npc"),
    (["--anatomy", "icbm"], "--anatomy"),
])
def test_cli_bad_arguments_give_one_line_error(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = _cli(out, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = _cli(tmp_path / "out")
    assert proc.returncode == 2 and "not an empty directory" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_cli_writes_a_dataset(tmp_path):
    proc = _cli(tmp_path / "d", "--participants", "1", "--sessions", "0", "--resolution", "8",
                "--kinds", "bssfp", "tb1tfl", "--npc", "6", "--no-motion", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    mag = nb.load(_one(tmp_path / "d", "sub-01_acq-pc6_part-mag_bSSFP.nii.gz"))
    assert mag.shape[3] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_montage_is_written(noisy, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "phantom_montage.py"
    out = tmp_path / "montage.png"
    proc = subprocess.run([sys.executable, str(script), str(out), "--bids", str(noisy)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


@pytest.mark.skipif(not ph.COLIN27_BRAIN.is_file(), reason="mricron-data (Colin27) not installed")
def test_cli_anatomy_colin27_draws_the_same_participant_on_another_head(tmp_path):
    """``--anatomy colin27``: recorded in the dataset README; one seed draws the same participant
    (fields, deformation, tissue values) on a different head (the segmentations differ)."""
    common = ["--participants", "1", "--sessions", "0", "--resolution", "8", "--kinds", "t1w", "--no-motion",
              "--seed", "5", "--snr", "inf"]
    assert _cli(tmp_path / "c", *common, "--anatomy", "colin27").returncode == 0
    assert _cli(tmp_path / "m", *common).returncode == 0
    assert "--anatomy colin27" in (tmp_path / "c" / "README").read_text()
    assert "--anatomy mni152" in (tmp_path / "m" / "README").read_text()
    seg = {k: _gt(tmp_path / k, "sub-01_dseg.nii.gz") for k in "cm"}
    b1 = {k: _gt(tmp_path / k, "sub-01_TB1map.nii.gz") for k in "cm"}
    assert seg["c"].shape == seg["m"].shape and (seg["c"] != seg["m"]).mean() > 0.02
    np.testing.assert_array_equal(b1["c"], b1["m"])  # the session's fields: same draws
    # The participant: same deformation and tissue values whatever the head.
    rng = lambda: ds._rng(5, 0, 0, ds._PURPOSE["phantom"])  # noqa: E731
    pc, pm = (ph.make_phantom(rng(), 8.0, anatomy=a) for a in ("colin27", "mni152"))
    assert pc.tissue_means == pm.tissue_means
    np.testing.assert_array_equal(pc.displacement, pm.displacement)
    assert not np.array_equal(pc.fractions["GM"], pm.fractions["GM"])
