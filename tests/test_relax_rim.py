"""RIM and ResNet of seed 004 (bids_qmri.modalities.relax.rim) against independent truth.

The likelihood gradient the RIM sees is checked against the hand-derived derivative of the
magnitude models and against central finite differences; shapes for any series length; a
tiny overfit shows the whole chain (physics gradient → cell → updates → eq. 6 loss) learns.
"""


import pytest
import torch

from bids_qmri.modalities.relax import rim
from bids_qmri.nets.io import load_net, save_net

TI = torch.tensor([0.1, 0.3, 0.6, 1.0, 1.6, 2.5], dtype=torch.float64)
TE = torch.tensor([0.010, 0.020, 0.040, 0.080, 0.160, 0.320], dtype=torch.float64)


def _maps(kind, shape, gen):
    """Off-grid parameters in physical units [batch, Q, H, W] (float64)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if kind == "ir":
        return torch.stack([u(0.4, 1.1), u(1.55, 1.98), u(0.45, 3.3)], 1)
    return torch.stack([u(0.4, 1.1), u(0.035, 1.7)], 1)


@pytest.mark.parametrize("kind,n", [("ir", 3), ("ir", 23), ("ir", 31), ("t2", 2), ("t2", 6), ("t2", 17)])
def test_rim_shapes_for_any_series_length(kind, n):
    torch.manual_seed(0)
    net = rim.RIM(kind, hidden=8, steps=3)
    times = torch.linspace(0.05, 2.0, n)
    out = net(torch.rand(2, n, 9, 11), times)
    q = len(rim.PARAMETERS[kind])
    assert out.shape == (3, 2, q, 9, 11)
    assert torch.isfinite(out).all()


def test_resnet_shapes_and_series_length_error():
    torch.manual_seed(0)
    net = rim.RelaxResNet("ir", n_times=7, channels=(8, 16, 8), width=8)
    assert net(torch.rand(3, 7, 10, 12)).shape == (1, 3, 3, 10, 12)
    with pytest.raises(ValueError, match="trained for 7 time points"):
        net(torch.rand(3, 6, 10, 12))
    with pytest.raises(ValueError, match="unknown relaxometry model"):
        rim.RIM("t1rho")


def _analytic_ir_gradient(kappa, signal, ti):
    a, b, u = kappa[:, 0, ..., None], kappa[:, 1, ..., None], kappa[:, 2, ..., None]
    t1 = torch.exp(u)
    e = torch.exp(-ti / t1)
    g = a * (1 - b * e)
    s = torch.sign(g)
    r = (g.abs() - signal.permute(0, 2, 3, 1))
    n = ti.numel()
    da = (r * s * (1 - b * e)).sum(-1) / n
    db = (r * s * (-a * e)).sum(-1) / n
    du = (r * s * (-a * b * e * ti / t1)).sum(-1) / n  # d/dlnT1 of e^{-TI/T1} = e·TI/T1
    return torch.stack([da, db, du], 1)


def test_ir_likelihood_gradient_equals_the_analytic_derivative():
    gen = torch.Generator().manual_seed(3)
    truth = _maps("ir", (2, 5, 4), gen)
    signal = rim.signal_model(rim.to_network(truth, "ir"), TI, "ir")
    signal = signal + 0.02 * torch.randn(signal.shape, generator=gen, dtype=torch.float64)
    kappa = rim.to_network(_maps("ir", (2, 5, 4), gen), "ir")  # a point away from the truth
    grad = rim.nll_gradient(kappa, signal, TI, "ir")
    expected = _analytic_ir_gradient(kappa, signal, TI)
    assert expected.abs().max() > 1e-3  # not a trivially zero comparison
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_scaled_gradient_is_the_gradient_over_the_gauss_newton_diagonal():
    """The RIM's gradient input divided per parameter by mean_n (df_n/dκ_q)² + damping, with the
    hand-derived Jacobian of the IR magnitude model in network coordinates (A, B, ln T1)."""
    gen = torch.Generator().manual_seed(5)
    truth = _maps("ir", (2, 4, 3), gen)
    signal = rim.signal_model(rim.to_network(truth, "ir"), TI, "ir")
    signal = signal + 0.02 * torch.randn(signal.shape, generator=gen, dtype=torch.float64)
    kappa = rim.to_network(_maps("ir", (2, 4, 3), gen), "ir")
    a, b, u = kappa[:, 0, ..., None], kappa[:, 1, ..., None], kappa[:, 2, ..., None]
    e = torch.exp(-TI / torch.exp(u))
    s = torch.sign(a * (1 - b * e))
    jac = torch.stack([s * (1 - b * e), -s * a * e, -s * a * b * e * TI / torch.exp(u)], 1)  # [B, Q, H, W, N]
    curvature = (jac**2).mean(-1)
    expected = _analytic_ir_gradient(kappa, signal, TI) / (curvature + 0.05)
    got = rim.scaled_nll_gradient(kappa, signal, TI, "ir", damping=0.05)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # and the T2 model: for A alone the scaled gradient is the exact least-squares step
    te_truth = _maps("t2", (1, 3, 3), gen)
    k = rim.to_network(te_truth, "t2")
    sig = rim.signal_model(k, TE, "t2")
    off = k.clone()
    off[:, 0] *= 1.3  # A wrong by 30 %, T2 right: the damping-free step along A lands on the truth
    step = rim.scaled_nll_gradient(off, sig, TE, "t2", damping=0.0)
    torch.testing.assert_close(off[:, 0] - step[:, 0], k[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,times", [("ir", TI), ("t2", TE)])
def test_likelihood_gradient_equals_finite_differences(kind, times):
    gen = torch.Generator().manual_seed(4)
    signal = rim.signal_model(rim.to_network(_maps(kind, (1, 3, 3), gen), kind), times, kind)
    kappa = rim.to_network(_maps(kind, (1, 3, 3), gen), kind)
    grad = rim.nll_gradient(kappa, signal, times, kind)

    def nll(k):
        return 0.5 * ((rim.signal_model(k, times, kind) - signal) ** 2).mean(1)

    h = 1e-6
    for q in range(kappa.shape[1]):
        step = torch.zeros_like(kappa)
        step[:, q] = h
        fd = (nll(kappa + step) - nll(kappa - step)) / (2 * h)
        torch.testing.assert_close(grad[:, q], fd, rtol=1e-6, atol=1e-10)


def test_initial_estimate_is_the_seed_start_and_coordinates_round_trip():
    gen = torch.Generator().manual_seed(5)
    s = torch.rand(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    k0 = rim.to_physical(rim.initial_estimate(s, "ir"), "ir")
    torch.testing.assert_close(k0[:, 0], s.amax(1))
    assert torch.all(k0[:, 1] == 2.0)
    torch.testing.assert_close(k0[:, 2], torch.ones_like(k0[:, 2]))
    k0 = rim.to_physical(rim.initial_estimate(s, "t2"), "t2")
    torch.testing.assert_close(k0[:, 1], torch.full_like(k0[:, 1], 0.1))
    p = _maps("t2", (1, 3, 3), gen)
    torch.testing.assert_close(rim.to_physical(rim.to_network(p, "t2"), "t2"), p)


def test_signal_scale_is_the_median_of_the_maximum_over_the_mask():
    s = torch.zeros(1, 3, 2, 2)
    s[0, :, 0, 0] = torch.tensor([1.0, 4.0, 2.0])
    s[0, :, 0, 1] = torch.tensor([3.0, 0.5, 0.5])
    s[0, :, 1, 0] = torch.tensor([9.0, 9.0, 9.0])
    mask = torch.tensor([[[True, True], [False, False]]])
    assert float(rim.signal_scale(s, mask)[0]) == pytest.approx(3.0)  # torch median: lower of (3, 4)
    assert float(rim.signal_scale(torch.zeros(1, 3, 2, 2))[0]) == 1.0


def test_rim_loss_weights_voxels_and_averages_steps():
    target = torch.zeros(1, 2, 2, 2)
    est = torch.zeros(2, 1, 2, 2, 2)
    est[0, 0, :, 0, 0] = 2.0  # step 1, voxel (0, 0): squared error 4 in both parameters
    weight = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(rim.rim_loss(est, target, weight)) == pytest.approx(4.0 / 2)  # mean over 2 steps
    assert float(rim.rim_loss(est, target)) == pytest.approx(8.0 / 16)
    # per-parameter weights multiply each parameter's squared error: (3·4 + 1·4) / 2 steps / 2 parameters
    assert float(rim.rim_loss(est, target, weight, (3.0, 1.0))) == pytest.approx(16.0 / 4)
    assert float(rim.rim_loss(est, target, weight, (1.0, 1.0))) == pytest.approx(4.0 / 2)


def test_rim_loss_voxel_weight_changes_only_the_weighted_voxels_terms():
    """voxel_weight: all 1 gives eq. 6 exactly; W on some voxels multiplies only their squared
    errors, the divisor (loss voxels × steps × parameters) stays; checked against a hand sum."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    est = torch.rand(5, 2, 3, 4, 4, generator=gen, dtype=torch.float64)
    head = torch.ones(2, 4, 4, dtype=torch.float64)
    head[0, 0, :] = 0.0  # 4 voxels outside the loss
    pw = (1.0, 10.0, 1.0)
    ones = torch.ones(2, 4, 4, dtype=torch.float64)
    for w, p in ((head, pw), (head, None), (None, None)):
        assert torch.equal(rim.rim_loss(est, target, w, p, ones), rim.rim_loss(est, target, w, p))
    marked = torch.zeros(2, 4, 4, dtype=torch.bool)
    marked[0, 2, 1] = marked[1, 3, 3] = marked[0, 0, 2] = True  # the last one is outside the loss voxels
    vw = torch.where(marked, 30.0, 1.0).to(torch.float64)
    # hand sum: every (step, patch, parameter, voxel) term, ×30 on the marked voxels, × B's 10
    total = 0.0
    for j in range(5):
        for b in range(2):
            for q in range(3):
                for r in range(4):
                    for c in range(4):
                        if head[b, r, c] == 0:
                            continue
                        term = float(est[j, b, q, r, c] - target[b, q, r, c]) ** 2 * pw[q]
                        total += term * (30.0 if marked[b, r, c] else 1.0)
    expected = total / (float(head.sum()) * 5 * 3)
    assert float(rim.rim_loss(est, target, head, pw, vw)) == pytest.approx(expected, rel=1e-12)
    # the difference is exactly 29 × the marked loss voxels' terms
    diff = float(rim.rim_loss(est, target, head, pw, vw) - rim.rim_loss(est, target, head, pw))
    sq = ((est - target[None]) ** 2 * torch.tensor(pw, dtype=torch.float64)[:, None, None])
    own = float(sq[:, 0, :, 2, 1].sum() + sq[:, 1, :, 3, 3].sum())
    assert diff == pytest.approx(29.0 * own / (float(head.sum()) * 5 * 3), rel=1e-12)


