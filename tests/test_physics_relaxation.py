"""IR and T2-decay models against analytic values; gradients."""

import math

import numpy as np
import pytest
import torch

from bids_qmri.physics import relaxation


def test_inversion_recovery_analytic_values():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.8], dtype=torch.float64)
    t1 = torch.tensor([0.8, 1.5], dtype=torch.float64)
    ti = [0.1, 0.8 * math.log(2), 3.0]
    s = relaxation.inversion_recovery(a, b, t1, ti)
    assert s.shape == (2, 3)
    expected = np.abs(a.numpy()[:, None] * (1 - b.numpy()[:, None] * np.exp(-np.array(ti) / t1.numpy()[:, None])))
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-12)
    # null point of a perfect inversion at TI = T1 ln 2
    assert s[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    # at TI = 0.1 s, T1 = 0.8 s, B = 2: |1 − 2 e^{−1/8}| by hand
    assert s[0, 0].item() == pytest.approx(abs(1 - 2 * 0.8824969025845955), rel=1e-12)


def test_t2_decay_analytic_and_broadcast():
    a = torch.ones(4, 1)
    t2 = torch.tensor([0.05, 0.1, 0.2])
    s = relaxation.t2_decay(a, t2, torch.tensor([0.0, 0.1]))
    assert s.shape == (4, 3, 2)
    assert torch.allclose(s[0, :, 0], torch.ones(3))
    assert torch.allclose(s[0, :, 1], torch.tensor([math.exp(-2), math.exp(-1), math.exp(-0.5)]))
    assert s.dtype == torch.float32


def test_gradients_exist_for_all_parameters():
    d = dict(dtype=torch.float64, requires_grad=True)
    a, b, t1 = torch.tensor([1.2, 0.7], **d), torch.tensor([1.9, 1.7], **d), torch.tensor([0.9, 1.4], **d)
    ti = torch.tensor([0.1, 0.4, 1.5, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, t1: relaxation.inversion_recovery(a, b, t1, ti), (a, b, t1))
    t2 = torch.tensor([0.05, 0.09], **d)
    assert torch.autograd.gradcheck(lambda a, t2: relaxation.t2_decay(a, t2, ti / 10), (a, t2))
