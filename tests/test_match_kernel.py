"""The fused matching kernel (fitting.match_kernel) against brute force and against the torch GEMM
path of fitting.dictmatch.match: ties inside one tile and across tiles, padded ranks, FISP
fingerprints (real atoms) with a B1 sub-dictionary per voxel, thread-count independence, and a
read-only file system (no numba cache folder)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bids_qmri.fitting import dictmatch, match_kernel
from bids_qmri.physics import epg, svd


def exact_power(signals, atoms):
    """``|⟨d, s⟩|²`` in exact integer arithmetic (integer-valued inputs; numpy float64 is exact below 2⁵³)."""
    re = signals.real @ atoms.real.T + signals.imag @ atoms.imag.T
    im = signals.imag @ atoms.real.T - signals.real @ atoms.imag.T
    return re**2 + im**2


def test_ties_inside_a_tile_and_across_tiles_go_to_the_lowest_index():
    # ±1 (± i) atoms of equal norm, integer signals: every score is exact, so equal scores are
    # true ties; tiles of 16 atoms put duplicates both in the winner's own tile and in later ones.
    rng = np.random.default_rng(21)
    for complex_atoms, dtype in ((False, np.complex128), (True, np.complex64)):
        atoms = rng.choice([-1.0, 1.0], size=(200, 5)) + (1j * rng.choice([-1.0, 1.0], size=(200, 5))
                                                          if complex_atoms else 0)
        atoms[[19, 20, 33, 199]] = atoms[18]  # same tile (16–31), later tiles
        signals = rng.integers(-3, 4, size=(150, 5)) + 1j * rng.integers(-3, 4, size=(150, 5))
        signals[:8] = (2 + 1j) * atoms[18]
        power = exact_power(signals, atoms)
        expected = power.argmax(axis=1)  # numpy: the first maximum
        assert int(((power == power.max(1, keepdims=True)).sum(1) > 1).sum()) > 30  # ties really occur
        # atoms of one common norm, passed unscaled: the argmax is that of the unit atoms, and
        # integer arithmetic stays exact (a division by √5 would round and split the ties)
        got = match_kernel.best_atoms(signals.astype(dtype), atoms.astype(dtype), tile=16)
        np.testing.assert_array_equal(got, expected)
        assert (got[:8] <= 18).all() and not np.isin(got, [19, 20, 33, 199]).any()  # duplicates never win


def test_padded_rank_and_the_last_partial_tile_change_nothing():
    # rank 5 runs as 8 (zero padding), 203 atoms leave a partial last tile; the winner may sit there
    rng = np.random.default_rng(4)
    atoms = rng.normal(size=(203, 5)) + 1j * rng.normal(size=(203, 5))
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    signals = rng.normal(size=(90, 5)) + 1j * rng.normal(size=(90, 5))
    signals[:3] = 4.0 * unit[[200, 201, 202]]
    got = match_kernel.best_atoms(signals, unit, tile=32)
    np.testing.assert_array_equal(got, np.abs(signals @ unit.conj().T).argmax(1))
    assert got[:3].tolist() == [200, 201, 202]
    assert match_kernel.padded_rank(5) == 8 and match_kernel.padded_rank(8) == 8 and match_kernel.padded_rank(1) == 4


def test_fisp_fingerprints_with_a_b1_sub_dictionary_per_voxel_match_the_torch_path_and_brute_force():
    # The app's case: real FISP atoms on a real SVD basis, float32, each voxel searched only in the
    # sub-dictionary at its own B1; noisy fingerprints at off-grid values.
    sched = epg.default_fisp_schedule(120)
    t1, t2 = np.meshgrid(np.geomspace(0.3, 3.0, 24), np.geomspace(0.02, 0.4, 18), indexing="ij")
    keep = t2 < t1
    t1, t2 = t1[keep], t2[keep]
    b1_values = (0.9, 1.0, 1.1)
    frames = torch.cat([epg.fisp_mrf(torch.from_numpy(t1), torch.from_numpy(t2), torch.full((len(t1),), b), **sched)
                        for b in b1_values])
    basis = svd.svd_basis(frames, 6)
    atoms = (frames @ basis).to(torch.complex64)
    assert not atoms.imag.any()  # FISP on a real basis: real atoms
    slices = [slice(k * len(t1), (k + 1) * len(t1)) for k in range(len(b1_values))]
    gen = torch.Generator().manual_seed(7)
    n = 400
    groups = torch.randint(0, 3, (n,), generator=gen)
    t1v = torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.5, generator=gen)
    t2v = torch.empty(n, dtype=torch.float64).uniform_(0.03, 0.2, generator=gen)
    b1v = torch.tensor(b1_values, dtype=torch.float64)[groups] + 0.02
    clean = epg.fisp_mrf(t1v, t2v, b1v, **sched) @ basis
    noise = torch.complex(torch.randn(n, 6, dtype=torch.float64, generator=gen),
                          torch.randn(n, 6, dtype=torch.float64, generator=gen))
    signals = (clean * torch.exp(1j * torch.rand(n, generator=gen, dtype=torch.float64))[:, None]
               + 0.02 * clean.abs().amax(1, keepdim=True) * noise).to(torch.complex64)
    groups[:5] = -1  # not matched
    kern = dictmatch.match(signals, atoms, groups=groups, atom_groups=slices, backend="kernel")
    gemm = dictmatch.match(signals, atoms, groups=groups, atom_groups=slices, backend="torch")
    assert kern.backend == "kernel" and gemm.backend == "torch"
    np.testing.assert_array_equal(kern.index.numpy(), gemm.index.numpy())
    assert (kern.index[:5] == -1).all()
    unit = (atoms / torch.linalg.vector_norm(atoms, dim=1, keepdim=True)).numpy().astype(np.complex128)
    s = signals.numpy().astype(np.complex128)
    for g, sl in enumerate(slices):
        rows = (groups == g).numpy()
        brute = sl.start + np.abs(s[rows] @ unit[sl].conj().T).argmax(1)
        np.testing.assert_array_equal(kern.index.numpy()[rows], brute)
    torch.testing.assert_close(kern.scale, gemm.scale)


def test_results_do_not_depend_on_the_thread_count():
    import numba

    rng = np.random.default_rng(9)
    atoms = rng.normal(size=(700, 8)).astype(np.complex64)
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    signals = (rng.normal(size=(500, 8)) + 1j * rng.normal(size=(500, 8))).astype(np.complex64)
    before = numba.get_num_threads()
    one = match_kernel.best_atoms(signals, unit, num_threads=1, tile=64)
    two = match_kernel.best_atoms(signals, unit, num_threads=2, tile=64)
    many = match_kernel.best_atoms(signals, unit, num_threads=64, tile=64)  # capped at numba's pool
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, many)
    assert numba.get_num_threads() == before  # the caller's setting is restored


def test_kernel_runs_without_a_writable_cache_folder(tmp_path):
    # A read-only container without NUMBA_CACHE_DIR: no folder numba could cache in (the module's
    # __pycache__ is a file here, the cache folders lie under a file), so the kernel must fall back
    # to compiling in memory instead of failing at import. Run in a fresh interpreter.
    src = Path(match_kernel.__file__)
    pkg = tmp_path / "ro"
    pkg.mkdir()
    shutil.copy(src, pkg / "match_kernel_copy.py")
    (pkg / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(XDG_CACHE_HOME=str(blocker / "cache"), HOME=str(blocker / "home"), PYTHONDONTWRITEBYTECODE="1")
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import match_kernel_copy as mk\n"
        "rng = np.random.default_rng(0); a = rng.normal(size=(50, 4)) + 0j; s = rng.normal(size=(20, 4)) + 1j\n"
        "u = a / np.linalg.norm(a, axis=1, keepdims=True)\n"
        "ok = np.array_equal(mk.best_atoms(s, u), np.abs(s @ u.conj().T).argmax(1))\n"
        "print(mk._CACHE, ok)\n")
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
    assert (pkg / "__pycache__").is_file()  # nothing was written beside the module