def test_rim_loss_bias_term_against_a_hand_loop():
    """bias_weight λ: eq. 6 (with the B and voxel weights) + λ × the mean over steps, patches and
    parameters of the squared mean error over each patch's loss voxels, checked against a hand loop;
    λ = 0 is today's loss bit for bit; voxels outside the loss voxels do not enter the bias."""
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(3, 3, 4, 5, generator=gen, dtype=torch.float64)
    est = target[None] + 0.3 * torch.randn(4, 3, 3, 4, 5, generator=gen, dtype=torch.float64) + 0.05
    head = torch.ones(3, 4, 5, dtype=torch.float64)
    head[0, 0, :] = 0.0
    head[2, :, 3:] = 0.0
    pw = (1.0, 10.0, 1.0)
    vw = torch.ones(3, 4, 5, dtype=torch.float64)
    vw[1, 2, 2] = vw[2, 0, 0] = 300.0
    patch_w = (1.0, 0.25, 1 / 39.2)  # (σ_min/σ)^1 at SNR 100, 25, 2.55
    patch_w_t = torch.tensor(patch_w, dtype=torch.float64)
    for w, p, v in ((head, pw, vw), (head, None, None), (None, pw, None), (None, None, None)):
        base = rim.rim_loss(est, target, w, p, v)
        assert torch.equal(rim.rim_loss(est, target, w, p, v, bias_weight=0.0), base)
        mask = torch.ones(3, 4, 5, dtype=torch.float64) if w is None else w
        squares = []
        for j in range(4):
            for b in range(3):
                for q in range(3):
                    s = n = 0.0
                    for r in range(4):
                        for c in range(5):
                            if mask[b, r, c]:
                                s += float(est[j, b, q, r, c] - target[b, q, r, c])
                                n += 1
                    squares.append((s / n) ** 2)
        hand = sum(squares) / len(squares)  # no parameter or voxel weights in the bias term
        assert float(rim.patch_bias_term(est, target, w)) == pytest.approx(hand, rel=1e-12)
        for lam in (0.5, 7.0):
            got = float(rim.rim_loss(est, target, w, p, v, bias_weight=lam))
            assert got == pytest.approx(float(base) + lam * hand, rel=1e-12)
        # a patch weight (the trainer's SNR weight) multiplies each patch's squares, same divisor
        hand_pw = sum(sq * patch_w[(i // 3) % 3] for i, sq in enumerate(squares)) / len(squares)
        assert float(rim.patch_bias_term(est, target, w, None, patch_w_t)) == pytest.approx(hand_pw, rel=1e-12)
        assert float(rim.rim_loss(est, target, w, p, v, bias_weight=2.0, bias_patch_weight=patch_w_t)) == \
            pytest.approx(float(base) + 2.0 * hand_pw, rel=1e-12)
        assert torch.equal(rim.patch_bias_term(est, target, w, None, torch.ones(3, dtype=torch.float64)),
                           rim.patch_bias_term(est, target, w))
        assert torch.equal(rim.rim_loss(est, target, w, p, v, bias_patch_weight=patch_w_t), base)  # λ = 0
    outside = est.clone()
    outside[:, 0, :, 0, :] += 5.0  # only voxels outside patch 0's loss voxels
    assert float(rim.patch_bias_term(outside, target, head)) == pytest.approx(float(rim.patch_bias_term(est, target, head)),
                                                                                rel=1e-12)


def test_rim_loss_constant_offset_raises_the_bias_term_by_its_square():
    """Estimates whose error has zero mean over every patch's loss voxels have no bias term; shifting
    them by a constant c adds c² (λc² to the loss) — or c²/Q when only one of the Q parameters shifts —
    while eq. 6 (no weights) rises by the same c² the MSE's bias² part predicts."""
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    head = torch.ones(2, 6, 6, dtype=torch.float64)
    head[1, :2, :] = 0.0
    e = torch.randn(5, 2, 3, 6, 6, generator=gen, dtype=torch.float64)
    e = e * head[None, :, None]
    e = e - (e.sum((-2, -1), keepdim=True) / head.sum((-2, -1))[None, :, None, None, None]) * head[None, :, None]
    zero_mean = target[None] + e
    assert float(rim.patch_bias_term(zero_mean, target, head)) < 1e-28
    c, lam = 0.04, 25.0
    eq6 = float(rim.rim_loss(zero_mean, target, head))
    shifted = zero_mean + c
    assert float(rim.patch_bias_term(shifted, target, head)) == pytest.approx(c * c, rel=1e-9)
    assert float(rim.rim_loss(shifted, target, head)) == pytest.approx(eq6 + c * c, rel=1e-9)
    assert float(rim.rim_loss(shifted, target, head, bias_weight=lam)) == pytest.approx(eq6 + c * c + lam * c * c,
                                                                                       rel=1e-9)
    one = zero_mean.clone()
    one[:, :, 2] += c  # T only
    assert float(rim.patch_bias_term(one, target, head)) == pytest.approx(c * c / 3, rel=1e-9)


def test_patch_bias_term_per_group_against_a_hand_loop():
    """bias_groups: the mean error per patch and label (labels < 0 and non-loss voxels left out),
    squared, weighted by the pair's voxel count, averaged over steps and parameters — checked against a
    hand loop; two groups whose biases cancel in the patch mean keep their bias here."""
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    est = target[None] + 0.2 * torch.randn(3, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    head = torch.ones(2, 4, 5, dtype=torch.float64)
    head[1, 0, :] = 0.0
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[0, 3, :] = -1  # outside every tissue
    labels[1, :, 4] = 4  # label 3 absent: a missing label counts nothing
    patch_w = (1.0, 0.1)
    num = num_pw = den = 0.0
    for b in range(2):
        for g in range(5):
            voxels = [(r, c) for r in range(4) for c in range(5) if head[b, r, c] and labels[b, r, c] == g]
            if not voxels:
                continue
            for j in range(3):
                for q in range(3):
                    m = sum(float(est[j, b, q, r, c] - target[b, q, r, c]) for r, c in voxels) / len(voxels)
                    num += len(voxels) * m * m
                    num_pw += patch_w[b] * len(voxels) * m * m
            den += len(voxels)
    hand = num / (den * 3 * 3)
    assert float(rim.patch_bias_term(est, target, head, labels)) == pytest.approx(hand, rel=1e-12)
    # a patch weight multiplies its pairs' squares, the divisor (voxel count) unchanged
    pw_t = torch.tensor(patch_w, dtype=torch.float64)
    assert float(rim.patch_bias_term(est, target, head, labels, pw_t)) == pytest.approx(num_pw / (den * 3 * 3), rel=1e-12)
    assert float(rim.rim_loss(est, target, head, (1.0, 10.0, 1.0), bias_weight=3.0, bias_groups=labels,
                              bias_patch_weight=pw_t)) == \
        pytest.approx(float(rim.rim_loss(est, target, head, (1.0, 10.0, 1.0))) + 3.0 * num_pw / (den * 3 * 3), rel=1e-12)
    assert torch.equal(rim.patch_bias_term(est, target, head, labels, torch.ones(2, dtype=torch.float64)),
                       rim.patch_bias_term(est, target, head, labels))
    base = rim.rim_loss(est, target, head, (1.0, 10.0, 1.0))
    assert float(rim.rim_loss(est, target, head, (1.0, 10.0, 1.0), bias_weight=3.0, bias_groups=labels)) == \
        pytest.approx(float(base) + 3.0 * hand, rel=1e-12)
    # opposite biases in two halves of a patch: zero per patch, c² per group
    split = torch.zeros(1, 4, 4, dtype=torch.long)
    split[0, :, 2:] = 1
    t = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    e = (0.03 - 0.06 * split.to(torch.float64))[None, :, None]
    assert float(rim.patch_bias_term(e, t)) == pytest.approx(0.0, abs=1e-30)
    assert float(rim.patch_bias_term(e, t, None, split)) == pytest.approx(0.03**2, rel=1e-12)


def _overfit(net, signal, target, times, steps):
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = rim.rim_loss(net(signal, times), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("make", [lambda: rim.RIM("ir", hidden=12, steps=3),
                                  lambda: rim.RelaxResNet("ir", n_times=6, channels=(12, 12), width=12)],
                         ids=["rim", "resnet"])
def test_tiny_overfit(make):
    """One fixed noisy batch: the loss of eq. 6 falls tenfold and the T1 error shrinks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    truth = _maps("ir", (2, 8, 8), gen).float()
    ti = TI.float()
    signal = rim.signal_model(rim.to_network(truth, "ir"), ti, "ir")
    signal = signal + 0.01 * torch.randn(signal.shape, generator=gen)
    target = rim.to_network(truth, "ir")
    net = make()
    losses = _overfit(net, signal, target, ti, 150)
    assert min(losses[-10:]) < 0.1 * losses[0]
    with torch.no_grad():
        t1 = rim.to_physical(net(signal, ti)[-1], "ir")[:, 2]
    assert float((t1 / truth[:, 2] - 1).abs().median()) < 0.1


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    for net in (rim.RIM("t2", hidden=6, steps=2), rim.RelaxResNet("t2", n_times=6, channels=(6,), width=6)):
        net.eval()
        x = torch.rand(1, 6, 5, 5)
        path = save_net(net, tmp_path / f"{type(net).__name__}.safetensors")
        back = load_net(path)
        assert back.config() == net.config()
        torch.testing.assert_close(back(x, TE.float()), net(x, TE.float()))
