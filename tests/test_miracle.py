"""MIRACLE: recovers T1/T2 from noise-free configurations; vectorised == voxel loop.

``miracle`` solves the alternation's fixed point in closed form (module docstring of
``bids_qmri.fitting.miracle``); ``miracle_reference`` is the independent voxel-by-voxel
golden-section loop. Tolerances are the measured agreement with a margin ≤ 1.5×."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_qmri.fitting.miracle import miracle, miracle_closed_form, miracle_reference, t1_cost, t2_cost
from bids_qmri.physics.bssfp import BSSFPModel, BSSFPProtocol


def _simulate(n, npc, seed=0):
    p = BSSFPProtocol.with_default_increments(4.8e-3, 2.4e-3, 15.0, npc)
    g = torch.Generator().manual_seed(seed)
    t1 = torch.empty(n, dtype=torch.float64).uniform_(0.36, 2.08, generator=g)
    t2 = torch.empty(n, dtype=torch.float64).uniform_(0.02, 0.12, generator=g)
    b1 = torch.empty(n, dtype=torch.float64).uniform_(0.7, 1.3, generator=g)
    f = BSSFPModel(p).configurations(t1, t2, 1.0, b1, 0.0).abs()
    return p, t1.numpy(), t2.numpy(), b1.numpy(), f.numpy()


# measured max |relative error| (T1, T2) on the noise-free Npc-64 voxels below: the closed form is
# exact to round-off, the alternation stops within its 1e-3 ms tolerance
RECOVERY = {"closed_form": (8.96e-13, 5.20e-12), "golden_section": (1.10e-5, 1.00e-5)}


@pytest.mark.parametrize("solver", ["closed_form", "golden_section"])
def test_recovers_noise_free_parameters(solver):
    # dense phase cycling: the configurations carry almost no aliasing, so MIRACLE's model is exact
    p, t1, t2, b1, f = _simulate(300, npc=64)
    est1, est2, rounds = miracle(f * 3.7, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, solver=solver)
    assert np.abs(est1 / t1 - 1).max() < 1.45 * RECOVERY[solver][0]
    assert np.abs(est2 / t2 - 1).max() < 1.45 * RECOVERY[solver][1]
    if solver == "closed_form":
        assert (rounds == 0).all()  # every voxel's fixed point inside the box: no alternation
    else:
        assert (rounds >= 1).all() and (rounds < 200).all()
    # B1 is used: a wrong B1 biases T1 (measured: median 31 %)
    wrong1, _, _ = miracle(f, b1 * 1.2, tr=p.tr, te=p.te, flip_rad=p.flip_rad, solver=solver)
    assert np.median(np.abs(wrong1 / t1 - 1)) > 0.2


def test_costs_vanish_at_truth():
    p, t1, t2, b1, f = _simulate(50, npc=128, seed=3)
    ca = torch.cos(torch.tensor(b1) * p.flip_rad)
    c1 = t1_cost(torch.tensor(t1), torch.tensor(t2), torch.tensor(f[:, 2] / f[:, 1]), ca, p.tr)
    c2 = t2_cost(torch.tensor(t2), torch.tensor(t1), torch.tensor(f[:, 0] / (f[:, 1] - f[:, 2])), ca, p.tr, p.te)
    assert c1.max() < 1e-9 and c2.max() < 1e-9
    assert t1_cost(torch.tensor(t1 * 1.1), torch.tensor(t2), torch.tensor(f[:, 2] / f[:, 1]), ca, p.tr).min() > 1e-5


def test_closed_form_zeroes_both_steps_objectives():
    """The closed form is the joint root of the T1 and T2 steps' objectives, also off the model
    (noisy magnitudes): both costs vanish to round-off there (measured ≤ 4.0e-14 / 3.0e-14; moving
    T1 or T2 by the loop's tolerance, 1e-3 ms, raises them to ~1e-7 / ~8e-6)."""
    p, t1, t2, b1, f = _simulate(200, npc=12, seed=5)
    rng = np.random.default_rng(5)
    f = np.abs(f * (1 + 0.02 * rng.standard_normal(f.shape)))
    m = torch.tensor(f)
    b = torch.tensor(b1)
    c1_, c2_, inside = miracle_closed_form(m[:, 0], m[:, 1], m[:, 2], b, tr=p.tr, flip_rad=p.flip_rad)
    assert bool(inside.all())
    ca = torch.cos(b * p.flip_rad)
    cost1 = t1_cost(c1_, c2_, m[:, 2] / m[:, 1], ca, p.tr)
    cost2 = t2_cost(c2_, c1_, m[:, 0] / (m[:, 1] - m[:, 2]), ca, p.tr, p.te)
    assert cost1.max() < 1e-11 and cost2.max() < 1e-11  # round-off, 1e4 below a 1e-3 ms shift


def test_vectorised_matches_voxel_loop():
    p, t1, t2, b1, f = _simulate(40, npc=12, seed=1)
    f[3] = [0.1, 0.0, 0.2]  # unfittable: |F1| > |F0|
    f[5, 1] = np.nan
    ref1, ref2 = miracle_reference(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad)
    # the closed form is the fixed point the loop stops within its tolerance of (1e-3 ms between
    # rounds): measured max relative difference 7.3e-6 (T1) and 7.2e-6 (T2)
    est1, est2, rounds = miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, chunk=16)
    np.testing.assert_allclose(est1, ref1, rtol=1.05e-5, atol=0, equal_nan=True)
    np.testing.assert_allclose(est2, ref2, rtol=1.05e-5, atol=0, equal_nan=True)
    assert np.isnan(est1[[3, 5]]).all() and np.isfinite(np.delete(est1, [3, 5])).all()
    assert (rounds == 0).all()
    # the vectorised alternation is the loop's arithmetic, voxel for voxel (measured: identical)
    gold1, gold2, _ = miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, chunk=16, solver="golden_section")
    np.testing.assert_array_equal(gold1, ref1)
    np.testing.assert_array_equal(gold2, ref2)
    # at Npc 12 the aliased higher configurations bias MIRACLE only slightly in typical tissue
    # (measured: median 3.8e-5)
    ok = np.isfinite(est1)
    assert np.median(np.abs(est1[ok] / t1[ok] - 1)) < 5.5e-5


