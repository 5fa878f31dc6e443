"""``dictmatch``: MRF maps by dictionary matching (seed 002; SPEC §6) with optional refinement.

Per voxel: the fingerprint (SVD coefficients, or frames compressed on the dictionary's own SVD
basis) is matched to the FISP dictionary at the voxel's B1 (nearest B1 grid value; B1 = 1 without
a B1 map) by the largest normalised inner product (``fitting.dictmatch.match``: exact argmax,
ties to the lowest index); M0 is the modulus of the complex scale. Refinement (default on,
``--mrf-refine``) then runs Gauss–Newton steps on (log T1, log T2) inside the winning grid cell
with the EPG simulated at the voxel's own B1 (``fitting.dictmatch.refine_gauss_newton``), so
estimates are neither quantised to the T1/T2 grid nor to the B1 grid.

Options (``context.options``): ``mrf_refine`` (``on``/``off``), ``mrf_grid_steps`` (T1 and T2 grid points,
default 80), ``mrf_b1_step`` (default 0.05), ``mrf_svd_energy`` (rank of the own basis for frames
input, default 0.999), ``mrf_refine_model`` (``dictionary``, default: Gauss–Newton on a polynomial
interpolant of the dictionary's own compressed atoms, ``fitting.dictmatch.refine_on_grid``, microseconds
per voxel; ``epg``: on the EPG simulated at the voxel's B1, milliseconds per voxel; voxels without a
full interpolation stencil always take the EPG), ``mrf_refine_iterations`` (default 4 on the
dictionary, 2 on the EPG), ``mrf_refine_jacobian`` (EPG model only; ``start``:
the Jacobian of the matched node is kept, one EPG simulation per iteration; ``every``: Gauss–Newton
proper, ``P + 1`` simulations per iteration).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bids_qmri.fitting import dictmatch

from . import dictionary as mrfdict

LOGGER = logging.getLogger("bids_qmri.modalities.mrf.estimate")

REFERENCE = ("Ma D, Gulani V, Seiberlich N, Liu K, Sunshine JL, Duerk JL, Griswold MA. Magnetic resonance "
             "fingerprinting. Nature 2013;495:187-192. doi:10.1038/nature11971; Jiang Y, Ma D, Seiberlich N, Gulani V, "
             "Griswold MA. MR fingerprinting using fast imaging with steady state precession (FISP) with spiral "
             "readout. Magn Reson Med 2015;74:1621-1631. doi:10.1002/mrm.25559; McGivney DF, Pierre E, Ma D, et al. "
             "SVD compression for magnetic resonance fingerprinting in the time domain. IEEE Trans Med Imaging "
             "2014;33:2311-2322. doi:10.1109/TMI.2014.2337321")
ALGORITHM = ("dictionary matching: maximum |<d, s>|/||d|| over a FISP-EPG dictionary (log T1 x log T2 grid, T2 < T1) "
             "at the voxel's B1 (nearest grid value) in the SVD-compressed domain, exact argmax by chunked complex "
             "GEMM, M0 = |<d, s>|/||d||^2{refine}")
REFINE_TEXT_DICT = ("; then Gauss-Newton on (log T1, log T2) inside the winning grid cell on an interpolant of the "
                    "dictionary's own compressed atoms at the voxel's own B1 (degree-4 Lagrange in log T1 and log "
                    "T2, cubic in B1; variable projection of the complex scale); voxels without a full stencil "
                    "(the grid's T2 < T1 edge, B1 outside the grid) on the EPG itself")
REFINE_TEXT = ("; then Gauss-Newton on (log T1, log T2) inside the winning grid cell with the EPG simulated at the "
               "voxel's own B1 (variable projection of the complex scale, forward-difference EPG Jacobian)")


def grid_from_options(options: dict) -> mrfdict.DictionaryGrid:
    steps = int(options.get("mrf_grid_steps") or 80)
    b1_step = float(options.get("mrf_b1_step") or 0.05)
    if steps < 4 or not 0.001 <= b1_step <= 0.8:
        raise ValueError(f"MRF dictionary grid: --mrf-grid-steps must be >= 4 (got {steps}) and the B1 step "
                         f"in [0.001, 0.8] (got {b1_step})")
    return mrfdict.DictionaryGrid(t1_steps=steps, t2_steps=steps, b1_step=b1_step)


#: How the atoms were searched (``dictmatch.MatchResult.form``), for the sidecar.
MATCH_FORMS = {
    "real": ", real atoms",
    "factored": (", complex atoms of real rank R (a real dictionary on a complex basis) searched as real atoms "
                 "after one R x R complex change of basis of each voxel's coefficients (exact up to rounding)"),
    "complex": ", complex atoms",
}


def _volume(values, mask: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, np.nan, dtype=np.float32)
    out[mask] = np.asarray(values, dtype=np.float32)
    return out


def prepare_signals(data: dict, mask: np.ndarray, protocol, grid, cache_dir: Path, options: dict):
    """``(coefficients [V, R] complex64, basis [Nt, R], b1 [V], basis description)`` of the
    masked voxels: coefficient input with its own basis, or frames compressed on the dictionary's
    SVD basis."""
    signal = np.asarray(data["signal"])[mask]
    b1 = np.asarray(data["b1"], dtype=np.float64)[mask] if "b1" in data else np.ones(len(signal))
    b1 = np.where(np.isfinite(b1) & (b1 > 0), b1, 1.0)
    schedule = protocol.schedule()
    if data.get("basis") is not None:
        basis = torch.from_numpy(np.asarray(data["basis"]).reshape(protocol.n_frames, -1)).to(torch.complex64)
        if basis.shape[1] != signal.shape[-1]:
            raise ValueError(f"the basis has rank {basis.shape[1]} but the data have {signal.shape[-1]} coefficients")
        source = {"SVDBasis": "given with the data (basis TSV): the dictionary is projected onto it",
                  "SVDRank": int(basis.shape[1])}
    else:
        if signal.shape[-1] != protocol.n_frames:
            raise ValueError(f"{signal.shape[-1]} frames but the schedule has {protocol.n_frames}")
        energy = float(options.get("mrf_svd_energy") or 0.999)
        needed = grid.b1_values[np.unique(grid.b1_index(b1))]
        basis, kept = mrfdict.own_basis(schedule, grid, needed, cache_dir, energy=energy)
        source = {"SVDBasis": f"the dictionary's own SVD (B1 values in use), energy kept {kept:.6f} >= {energy}",
                  "SVDRank": int(basis.shape[1])}
        signal = signal @ basis.numpy()
    return torch.from_numpy(np.ascontiguousarray(signal)).to(torch.complex64), basis, b1, source


def estimate_dictmatch(data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """T1map, T2map (s) and M0map (arbitrary) of the masked voxels."""
    options = dict(context.options or {})
    refine = options.get("mrf_refine", "on") not in ("off", False)
    every = options.get("mrf_refine_jacobian", "start") == "every"
    grid = grid_from_options(options)
    cache_dir = Path(context.model_dir or ".") / "mrf" / "dictionaries"
    torch.manual_seed(int(context.seed))
    coeffs, basis, b1, source = prepare_signals(data, mask, protocol, grid, cache_dir, options)
    schedule = protocol.schedule()
    model = str(options.get("mrf_refine_model") or "dictionary")
    if model not in ("dictionary", "epg"):
        raise ValueError(f"--mrf-refine-model must be 'dictionary' or 'epg', got {model!r}")
    groups_all = grid.b1_index(b1)
    b1_pos = (b1 - grid.b1_range[0]) / grid.b1_step  # B1 in grid units
    needed = set(np.unique(groups_all).tolist())
    if refine and model == "dictionary":
        # the cubic stencil along B1 around each voxel's own B1 (where it lies inside the grid)
        n_b1 = len(grid.b1_values)
        inside = (b1_pos >= 0) & (b1_pos <= n_b1 - 1)
        first = np.clip(np.floor(b1_pos[inside]) - 1, 0, max(n_b1 - dictmatch.FIXED_STENCIL, 0)).astype(int)
        for k in np.unique(first):
            needed.update(range(int(k), min(int(k) + dictmatch.FIXED_STENCIL, n_b1)))
    used = np.array(sorted(needed), dtype=int)
    b1_used = grid.b1_values[used]
    atoms, slices = mrfdict.dictionary(schedule, grid, b1_used, basis, cache_dir)
    groups = torch.from_numpy(np.searchsorted(used, groups_all))
    result = dictmatch.match(coeffs, atoms, groups=groups, atom_groups=slices, num_threads=context.num_threads)
    nodes = torch.from_numpy(grid.nodes())
    offsets = torch.tensor([sl.start for sl in slices])
    ok = result.index >= 0
    local = (result.index - offsets[groups]).clamp_min(0)
    x = nodes[local]
    m0 = result.scale.abs().double()
    provenance = {
        "method": "dictmatch",
        "algorithm": ALGORITHM.format(refine=(REFINE_TEXT_DICT if model == "dictionary" else REFINE_TEXT)
                                      if refine else ""),
        "reference": REFERENCE,
        "DictionaryGrid": grid.as_dict(),
        "DictionaryHash": mrfdict.dictionary_hash(schedule, grid, mrfdict.N_STATES, basis),
        "DictionaryAtoms": int(atoms.shape[0]),
        "DictionaryB1Values": [float(v) for v in grid.b1_values[np.unique(groups_all)]],
        "EPGStates": mrfdict.N_STATES,
        "EPGTruncationError": round(mrfdict.truncation_error(schedule, grid), 8),
        **source,
        "Refinement": refine,
        "MatchingImplementation": ("fused numba kernel (fitting.match_kernel)" if result.backend == "kernel" else
                                   "torch GEMM + running argmax") + MATCH_FORMS[result.form],
        "MedianMatchScore": float(result.score[ok].median()) if ok.any() else None,
        "VoxelsNotMatched": int((~ok).sum()),
    }
    if refine and ok.any():
        rows = torch.nonzero(ok).flatten()
        x = x.clone()
        m0 = m0.clone()
        gain = torch.full((len(rows),), torch.nan, dtype=torch.float64)
        epg_rows = torch.arange(len(rows))
        if model == "dictionary":
            iterations = int(options.get("mrf_refine_iterations") or 4)
            lt1, lt2 = grid.log_t1, grid.log_t2
            node_index = mrfdict.node_index(grid, used, slices)
            start = torch.stack([(x[rows, 0] - lt1[0]) / (lt1[1] - lt1[0]), (x[rows, 1] - lt2[0]) / (lt2[1] - lt2[0]),
                                 torch.from_numpy(b1_pos)[rows]], 1).round(decimals=9)
            start[:, :2] = start[:, :2].round()
            ref, done = dictmatch.refine_on_grid(coeffs[rows], atoms, node_index, start, (True, True, False),
                                                 iterations=iterations)
            sel = torch.nonzero(done).flatten()
            x[rows[sel], 0] = lt1[0] + ref.x[sel, 0] * (lt1[1] - lt1[0])
            x[rows[sel], 1] = lt2[0] + ref.x[sel, 1] * (lt2[1] - lt2[0])
            m0[rows[sel]] = ref.scale[sel].abs()
            gain[sel] = ref.start_cost[sel] / ref.cost[sel].clamp_min(1e-30)
            epg_rows = torch.nonzero(~done).flatten()
            provenance["RefinementModel"] = ("the dictionary's own atoms, interpolated (degree-4 Lagrange in log T1 "
                                             "and log T2 over 5 x 5 nodes around the match, cubic in B1 at the "
                                             "voxel's B1)")
            provenance["RefinementVoxelsOnEPG"] = int(len(epg_rows))
        if len(epg_rows):
            er = rows[epg_rows]
            cell = torch.tensor(grid.cell, dtype=torch.float64)
            lo_bound = torch.tensor([grid.log_t1[0], grid.log_t2[0]])
            hi_bound = torch.tensor([grid.log_t1[-1], grid.log_t2[-1]])
            x0 = x[er]
            lower = torch.maximum(x0 - cell, lo_bound)
            upper = torch.minimum(x0 + cell, hi_bound)

            def simulate(xx, b):
                return (mrfdict.simulator(schedule, b[:, 0], mrfdict.N_STATES)(xx) @ basis)

            iters_epg = int(options.get("mrf_refine_iterations") or 2)
            ref = dictmatch.refine_gauss_newton(simulate, coeffs[er], x0, lower, upper,
                                                fixed=torch.from_numpy(b1)[er, None].float(), iterations=iters_epg,
                                                update_jacobian=every)
            x[er] = ref.x
            m0[er] = ref.scale.abs()
            gain[epg_rows] = ref.start_cost / ref.cost.clamp_min(1e-30)
            provenance["RefinementJacobian"] = ("forward differences of the EPG at every accepted point" if every else
                                                "forward differences of the EPG at the matched grid node, kept (chord "
                                                "method: one EPG simulation per iteration)")
        provenance["RefinementIterations"] = iterations if model == "dictionary" else int(
            options.get("mrf_refine_iterations") or 2)
        provenance["RefinementMedianResidualReduction"] = float(gain.nanmedian())
    t1 = torch.where(ok, x[:, 0].exp(), torch.nan).numpy()
    t2 = torch.where(ok, x[:, 1].exp(), torch.nan).numpy()
    m0 = torch.where(ok, m0, torch.nan).numpy()
    maps = {"T1map": _volume(t1, mask), "T2map": _volume(t2, mask), "M0map": _volume(m0, mask)}
    return maps, provenance


#: On-the-fly training settings of mrfnet (options ``mrf_net_samples`` / ``mrf_net_epochs`` override).
NET_TRAINING = {"n_samples": 40_000, "max_epochs": 30, "patience": 5}
NET_ALGORITHM = ("mrfnet: MLP (3 x {hidden} ReLU) on the unit-norm SVD coefficients (first coefficient real) and B1 "
                 "-> log T1, log T2 and the log norm of the noise-free coefficients (M0 = ||c|| / norm); trained on "
                 "the fly on FISP-EPG fingerprints for this schedule and basis with the {loss} loss")


def estimate_mrfnet(data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """T1map, T2map (s) and M0map of the masked voxels by the fingerprint network."""
    from bids_qmri.models.registry import get_model

    from .net import NetProtocol, basis_key, features, train_mrfnet

    options = dict(context.options or {})
    loss = str(options.get("mrf_net_loss") or "crb")
    grid = grid_from_options(options)
    cache_dir = Path(context.model_dir or ".") / "mrf" / "dictionaries"
    coeffs, basis, b1, source = prepare_signals(data, mask, protocol, grid, cache_dir, options)
    net_protocol = NetProtocol(protocol, basis_key(basis), loss)
    settings = {**NET_TRAINING, **{k: int(options[o]) for k, o in (("n_samples", "mrf_net_samples"),
                                                                 ("max_epochs", "mrf_net_epochs")) if options.get(o)}}
    net, card = get_model("mrf", "mrfnet", net_protocol, model_dir=context.model_dir,
                          trainer=lambda: train_mrfnet(net_protocol, basis, seed=context.seed, **settings),
                          seed=context.seed, allow_training=context.allow_training)
    b1_t = torch.from_numpy(np.clip(b1, 0.6, 1.4)).float()
    with torch.no_grad():
        pred = torch.cat([net(features(coeffs[lo:lo + 65536], b1_t[lo:lo + 65536]))
                          for lo in range(0, len(coeffs), 65536)]) if len(coeffs) else torch.zeros(0, 3)
    norm = torch.linalg.vector_norm(coeffs, dim=-1).double()
    ok = norm > 0
    t1 = torch.where(ok, pred[:, 0].double().exp(), torch.nan).numpy()
    t2 = torch.where(ok, pred[:, 1].double().exp(), torch.nan).numpy()
    m0 = torch.where(ok, norm / pred[:, 2].double().exp(), torch.nan).numpy()
    provenance = {"method": "mrfnet", "algorithm": NET_ALGORITHM.format(hidden=net.hidden, loss=loss),
                  "reference": REFERENCE, "model_card": card, **source, "Loss": loss,
                  "VoxelsB1OutsideTraining": int(((b1 < 0.6) | (b1 > 1.4)).sum())}
    return {"T1map": _volume(t1, mask), "T2map": _volume(t2, mask), "M0map": _volume(m0, mask)}, provenance
