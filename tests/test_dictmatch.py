"""Generic dictionary matching (fitting.dictmatch): dictionary entries against direct simulator
calls, exact argmax against a brute-force search (ties included), chunked Gram SVD against the
direct SVD, Gauss–Newton refinement against off-grid truth."""

import numpy as np
import pytest
import torch

from bids_qmri.fitting import dictmatch
from bids_qmri.physics import epg, svd

SCHEDULE = epg.default_fisp_schedule(120)


def fisp(params):
    """params [n, 3] = (T1, T2, B1)."""
    return epg.fisp_mrf(params[:, 0], params[:, 1], params[:, 2], **SCHEDULE)


def grid_params():
    t1, t2, b1 = np.meshgrid([0.4, 0.9, 1.7, 3.1], [0.03, 0.08, 0.25], [0.8, 1.1], indexing="ij")
    return torch.from_numpy(np.stack([t1.ravel(), t2.ravel(), b1.ravel()], -1))


def test_dictionary_entries_equal_direct_fisp_calls():
    params = grid_params()
    d = dictmatch.simulate_dictionary(fisp, params, chunk=5, dtype=torch.complex128, progress=False)
    assert d.shape == (len(params), 120)
    for k in (0, 7, 13, len(params) - 1):  # one atom at a time, outside any chunk
        direct = epg.fisp_mrf(float(params[k, 0]), float(params[k, 1]), float(params[k, 2]), **SCHEDULE)
        torch.testing.assert_close(d[k], direct.to(torch.complex128), rtol=0, atol=1e-6)
    basis = svd.svd_basis(d, 6)
    projected = dictmatch.simulate_dictionary(fisp, params, basis=basis, chunk=4, dtype=torch.complex128,
                                              progress=False)
    torch.testing.assert_close(projected, d @ basis, rtol=1e-6, atol=1e-7)


def test_chunked_gram_basis_equals_direct_svd():
    params = grid_params().double()

    def sim(p):
        return epg.fisp_mrf(p[:, 0], p[:, 1], p[:, 2], **SCHEDULE)

    d = sim(params)
    gram = dictmatch.dictionary_gram(sim, params, chunk=7, progress=False)
    basis, sv, kept = svd.basis_from_gram(gram, energy=0.999)
    _, s_ref, vh_ref = np.linalg.svd(d.numpy(), full_matrices=False)
    energy = np.cumsum(s_ref**2) / np.sum(s_ref**2)
    rank = int(np.searchsorted(energy, 0.999) + 1)
    assert basis.shape == (120, rank) and kept >= 0.999 and kept == pytest.approx(energy[rank - 1], rel=1e-9)
    np.testing.assert_allclose(sv.numpy(), s_ref[:rank], rtol=1e-8)
    np.testing.assert_allclose(basis.numpy() @ basis.numpy().conj().T,
                               vh_ref[:rank].conj().T @ vh_ref[:rank], atol=1e-8)
    assert svd.rank_for_energy(torch.tensor([3.0, 4.0]), 0.64) == 2  # 9/25 < 0.64 <= 1
    assert svd.rank_for_energy(torch.tensor([4.0, 3.0]), 0.64) == 1


def brute_force(signals, atoms):
    """Index of the atom of greatest normalised power per signal, by explicit element-wise sums over
    the basis: bitwise-equal atoms get bitwise-equal scores wherever they sit. (A BLAS GEMM may round
    the columns of one product differently from block to block, which breaks exact ties.)"""
    inner = np.zeros((signals.shape[0], atoms.shape[0]), dtype=np.result_type(signals, atoms))
    energy = np.zeros(atoms.shape[0])
    for k in range(atoms.shape[1]):
        inner += signals[:, k, None] * atoms[None, :, k].conj()
        energy += np.abs(atoms[:, k]) ** 2
    power = np.abs(inner) ** 2 / energy
    return power.argmax(axis=1)  # numpy: first maximum on ties


