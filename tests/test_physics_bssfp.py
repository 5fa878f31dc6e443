"""pc-bSSFP physics against independent truth: an explicit hard-pulse Bloch simulation iterated
to steady state, and the analytic MIRACLE configuration expressions (SPEC §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bids_qmri.modalities.bssfp.inputs import BSSFPInput
from bids_qmri.physics.bssfp import (
    BSSFPModel,
    BSSFPProtocol,
    bssfp_signal,
    configurations,
    default_phase_increments,
    normalise_configurations,
    remove_receiver_phase,
    seed_protocol,
)


def _rotation(axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Right-handed rotation matrices (Rodrigues) about unit ``axes [..., 3]`` by ``angle [...]``."""
    k = np.zeros(axes.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2] = -axes[..., 2], axes[..., 1]
    k[..., 1, 0], k[..., 1, 2] = axes[..., 2], -axes[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -axes[..., 1], axes[..., 0]
    s, c = np.sin(angle)[..., None, None], np.cos(angle)[..., None, None]
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def _bloch_steady_state(t1, t2, b1, b0_hz, *, tr, te, flip_rad, phi, n_tr=12000):
    """Explicit Bloch simulation (right-handed frame, γ > 0: dM/dt = γ M × B, so precession
    and nutation turn clockwise about the field). The n-th hard pulse has RF phase −n·φ_j
    (B1 along −y at phase 0) and the receiver demodulates with the same RF phase.
    Returns the complex transverse magnetisation at TE after the last pulse, [P, Npc]."""
    t1, t2, b1, b0_hz = (np.asarray(x, float)[:, None] * np.ones((1, len(phi))) for x in (t1, t2, b1, b0_hz))
    m = np.zeros(t1.shape + (3,))
    m[..., 2] = 1.0
    e1, e2 = np.exp(-tr / t1), np.exp(-tr / t2)
    precess = _rotation(np.broadcast_to([0.0, 0.0, 1.0], m.shape), -2 * np.pi * b0_hz * tr)
    period = 2 * len(phi)  # n·φ_j mod 2π repeats: keep the phase small to avoid rounding
    for n in range(n_tr):
        rf_phase = -(n % period) * phi - np.pi / 2
        axes = np.stack([np.cos(rf_phase), np.sin(rf_phase), 0 * rf_phase], -1) * np.ones(m.shape)
        m = (_rotation(axes, -b1 * flip_rad) @ m[..., None])[..., 0]
        if n == n_tr - 1:
            break
        m = (precess @ m[..., None])[..., 0]
        m[..., 0] *= e2
        m[..., 1] *= e2
        m[..., 2] = 1 - (1 - m[..., 2]) * e1
    at_te = (_rotation(np.broadcast_to([0.0, 0.0, 1.0], m.shape), -2 * np.pi * b0_hz * te) @ m[..., None])[..., 0]
    mxy = (at_te[..., 0] + 1j * at_te[..., 1]) * np.exp(-te / t2)
    return mxy * np.exp(1j * ((n_tr - 1) % period) * phi)


@pytest.mark.parametrize("npc", [4, 6])
def test_signal_is_conjugate_of_bloch_simulation(npc):
    t1 = np.array([0.25, 0.4, 0.8])
    t2 = np.array([0.03, 0.1, 0.05])
    b1 = np.array([0.8, 1.0, 1.25])
    b0 = np.array([0.0, 37.0, -80.0])
    tr, te, flip = 4.8e-3, 2.1e-3, math.radians(35)
    phi = default_phase_increments(npc).numpy()
    bloch = _bloch_steady_state(t1, t2, b1, b0, tr=tr, te=te, flip_rad=flip, phi=phi)
    ours = bssfp_signal(
        torch.tensor(t1), torch.tensor(t2), 1.0, torch.tensor(b1), torch.tensor(b0),
        tr=tr, te=te, flip_rad=flip, phase_increments_rad=torch.tensor(phi),
    ).numpy()
    assert ours.shape == (3, npc)
    np.testing.assert_allclose(ours, np.conj(bloch), rtol=0, atol=1e-12)
    # the test can fail: the unconjugated simulation differs off resonance
    assert np.abs(ours[1:] - bloch[1:]).max() > 1e-3


def test_configurations_match_miracle_expressions_on_resonance():
    tr, te, flip = 4.8e-3, 2.4e-3, math.radians(15)
    t1 = torch.tensor([0.4, 0.9, 1.6, 2.0], dtype=torch.float64)
    t2 = torch.tensor([0.02, 0.06, 0.1, 0.3], dtype=torch.float64)
    b1 = torch.tensor([0.7, 1.0, 1.1, 1.3], dtype=torch.float64)
    phi = default_phase_increments(256)  # dense cycling: aliasing of higher orders negligible
    s = remove_receiver_phase(
        bssfp_signal(t1, t2, 1.0, b1, 0.0, tr=tr, te=te, flip_rad=flip, phase_increments_rad=phi)
    )
    f = configurations(s, phi)
    e1, e2, ca = torch.exp(-tr / t1), torch.exp(-tr / t2), torch.cos(b1 * flip)
    p = 1 - e1 * ca - e2**2 * (e1 - ca)
    q = e2 * (1 - e1) * (1 + ca)
    r = torch.sqrt(p**2 - q**2)
    f0 = 1 - (e1 - ca) * (1 - e2**2) / r
    f1 = f0 * (p - r) / q
    fm1 = 1 - (1 - e1 * ca) * (1 - e2**2) / r
    # on resonance the configurations are real (after receiver-phase removal)
    assert f.imag.abs().max() < 1e-12
    torch.testing.assert_close(f[:, 2].abs() / f[:, 1].abs(), f1 / f0, rtol=1e-10, atol=0)
    # F−1 carries one more TR of T2 decay than the MIRACLE expression (the e^{TR/T2} in the T2 step)
    torch.testing.assert_close(f[:, 0].abs() / f[:, 1].abs(), fm1 / f0 / e2, rtol=1e-10, atol=0)


def test_receiver_phase_and_normalisation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 8, dtype=torch.complex128, generator=g)
    out = remove_receiver_phase(s * torch.exp(torch.tensor(1.3j)))
    total = out.sum(-1)
    assert total.imag.abs().max() < 1e-12 and (total.real > 0).all()
    torch.testing.assert_close(out.abs(), s.abs())
    n = normalise_configurations(configurations(out, default_phase_increments(8)))
    torch.testing.assert_close(torch.linalg.vector_norm(n, dim=-1), torch.ones(5, dtype=torch.float64))


