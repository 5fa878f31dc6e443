"""MPRAGE closed-form periodic steady state against a brute-force event simulation."""

import math

import numpy as np
import pytest
import torch

from bids_qmri.physics import mprage


def brute_force(t1, m0, b1, *, ti, tr_prep, esp, flip, n, centre, eta=1.0, ti_first=False, reps=60):
    """Explicit event-by-event simulation repeated until long after the steady state."""
    alpha = flip * b1
    t_first = ti if ti_first else ti - centre * esp
    mz = m0
    centre_mz = None
    for _ in range(reps):
        mz = -eta * mz  # inversion
        t = 0.0
        # recover to the first pulse
        mz = m0 + (mz - m0) * math.exp(-t_first / t1)
        t = t_first
        for k in range(n):
            if k == centre:
                centre_mz = mz
            mz *= math.cos(alpha)
            if k < n - 1:
                mz = m0 + (mz - m0) * math.exp(-esp / t1)
                t += esp
        mz = m0 + (mz - m0) * math.exp(-(tr_prep - t) / t1)
    return math.sin(alpha) * centre_mz


@pytest.mark.parametrize(
    "t1,m0,b1,kw",
    [
        (0.85, 0.7, 1.0, {}),  # WM-like, seed-002 protocol
        (4.2, 1.0, 1.15, {}),  # CSF-like, negative Mz at the centre -> magnitude
        (1.4, 0.8, 0.8, dict(eta=0.93, centre=10)),
        (1.4, 0.8, 1.0, dict(ti_first=True, ti=0.5)),
    ],
)
def test_closed_form_equals_brute_force(t1, m0, b1, kw):
    p = mprage.default_mprage_protocol()
    ti = kw.get("ti", p["ti"])
    centre = kw.get("centre", p["n_readout"] // 2)
    ref = brute_force(
        t1, m0, b1, ti=ti, tr_prep=p["tr_prep"], esp=p["echo_spacing"], flip=p["flip_rad"],
        n=p["n_readout"], centre=centre, eta=kw.get("eta", 1.0), ti_first=kw.get("ti_first", False),
    )
    args = dict(p, ti=ti, centre_index=centre, inversion_efficiency=kw.get("eta", 1.0),
                ti_reference="first" if kw.get("ti_first") else "centre")
    d = torch.float64
    signed = mprage.mprage_signal(torch.tensor(t1, dtype=d), torch.tensor(m0, dtype=d),
                                  torch.tensor(b1, dtype=d), magnitude=False, **args)
    # float64: round-off (measured ≤ 3.6e-14 relative over the four cases; the bound leaves
    # room for other CPUs); float32 magnitude: measured ≤ 1.39e-6, bound 1.5×
    assert signed.item() == pytest.approx(ref, rel=1e-12, abs=1e-14)
    mag = mprage.mprage_signal(t1, m0, b1, **args)
    assert mag.dtype == torch.float32
    assert mag.item() == pytest.approx(abs(ref), rel=2.1e-6)


def test_float32_batch_matches_float64_and_contrast_order():
    p = mprage.default_mprage_protocol()
    t1 = torch.linspace(0.3, 5.0, 1000)
    s32 = mprage.mprage_signal(t1, torch.ones(()), torch.ones(()), **p)
    s64 = mprage.mprage_signal(t1.double(), torch.ones((), dtype=torch.float64), 1.0, **p)
    assert s32.shape == (1000,)
    # measured max relative difference 2.76e-6 (max absolute 6.1e-8); bound 1.5×
    np.testing.assert_allclose(s32.numpy(), s64.numpy(), rtol=4.2e-6, atol=0)
    # T1-weighting: WM (0.85 s) brighter than GM (1.35 s) brighter than CSF (4.2 s)
    wm, gm, csf = mprage.mprage_signal(torch.tensor([0.85, 1.35, 4.2]), 1.0, 1.0, **p)
    assert wm > gm > csf


def test_t2star_factor_and_gradients():
    p = mprage.default_mprage_protocol()
    d = dict(dtype=torch.float64, requires_grad=True)
    t1, m0, b1 = torch.tensor([0.9, 1.6], **d), torch.tensor([0.8, 1.0], **d), torch.tensor([0.9, 1.1], **d)
    t2s = torch.tensor([0.05, 0.08], **d)
    base = mprage.mprage_signal(t1, m0, b1, **p)
    with_t2s = mprage.mprage_signal(t1, m0, b1, te=0.003, t2star=t2s, **p)
    assert torch.allclose(with_t2s, base * torch.exp(-0.003 / t2s))
    assert torch.autograd.gradcheck(
        lambda t1, m0, b1, t2s: mprage.mprage_signal(t1, m0, b1, te=0.003, t2star=t2s, **p),
        (t1, m0, b1, t2s),
    )


def test_impossible_timing_is_a_clear_error():
    p = dict(mprage.default_mprage_protocol(), ti=0.2)
    with pytest.raises(ValueError, match="timing does not fit"):
        mprage.mprage_signal(1.0, 1.0, 1.0, **p)