def test_outside_the_box_goes_through_the_alternation():
    """Voxels whose joint root lies outside [0, 5] s (here T1 = 6 s and |F−1| > |F0|, T2 < 0)
    end where the voxel loop ends, on the edge of the box; the others still take the closed form."""
    p, t1, t2, b1, f = _simulate(6, npc=12, seed=2)
    far = BSSFPModel(p).configurations(torch.tensor([6.0]), torch.tensor([0.08]), 1.0, torch.tensor([1.0]), 0.0).abs()
    f = np.concatenate([f, far.numpy(), [[0.9, 0.5, 0.2]]])
    b1 = np.concatenate([b1, [1.0, 1.0]])
    est1, est2, rounds = miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, chunk=4)
    ref1, ref2 = miracle_reference(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad)
    assert (rounds[:6] == 0).all() and (rounds[6:] > 0).all()
    np.testing.assert_array_equal(est1[6:], ref1[6:])  # same alternation, same arithmetic
    np.testing.assert_array_equal(est2[6:], ref2[6:])
    assert est1[6] > 4.99


def test_long_t2_where_the_alternation_does_not_converge():
    """CSF-like voxels: the alternation contracts so slowly that 200 rounds stop 0.65 % short of
    the fixed point; the closed form is the fixed point (noise-free, Npc 256: measured 3.1e-13 in
    T1, 5.2e-14 in T2 in one run, 2.9e-13 / 9.0e-14 in another: float64 round-off, which moves with
    the summation order of the 256-cycle DFT; the bound, 1e-11, is round-off and ~1e9 below the
    loop's 0.65 %)."""
    p = BSSFPProtocol.with_default_increments(4.8e-3, 2.4e-3, 15.0, 256)
    t1 = torch.tensor([3.0, 4.0, 4.5, 2.0], dtype=torch.float64)
    t2 = torch.tensor([1.5, 2.0, 2.4, 1.8], dtype=torch.float64)
    b1 = torch.tensor([0.8, 1.0, 1.2, 0.9], dtype=torch.float64)
    f = BSSFPModel(p).configurations(t1, t2, 1.0, b1, 0.0).abs().numpy()
    est1, est2, _ = miracle(f, b1.numpy(), tr=p.tr, te=p.te, flip_rad=p.flip_rad)
    assert np.abs(est1 / t1.numpy() - 1).max() < 1e-11 and np.abs(est2 / t2.numpy() - 1).max() < 1e-11
    _, _, rounds = miracle(f, b1.numpy(), tr=p.tr, te=p.te, flip_rad=p.flip_rad, solver="golden_section")
    assert (rounds == 200).all()


def test_thread_count_does_not_change_the_result():
    p, t1, t2, b1, f = _simulate(5000, npc=12, seed=4)
    before = torch.get_num_threads()
    one = miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, num_threads=1)
    two = miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, num_threads=2)
    assert torch.get_num_threads() == before
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="solver"):
        miracle(f, b1, tr=p.tr, te=p.te, flip_rad=p.flip_rad, solver="brent")