def test_default_increments_and_broadcasting():
    phi = default_phase_increments(4)
    torch.testing.assert_close(phi, torch.tensor([1, 3, 5, 7], dtype=torch.float64) * math.pi / 4)
    t1 = torch.full((2, 3), 1.0)
    s = bssfp_signal(t1, 0.05, 1.0, torch.ones(3), 0.0, tr=5e-3, te=2.5e-3, flip_rad=0.3, phase_increments_rad=phi)
    assert s.shape == (2, 3, 4) and s.dtype == torch.complex64
    with pytest.raises(ValueError):
        default_phase_increments(0)


def test_signal_is_differentiable():
    t1 = torch.tensor([0.9], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    p = seed_protocol(6)
    f = BSSFPModel(p).configurations(t1, t2, 1.0, 1.0, 3.0)
    f.abs().sum().backward()
    assert torch.isfinite(t1.grad).all() and t1.grad.abs() > 0 and t2.grad.abs() > 0


def test_protocol_key_and_records():
    p = seed_protocol(12)
    assert p.npc == 12 and p.tr == 4.8e-3
    same = BSSFPProtocol(0.0048 + 1e-13, 0.0024, 15.0, tuple(x + 1e-9 for x in p.phase_increments_deg))
    assert same.key() == p.key()
    assert seed_protocol(6).key() != p.key()
    assert BSSFPProtocol(5e-3, 2.4e-3, 15.0, p.phase_increments_deg).key() != p.key()
    rec = BSSFPInput(acq="pc", part_files={}, repetition_time=4.8e-3, echo_time=2.4e-3, flip_angle=15.0,
                     phase_increments=list(p.phase_increments_deg))
    assert BSSFPProtocol.from_input(rec).key() == p.key()
    assert BSSFPProtocol.from_sidecar(p.as_dict()) == p
    with pytest.raises(ValueError):
        BSSFPProtocol(0.0, 2e-3, 15.0, (0.0, 90.0, 180.0, 270.0))
    model = BSSFPModel(p)
    direct = bssfp_signal(1.0, 0.05, 1.0, 1.0, 0.0, tr=p.tr, te=p.te, flip_rad=p.flip_rad,
                          phase_increments_rad=p.phase_increments_rad())
    torch.testing.assert_close(model(torch.tensor(1.0, dtype=torch.float64), 0.05, 1.0, 1.0, 0.0), direct)
