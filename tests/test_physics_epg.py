"""FISP-MRF EPG against an explicit isochromat (Bloch) simulation of the same sequence."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from bids_qmri.physics import epg


def isochromat_fisp(t1, t2, b1, flip, tr, te, ti, n_spins=400, eta=1.0):
    """Spins spread uniformly over one cycle of the spoiler's dephasing; explicit rotations.
    ``eta``: inversion efficiency (the inversion leaves ``Mz = −eta``)."""
    theta = 2 * np.pi * np.arange(n_spins) / n_spins
    m = np.zeros((n_spins, 3))
    m[:, 2] = 1.0
    if ti is not None:
        m[:, 2] = -eta
        m[:, 2] = 1 + (m[:, 2] - 1) * np.exp(-ti / t1)
    out = []
    for a, t in zip(flip, tr):
        rot = Rotation.from_rotvec([0.0, a * b1, 0.0]).as_matrix()  # right-handed about y
        m = m @ rot.T
        mxy = (m[:, 0] + 1j * m[:, 1]) * np.exp(-te / t2)
        out.append(mxy.mean())
        mxy = (m[:, 0] + 1j * m[:, 1]) * np.exp(-t / t2)
        mz = 1 + (m[:, 2] - 1) * np.exp(-t / t1)
        mxy = mxy * np.exp(1j * theta)  # unbalanced gradient: one cycle across the voxel
        m = np.stack([mxy.real, mxy.imag, mz], axis=1)
    return np.array(out)


@pytest.fixture(scope="module")
def short_schedule():
    s = epg.default_fisp_schedule()
    # every 8th TR of the default schedule: 125 TRs, same flip/TR ranges
    return dict(flip_rad=s["flip_rad"][::8], tr=s["tr"][::8], te=s["te"], ti=s["ti"])


@pytest.mark.parametrize("t1,t2,b1", [(0.85, 0.065, 1.0), (4.0, 2.0, 0.8), (1.3, 0.11, 1.2)])
def test_epg_equals_isochromat_simulation(short_schedule, t1, t2, b1):
    s = short_schedule
    ref = isochromat_fisp(t1, t2, b1, s["flip_rad"].numpy(), s["tr"].numpy(), s["te"], s["ti"])
    d = torch.float64
    sig = epg.fisp_mrf(torch.tensor(t1, dtype=d), torch.tensor(t2, dtype=d), torch.tensor(b1, dtype=d), **s)
    assert sig.dtype == torch.complex128 and sig.shape == (125,)
    # Same sequence, two algorithms: equal to round-off (measured max |diff| 1.8e-16-2.3e-16;
    # the bound leaves a few float64 ulps of the signal scale for other CPUs).
    np.testing.assert_allclose(sig.numpy(), ref, atol=1e-14)
    # the comparison discriminates: one unspoiled spin (no dephasing) gives another curve
    # (measured 1.7-2.7 × the signal's maximum)
    unspoiled = isochromat_fisp(t1, t2, b1, s["flip_rad"].numpy(), s["tr"].numpy(), s["te"], s["ti"], n_spins=1)
    assert np.abs(unspoiled - ref).max() > 1.0 * np.abs(ref).max()


@pytest.mark.parametrize("t1,t2,b1,eta", [(0.85, 0.065, 1.0, 0.9), (1.6, 0.12, 0.8, 0.75), (0.3, 0.04, 1.15, 0.0)])
def test_inversion_efficiency_first_echoes_analytic(t1, t2, b1, eta):
    # Inversion leaves Mz = −η; after TI, Mz(TI) = 1 − (1 + η) e^{−TI/T1}. The first pulse tips it:
    # echo 1 = sin(B1 α₁) Mz(TI) e^{−TE/T2}. The spoiler moves that transverse magnetisation to
    # order 1, so echo 2 comes from the longitudinal part alone:
    # echo 2 = sin(B1 α₂) [cos(B1 α₁) Mz(TI) E1 + 1 − E1] e^{−TE/T2}, E1 = e^{−TR₁/T1}.
    s = epg.default_fisp_schedule()
    a, tr, te, ti = s["flip_rad"].numpy() * b1, s["tr"].numpy(), s["te"], s["ti"]
    mz = 1 - (1 + eta) * np.exp(-ti / t1)
    e1, e2te = np.exp(-tr[0] / t1), np.exp(-te / t2)
    first = np.sin(a[0]) * mz * e2te
    second = np.sin(a[1]) * (np.cos(a[0]) * mz * e1 + 1 - e1) * e2te
    d = torch.float64
    sig = epg.fisp_mrf(torch.tensor(t1, dtype=d), torch.tensor(t2, dtype=d), torch.tensor(b1, dtype=d),
                       inversion_efficiency=eta, **s).numpy()
    np.testing.assert_allclose(sig[:2], [first, second], rtol=1e-12, atol=1e-15)
    # η changes echo 1 by sin(B1 α₁)(1 − η) e^{−TI/T1} e^{−TE/T2}: 0.105, 0.26, 1.17 of the
    # ideal-inversion value in the three cases.
    ideal = np.sin(a[0]) * (1 - 2 * np.exp(-ti / t1)) * e2te
    assert abs(first - ideal) > 0.1 * abs(ideal)


def test_inversion_efficiency_whole_fingerprint_vs_isochromats(short_schedule):
    s = short_schedule
    t1, t2, b1, eta = 1.1, 0.09, 0.9, 0.8
    ref = isochromat_fisp(t1, t2, b1, s["flip_rad"].numpy(), s["tr"].numpy(), s["te"], s["ti"], eta=eta)
    d = torch.float64
    sig = epg.fisp_mrf(torch.tensor(t1, dtype=d), torch.tensor(t2, dtype=d), torch.tensor(b1, dtype=d),
                       inversion_efficiency=eta, **s).numpy()
    np.testing.assert_allclose(sig, ref, atol=1e-14)  # measured 1.1e-16
    # η = 0.8 against an ideal inversion: measured 0.28 of the signal's maximum
    ideal = isochromat_fisp(t1, t2, b1, s["flip_rad"].numpy(), s["tr"].numpy(), s["te"], s["ti"])
    assert np.abs(ideal - ref).max() > 0.2 * np.abs(ref).max()


def test_no_inversion_and_truncation():
    s = epg.default_fisp_schedule()
    s = dict(flip_rad=s["flip_rad"][:200], tr=s["tr"][:200], te=s["te"], ti=None)
    ref = isochromat_fisp(1.0, 0.3, 1.0, s["flip_rad"].numpy(), s["tr"].numpy(), s["te"], None)
    exact = epg.fisp_mrf(1.0, 0.3, 1.0, **s).numpy()
    np.testing.assert_allclose(exact, ref, atol=3e-7)  # float32 round-off: measured 1.1e-7
    capped = epg.fisp_mrf(1.0, 0.3, 1.0, n_states=20, **s).numpy()
    # 20 states for T2 = 0.3 s: measured max error 3.0e-4 (bound 1.5×); far above float32 round-off
    assert 1e-4 < np.abs(capped - ref).max() < 4.5e-4


def test_default_schedule_matches_spec():
    s = epg.default_fisp_schedule()
    assert s["flip_rad"].shape == (1000,) and s["tr"].shape == (1000,)
    assert np.degrees(s["flip_rad"].max().item()) == pytest.approx(70, abs=0.1)
    assert s["tr"].min().item() == pytest.approx(11.7e-3) and s["tr"].max().item() == pytest.approx(14.3e-3)
    # five lobes: local minima of the flip angle near the lobe edges
    f = s["flip_rad"].numpy()
    assert ((f[1:-1] < f[:-2]) & (f[1:-1] < f[2:])).sum() == 4


def test_batch_broadcast_and_gradcheck(short_schedule):
    s = dict(short_schedule, flip_rad=short_schedule["flip_rad"][:30], tr=short_schedule["tr"][:30])
    t1 = torch.tensor([[0.8], [1.5]])
    t2 = torch.tensor([0.05, 0.1, 0.2])
    sig = epg.fisp_mrf(t1, t2, 1.0, **s)
    assert sig.shape == (2, 3, 30) and sig.dtype == torch.complex64
    one = epg.fisp_mrf(t1[1, 0], t2[2], 1.0, **s)
    torch.testing.assert_close(sig[1, 2], one)
    d = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.tensor([0.9, 1.4], **d), torch.tensor([0.07, 0.2], **d), torch.tensor([0.95, 1.1], **d))
    assert torch.autograd.gradcheck(lambda *p: torch.view_as_real(epg.fisp_mrf(*p, **s)), args)