#: Both implementations of ``dictmatch.match``: each is checked against brute force and the other.
BACKENDS = ["torch", "kernel"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_is_the_exact_argmax_of_a_brute_force_search(backend):
    rng = np.random.default_rng(5)
    atoms = rng.normal(size=(1000, 9)) + 1j * rng.normal(size=(1000, 9))
    signals = rng.normal(size=(300, 9)) + 1j * rng.normal(size=(300, 9))
    res = dictmatch.match(torch.from_numpy(signals), torch.from_numpy(atoms), voxel_chunk=37, atom_chunk=101,
                          backend=backend)
    assert res.backend == backend
    assert res.form == "complex"  # random complex atoms: stacked rank 2R, the complex search
    np.testing.assert_array_equal(res.index.numpy(), brute_force(signals, atoms))
    # scale: a scaled atom is recovered with its complex scale
    m0 = 2.5 * np.exp(1j * 0.7)
    res = dictmatch.match(torch.from_numpy(m0 * atoms[[3, 500]]), torch.from_numpy(atoms), backend=backend)
    np.testing.assert_array_equal(res.index.numpy(), [3, 500])
    np.testing.assert_allclose(res.scale.numpy(), [m0, m0], rtol=1e-12)
    np.testing.assert_allclose(res.score.numpy(), [1.0, 1.0], rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_atom_index_across_chunks(backend):
    # Atoms with entries ±1 ± i (norm exactly 4 at R = 8) and integer signals: every score is
    # computed exactly, whatever the GEMM blocking, so equal scores are true ties.
    rng = np.random.default_rng(11)
    atoms = rng.choice([-1.0, 1.0], size=(700, 8)) + 1j * rng.choice([-1.0, 1.0], size=(700, 8))
    atoms[[150, 420, 699]] = atoms[77]  # duplicates in later atom chunks
    signals = rng.integers(-3, 4, size=(400, 8)) + 1j * rng.integers(-3, 4, size=(400, 8))
    signals[:20] = 3 * atoms[77]
    expected = brute_force(signals, atoms)
    unit = atoms / 4.0
    power = np.abs(signals @ unit.conj().T) ** 2
    n_ties = int(((power == power.max(1, keepdims=True)).sum(1) > 1).sum())
    assert n_ties > 50  # the test really exercises ties
    for dtype in (torch.complex128, torch.complex64):
        a = torch.from_numpy(atoms).to(dtype)
        # float32 norms of 4 may round (vector_norm scales); exact unit atoms keep the ties exact
        norms = (a / 4.0, torch.full((700,), 4.0, dtype=a.real.dtype)) if dtype == torch.complex64 else None
        res = dictmatch.match(torch.from_numpy(signals).to(dtype), a, voxel_chunk=64, atom_chunk=100,
                              atom_norms=norms, backend=backend)
        np.testing.assert_array_equal(res.index.numpy(), expected)
    assert (res.index[:20] == 77).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_match_searches_only_the_signal_sub_dictionary(backend):
    rng = np.random.default_rng(2)
    atoms = rng.normal(size=(600, 6)) + 1j * rng.normal(size=(600, 6))
    signals = rng.normal(size=(200, 6)) + 1j * rng.normal(size=(200, 6))
    groups = rng.integers(-1, 3, size=200)
    slices = [slice(0, 250), slice(250, 251), slice(251, 600)]
    res = dictmatch.match(torch.from_numpy(signals), torch.from_numpy(atoms), groups=torch.from_numpy(groups),
                          atom_groups=slices, voxel_chunk=50, atom_chunk=64, backend=backend)
    for g, sl in enumerate(slices):
        rows = groups == g
        np.testing.assert_array_equal(res.index.numpy()[rows], sl.start + brute_force(signals[rows], atoms[sl]))
    assert (res.index.numpy()[groups < 0] == -1).all()
    # zero and non-finite signals are not matched
    bad = torch.from_numpy(signals[:3]).clone()
    bad[0] = 0
    bad[1, 2] = complex("nan")
    res = dictmatch.match(bad, torch.from_numpy(atoms), backend=backend)
    assert res.index.tolist()[:2] == [-1, -1] and res.index[2] >= 0


def test_gauss_newton_refinement_leaves_the_grid():
    # Noise-free fingerprints at off-grid values; the grid cell around each is the box.
    gen = torch.Generator().manual_seed(3)
    n = 40
    log_t1 = torch.empty(n, dtype=torch.float64).uniform_(np.log(0.5), np.log(2.5), generator=gen)
    log_t2 = torch.empty(n, dtype=torch.float64).uniform_(np.log(0.03), np.log(0.2), generator=gen)
    b1 = torch.empty(n, dtype=torch.float64).uniform_(0.8, 1.2, generator=gen)
    m0 = torch.exp(1j * torch.linspace(0, 3, n, dtype=torch.float64)) * 3.0
    signals = m0[:, None] * epg.fisp_mrf(log_t1.exp(), log_t2.exp(), b1, **SCHEDULE)
    cell = 0.2  # log units: a coarse grid
    x0 = torch.stack([torch.floor(log_t1 / cell) * cell, torch.floor(log_t2 / cell) * cell], -1)

    def sim(x, b):
        return epg.fisp_mrf(x[:, 0].exp(), x[:, 1].exp(), b[:, 0], **SCHEDULE)

    res = dictmatch.refine_gauss_newton(sim, signals, x0, x0, x0 + cell, fixed=b1[:, None], iterations=6, chunk=17)
    x = res.x
    truth = torch.stack([log_t1, log_t2], -1)
    assert (x0 - truth).abs().max() > 0.05
    assert (x - truth).abs().max() < 1e-3
    assert (res.cost <= res.start_cost).all() and ((x >= x0) & (x <= x0 + cell)).all()
    torch.testing.assert_close(res.scale, m0, rtol=1e-3, atol=0)
    # chord method (Jacobian of the start kept): slower convergence, same minimum
    chord = dictmatch.refine_gauss_newton(sim, signals, x0, x0, x0 + cell, fixed=b1[:, None], iterations=12,
                                          update_jacobian=False)
    assert (chord.x - truth).abs().max() < 1e-3 and (chord.cost <= chord.start_cost).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_atoms_take_the_stacked_real_gemm_and_keep_the_exact_argmax_and_ties(backend):
    # Real atoms (FISP fingerprints on a real basis) go through one real GEMM of [Re s; Im s]:
    # the same argmax as brute force, ties to the lowest index across atom chunks.
    rng = np.random.default_rng(8)
    atoms = rng.normal(size=(900, 7))
    signals = rng.normal(size=(250, 7)) + 1j * rng.normal(size=(250, 7))
    res = dictmatch.match(torch.from_numpy(signals), torch.from_numpy(atoms + 0j), voxel_chunk=41, atom_chunk=97,
                          backend=backend)
    np.testing.assert_array_equal(res.index.numpy(), brute_force(signals, atoms + 0j))
    m0 = 1.5 * np.exp(-1j * 2.0)
    res = dictmatch.match(torch.from_numpy(m0 * atoms[[5, 800]]), torch.from_numpy(atoms), backend=backend)  # real dtype
    np.testing.assert_array_equal(res.index.numpy(), [5, 800])
    np.testing.assert_allclose(res.scale.numpy(), [m0, m0], rtol=1e-12)
    # ties: ±1 atoms (norm exactly 4 at R = 16), integer signals, duplicates in later chunks
    tie_atoms = rng.choice([-1.0, 1.0], size=(500, 16))
    tie_atoms[[130, 499]] = tie_atoms[12]
    tie_sig = rng.integers(-3, 4, size=(300, 16)) + 1j * rng.integers(-3, 4, size=(300, 16))
    tie_sig[:10] = (2 - 1j) * tie_atoms[12]
    # exact integer arithmetic for the truth (|z|² through abs() would round: sqrt then square)
    power = (tie_sig.real @ tie_atoms.T) ** 2 + (tie_sig.imag @ tie_atoms.T) ** 2
    expected = power.argmax(axis=1)  # numpy: first maximum on ties
    assert int(((power == power.max(1, keepdims=True)).sum(1) > 1).sum()) > 30
    a = torch.from_numpy(tie_atoms).to(torch.complex64)
    res = dictmatch.match(torch.from_numpy(tie_sig).to(torch.complex64), a, voxel_chunk=64, atom_chunk=100,
                          atom_norms=(a / 4.0, torch.full((500,), 4.0)), backend=backend)
    np.testing.assert_array_equal(res.index.numpy(), expected)
    assert (res.index[:10] == 12).all()


def fisp_on_a_complex_basis(rank=6, n_t1=24, n_t2=18, seed=13):
    """FISP atoms (float32) on a random complex rotation ``C = B Q`` of their own real SVD basis
    ``B`` (a real dictionary on a complex basis spanning a real subspace), and ``C``."""
    t1, t2 = np.meshgrid(np.geomspace(0.3, 3.0, n_t1), np.geomspace(0.02, 0.4, n_t2), indexing="ij")
    keep = t2 < t1
    t1, t2 = torch.from_numpy(t1[keep]), torch.from_numpy(t2[keep])
    frames = epg.fisp_mrf(t1, t2, torch.ones_like(t1), **SCHEDULE)
    basis = svd.svd_basis(frames, rank).to(torch.complex128)
    gen = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.complex(torch.randn(rank, rank, dtype=torch.float64, generator=gen),
                                             torch.randn(rank, rank, dtype=torch.float64, generator=gen)))[0]
    complex_basis = basis @ rotation
    return (frames.to(torch.complex128) @ complex_basis).to(torch.complex64), complex_basis


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_dictionary_on_a_complex_basis_is_searched_as_real_atoms_with_the_exact_argmax(backend):
    # Complex atoms of real rank R: d̂ = x M with x real; ⟨d̂, s⟩ = x · (conj(M) s), so the real
    # search on x gives the argmax of the complex one. Checked against a float64 brute-force
    # search and against the direct complex path, with duplicate atoms (ties) in later positions.
    atoms, complex_basis = fisp_on_a_complex_basis()
    assert atoms.imag.abs().amax() > 0.1 * atoms.abs().amax()  # really complex atoms
    n_atoms = atoms.shape[0]
    atoms = torch.cat([atoms, atoms[[40, 41, 40]]])  # duplicates at n, n+1, n+2
    prep = dictmatch.prepare_atoms(atoms)
    assert prep.form == "factored" and prep.residual <= dictmatch.FACTOR_TOLERANCE[torch.complex64]
    assert prep.real_atoms.dtype == torch.float32 and not prep.real_atoms.is_complex()
    # the algebra: d̂ = x M, and the duplicates' real rows are bitwise equal
    torch.testing.assert_close(prep.real_atoms.to(torch.complex128) @ prep.basis_change,
                               prep.unit.to(torch.complex128), rtol=0, atol=1e-6)
    assert torch.equal(prep.real_atoms[n_atoms], prep.real_atoms[40])
    assert torch.equal(prep.real_atoms[n_atoms + 1], prep.real_atoms[41])
    gen = torch.Generator().manual_seed(5)
    n = 400
    t1 = torch.empty(n, dtype=torch.float64).uniform_(0.4, 2.5, generator=gen)
    t2 = torch.empty(n, dtype=torch.float64).uniform_(0.03, 0.3, generator=gen)
    clean = epg.fisp_mrf(t1, t2, torch.ones(n, dtype=torch.float64), **SCHEDULE) @ complex_basis
    noise = torch.complex(torch.randn(clean.shape, dtype=torch.float64, generator=gen),
                          torch.randn(clean.shape, dtype=torch.float64, generator=gen))
    phase = torch.exp(1j * 6.0 * torch.rand(n, dtype=torch.float64, generator=gen))
    signals = phase[:, None] * clean + 0.02 * clean.abs().amax(1, keepdim=True) * noise
    signals[:6] = (1.5 - 2j) * atoms[[40, 41, 40, 41, 0, n_atoms - 1]].to(torch.complex128)  # exact ties
    signals = signals.to(torch.complex64)
    res = dictmatch.match(signals, atoms, backend=backend, voxel_chunk=97, atom_chunk=61)
    direct = dictmatch.match(signals, atoms, prepared=dictmatch.prepare_atoms(atoms, factor=False),
                             backend=backend, voxel_chunk=97, atom_chunk=61)
    assert res.form == "factored" and direct.form == "complex" and res.backend == backend
    expected = brute_force(signals.numpy().astype(np.complex128), atoms.numpy().astype(np.complex128))
    np.testing.assert_array_equal(res.index.numpy(), expected)
    np.testing.assert_array_equal(direct.index.numpy(), expected)
    assert res.index[:6].tolist() == [40, 41, 40, 41, 0, n_atoms - 1]  # duplicates never win
    torch.testing.assert_close(res.scale, direct.scale)  # scale and score from the original atoms
    torch.testing.assert_close(res.score, direct.score)


def test_atoms_off_real_rank_r_take_the_complex_search():
    # Random complex atoms (stacked rank 2R) and factorable atoms perturbed above the tolerance
    # both fall back to the complex search, which still equals brute force.
    rng = np.random.default_rng(3)
    random_atoms = torch.from_numpy(rng.normal(size=(500, 6)) + 1j * rng.normal(size=(500, 6))).to(torch.complex64)
    atoms, _ = fisp_on_a_complex_basis(n_t1=12, n_t2=10)
    bump = torch.from_numpy(1e-3 * (rng.normal(size=atoms.shape) + 1j * rng.normal(size=atoms.shape)))
    perturbed = (atoms.to(torch.complex128) * (1 + bump)).to(torch.complex64)
    signals = torch.from_numpy(rng.normal(size=(200, 6)) + 1j * rng.normal(size=(200, 6))).to(torch.complex64)
    for a in (random_atoms, perturbed):
        prep = dictmatch.prepare_atoms(a)
        assert prep.form == "complex" and prep.residual > dictmatch.FACTOR_TOLERANCE[torch.complex64]
        for backend in BACKENDS:
            res = dictmatch.match(signals, a, prepared=prep, backend=backend)
            assert res.form == "complex"
            np.testing.assert_array_equal(res.index.numpy(), brute_force(signals.numpy().astype(np.complex128),
                                                                         a.numpy().astype(np.complex128)))
    # a real dictionary times one global phase is factored too; exactly real atoms stay "real"
    assert dictmatch.prepare_atoms(atoms.real * np.exp(0.3j)).form == "factored"
    assert dictmatch.prepare_atoms(atoms.real + 0j).form == "real"


def test_lagrange_weights_reproduce_polynomials():
    u = torch.tensor([-0.3, 0.0, 1.7, 3.2], dtype=torch.float64)
    for n in (4, 5):
        w = dictmatch.lagrange_weights(u, n)
        k = torch.arange(n, dtype=torch.float64)
        for deg in range(n):
            torch.testing.assert_close((w * k ** deg).sum(-1), u ** deg, rtol=1e-12, atol=1e-12)


def _grid_model(a, b, c, t):
    """A smooth non-linear signal family (decay a, frequency b, a fixed 'B1-like' c)."""
    return torch.exp(-t * a[..., None]) * torch.exp(1j * b[..., None] * c[..., None] * t) * (1 + 0.3 * c[..., None] * t)


def test_refinement_on_the_dictionary_interpolant_recovers_off_grid_parameters():
    t = torch.linspace(0, 1.5, 16, dtype=torch.float64)
    ga, gb, gc = torch.linspace(0.2, 2.0, 25), torch.linspace(0.5, 3.0, 21), torch.linspace(0.6, 1.4, 9)
    A, B, C = torch.meshgrid(ga, gb, gc, indexing="ij")
    present = torch.ones(A.shape, dtype=torch.bool)
    present[:, :, 2] = False  # a missing fixed-axis slice
    present[24, 0, :] = False  # a missing node (at the corner: off the stencils of the others)
    atoms = _grid_model(A[present].double(), B[present].double(), C[present].double(), t)
    node_index = torch.full(A.shape, -1, dtype=torch.long)
    node_index[present] = torch.arange(int(present.sum()))
    gen = torch.Generator().manual_seed(4)
    n = 300
    u = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    a = 0.4 + 1.4 * u[:, 0]
    b = 0.8 + 2.0 * u[:, 1]
    c = 1.0 + 0.35 * u[:, 2]  # off the slice values; the missing slice 0.8 is off their stencils
    m0 = 2.0 * torch.exp(1j * 6.0 * u[:, 0])
    signals = m0[:, None] * _grid_model(a, b, c, t)
    pos = torch.stack([(a - 0.2) / 0.075, (b - 0.5) / 0.125, (c - 0.6) / 0.1], 1)
    start = torch.cat([pos[:, :2].round(), pos[:, 2:]], 1)
    start[0, 0], start[0, 1] = 24.0, 1.0  # a stencil through the missing node
    res, ok = dictmatch.refine_on_grid(signals, atoms, node_index, start, (True, True, False), iterations=6,
                                       chunk=128)
    assert not ok[0] and ok[1:].all()
    err = (res.x[ok] - pos[ok, :2]).abs()
    grid_err = (start[ok, :2] - pos[ok, :2]).abs()
    # measured: 0.0042 of a cell at worst (the cubic interpolation along the fixed axis dominates)
    assert grid_err.max() > 0.3 and err.max() < 0.01 and err.median() < 0.002, err.max()
    torch.testing.assert_close(res.scale[ok], m0[ok], rtol=1e-3, atol=0)
    assert (res.cost[ok] <= res.start_cost[ok]).all()
    torch.testing.assert_close(res.x[0], start[0, :2])  # not refined: left at the start
    # a fixed coordinate whose stencil holds the missing slice, or outside the grid, is not ok
    bad = start[1:4].clone()
    bad[0, 2], bad[1, 2], bad[2, 2] = 1.5, -0.1, 8.5
    _, ok_bad = dictmatch.refine_on_grid(signals[1:4], atoms, node_index, bad, (True, True, False))
    assert ok_bad.tolist() == [False, False, False]
