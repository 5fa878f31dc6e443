"""qMT maps (seed 003; SPEC §3, §6): ``qmtnet`` / ``qmtnetmse`` (the residual MLP trained with the
CRB-weighted loss / its MSE twin) and ``qmtnls`` (batched Levenberg–Marquardt over all 8 parameters
of the two-pool model, multi-start from the network's estimate and a coarse grid).

Input: the masked voxels' complex coefficients on the data's own basis (``data["basis"]``, the
basis TSV) or, for frame data, the frames projected on the training basis (``training_basis``:
the SVD of a random seed-003 set of fingerprints for this schedule, rank ``QMT_RANK``; cached in
``<model_dir>/qmt/bases``). The networks depend on schedule and basis: their model-registry key is
the ``QMTProtocol`` with that basis' hash and rank (``net_protocol``), so the synthetic dataset's
schedule finds the bundled weights and another schedule trains its own (``training.train_qmtnet``,
settings ``NET_TRAINING``, training set cached in ``<model_dir>/qmt/trainsets``).

Options (``context.options``): ``qmt_net_samples`` / ``qmt_net_epochs`` (on-the-fly training),
``qmt_nls_starts`` (grid starts per voxel besides the network's, default 1),
``qmt_nls_iterations`` (LM iterations per start, default 40), ``qmt_b1_from_map`` (set by the
workflow: the B1 role is a measured map, so NLLS holds B1 at it instead of estimating it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import simulate
from .protocol import QMTProtocol, basis_hash

LOGGER = logging.getLogger("bids_qmri.modalities.qmt.estimate")

#: Rank of the training basis for frame data (the synthetic dataset's and seed 003's 13 coefficients).
QMT_RANK = 13
#: Fingerprints of the training basis' SVD (seed-003 distributions, fixed seed: a property of the schedule).
BASIS_SAMPLES = 1024
BASIS_SEED = 0
#: On-the-fly network training (options ``qmt_net_samples`` / ``qmt_net_epochs`` override). ``widen``: the
#: training set is drawn as the bundled nets' was: seed 003's distributions (issue 16 measured a 2x wider
#: prior, ``simulate.widened_distributions``: std/sqrt(CRB) moved towards 1 but the maps' m0s errors grew,
#: so it is not the default; models/bundled/qmt/TRAINING.md, "Stage 5").
NET_TRAINING = {"n_train": 4096, "n_val": 512, "max_epochs": 400, "patience": 400, "widen": None}
#: NLLS defaults: grid starts per voxel (besides the network's) and LM iterations per start.
NLS_STARTS = 1
NLS_ITERATIONS = 40
#: voxels per network batch: the 128-wide activations of 4096 voxels stay in cache; 65 536 took
#: 1.5x the time (1.5 M voxels, 2 threads: 21.5 s vs 32.5 s wall, benchmarks/bench_qmt.py)
INFERENCE_CHUNK = 4096
NLS_CHUNK = 32  # voxels per LM batch (memory: the Jacobian of 32 voxels x 1142 TRs x 7 tangents)
# float64 throughout: in float32 the T1 of a noise-free voxel stops 2-20 % off (the (T1, M0) Fisher
# matrix is nearly singular); float64 reaches it to 1e-6 at about the same cost per iteration.

REFERENCE = ("Zhang X, Duchemin Q, Liu K, Gultekin C, Flassbeck S, Fernandez-Granda C, Asslander J. Cramer-Rao "
             "bound-informed training of neural networks for quantitative MRI. Magn Reson Med 2022;88:436-448. "
             "doi:10.1002/mrm.29206")
NET_ALGORITHM = ("{method}: residual MLP (14 fully connected layers, width {width}, group normalisation, ReLU, skip "
                 "connections) on the unit-norm SVD coefficients (first coefficient made real) -> m0s, T1, T2f of "
                 "the two-pool hybrid-state model; trained on exact simulations of this schedule and basis "
                 "(seed 003 parameter distributions, complex M0 and noise redrawn every batch, SNR_max 10-100) "
                 "with the {loss} loss")
LOSS_TEXT = {"crb": "Cramer-Rao-bound weighted (each squared error divided by the sample's CRB)",
             "mse": "mean squared error (parameters in units of their training standard deviation)"}
NLS_ALGORITHM = ("qmtnls: non-linear least squares over all 8 parameters of the two-pool model (m0s, T1, T2f, T2s, "
                 "Rx, B0, B1 and complex M0 as two reals; B1 {b1}) on the SVD coefficients, batched "
                 "Levenberg-Marquardt with the physics layer's exact Jacobian (forward-mode AD through the pulse "
                 "propagators), box bounds, multi-start from the qmtnet estimate and the {starts} best point(s) "
                 "of a coarse m0s x T1 x T2f x B0 grid; the lowest residual wins")


def _volume(values, mask: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, np.nan, dtype=np.float32)
    out[mask] = np.asarray(values, dtype=np.float32)
    return out


def training_basis(protocol: QMTProtocol, cache_dir: Path | None = None, rank: int = QMT_RANK) -> torch.Tensor:
    """``[Nt, rank]`` complex128 SVD basis of ``BASIS_SAMPLES`` exact fingerprints of the schedule with
    parameters from the seed-003 training distributions (``simulate.sample_parameters``)."""
    from bids_qmri.physics import qmt, svd

    schedule = protocol.schedule()

    def compute():
        gen = torch.Generator().manual_seed(BASIS_SEED)
        theta = simulate.sample_parameters(BASIS_SAMPLES, schedule["tr"], gen).float()
        LOGGER.info("qMT: simulating %d fingerprints for the training basis (once per schedule)", BASIS_SAMPLES)
        sig = torch.cat([qmt.hybrid_state_signal(*theta[i:i + 256].unbind(-1), **schedule)
                         for i in range(0, BASIS_SAMPLES, 256)])
        return {"basis": svd.svd_basis(sig.to(torch.complex128), min(rank, sig.shape[-1]))}

    if cache_dir is None:
        return compute()["basis"]
    from bids_qmri.utils.cache import disk_cached

    key = (*simulate.schedule_key_parts(schedule, torch.zeros(1, 1)), BASIS_SAMPLES, BASIS_SEED, int(rank))
    return disk_cached(cache_dir, "qmt-basis", key, compute)["basis"]


def net_protocol(protocol: QMTProtocol, basis: torch.Tensor) -> QMTProtocol:
    """The protocol a network is keyed by: the schedule and the basis it reads."""
    return dataclasses.replace(protocol, basis_key=basis_hash(basis), rank=int(basis.shape[1]))


def prepare_coefficients(data: dict, mask: np.ndarray, protocol: QMTProtocol, cache_dir: Path | None):
    """``(coefficients [V, R] complex128, basis [Nt, R], sidecar fields)`` of the masked voxels."""
    signal = np.asarray(data["signal"])[mask]
    if data.get("basis") is not None:
        basis = torch.from_numpy(np.asarray(data["basis"]).reshape(protocol.n_tr, -1)).to(torch.complex128)
        if basis.shape[1] != signal.shape[-1]:
            raise ValueError(f"the basis has rank {basis.shape[1]} but the data have {signal.shape[-1]} coefficients")
        source = {"SVDBasis": "given with the data (basis TSV)", "SVDRank": int(basis.shape[1]),
                  "SVDBasisHash": basis_hash(basis)}
        coeffs = torch.from_numpy(np.ascontiguousarray(signal)).to(torch.complex128)
    else:
        if signal.shape[-1] != protocol.n_tr:
            raise ValueError(f"{signal.shape[-1]} frames but the schedule has {protocol.n_tr}")
        basis = training_basis(protocol, cache_dir)
        source = {"SVDBasis": f"the training basis: SVD of {BASIS_SAMPLES} simulated fingerprints of the schedule "
                              "(seed 003 parameter distributions); the frames are projected on it",
                  "SVDRank": int(basis.shape[1]), "SVDBasisHash": basis_hash(basis)}
        coeffs = torch.from_numpy(np.ascontiguousarray(signal)).to(torch.complex128) @ basis
    return coeffs, basis, source


def get_net(method: str, protocol: QMTProtocol, basis: torch.Tensor, context):
    """``(net, card)`` of ``method`` for the schedule and basis: bundled, the user's, cached or trained now."""
    from bids_qmri.models.registry import get_model

    from .training import train_qmtnet

    options = dict(context.options or {})
    proto = net_protocol(protocol, basis)
    settings = dict(NET_TRAINING)
    for key, option in (("n_train", "qmt_net_samples"), ("max_epochs", "qmt_net_epochs")):
        if options.get(option):
            settings[key] = int(options[option])
    settings["patience"] = max(settings["patience"], settings["max_epochs"])
    cache = Path(context.model_dir) / "qmt" / "trainsets" if context.model_dir else None
    return get_model("qmt", method, proto, model_dir=context.model_dir,
                     trainer=lambda: train_qmtnet(method, proto, basis, seed=int(context.seed), cache_dir=cache,
                                                  **settings),
                     seed=context.seed, allow_training=context.allow_training)


def predict(net, coeffs: torch.Tensor, chunk: int = INFERENCE_CHUNK) -> torch.Tensor:
    """``[V, 3]`` float64 (m0s, T1, T2f) of the network; NaN where the coefficients are all zero."""
    from .net import features

    with torch.no_grad():
        parts = [net(features(coeffs[i:i + chunk])).double() for i in range(0, len(coeffs), chunk)]
    pred = torch.cat(parts) if parts else torch.zeros((0, 3), dtype=torch.float64)
    ok = (torch.linalg.vector_norm(coeffs, dim=-1) > 0)[:, None]
    return torch.where(ok, pred, torch.nan)


def _out_of_prior(pred: torch.Tensor) -> dict:
    """Voxels whose estimate lies outside the training distributions' truncation (extrapolation)."""
    out = {}
    for i, name in enumerate(("m0s", "T1", "T2f")):
        _, _, lo, hi = simulate.DISTRIBUTIONS[name]
        v = pred[:, i]
        out[name] = int(((v < lo) | (v > hi)).sum())
    return out


def estimate_net(method: str, data: dict, mask: np.ndarray, protocol: QMTProtocol, context) -> tuple[dict, dict]:
    """m0smap, T1map and T2map (T2f) of the masked voxels by ``qmtnet`` or ``qmtnetmse``."""
    cache = Path(context.model_dir) / "qmt" / "bases" if context.model_dir else None
    coeffs, basis, source = prepare_coefficients(data, mask, protocol, cache)
    net, card = get_net(method, protocol, basis, context)
    t0 = time.perf_counter()
    pred = predict(net, coeffs)
    LOGGER.info("%s: %d voxels in %.2f s", method, len(coeffs), time.perf_counter() - t0)
    outside = _out_of_prior(pred)
    warnings = []
    if len(pred) and max(outside.values()) > 0.05 * len(pred):
        warnings.append(f"{method}: more than 5 % of the voxels estimated outside the training range "
                        f"({', '.join(f'{k} {v}' for k, v in outside.items())} voxels): extrapolation")
    loss = card.get("loss", "crb")
    provenance = {"method": method,
                  "algorithm": NET_ALGORITHM.format(method=method, width=getattr(net, "width", 128),
                                                    loss=LOSS_TEXT.get(loss, loss)),
                  "reference": REFERENCE, "model_card": card, **source, "Loss": loss,
                  "VoxelsOutsideTrainingRange": outside, "warnings": warnings}
    maps = {"m0smap": _volume(pred[:, 0], mask), "T1map": _volume(pred[:, 1], mask),
            "T2map": _volume(pred[:, 2], mask)}
    return maps, provenance


def estimate_qmtnet(data, mask, protocol, context):
    return estimate_net("qmtnet", data, mask, protocol, context)


def estimate_qmtnetmse(data, mask, protocol, context):
    return estimate_net("qmtnetmse", data, mask, protocol, context)


def estimate_qmtnls(data: dict, mask: np.ndarray, protocol: QMTProtocol, context) -> tuple[dict, dict]:
    """All maps of the two-pool model by NLLS (``nls.fit_nls``), voxel batches of ``NLS_CHUNK``."""
    from tqdm.auto import tqdm

    from .nls import fit_nls

    options = dict(context.options or {})
    starts = int(options.get("qmt_nls_starts", NLS_STARTS))
    iterations = int(options.get("qmt_nls_iterations") or NLS_ITERATIONS)
    if starts < 0 or iterations < 1:
        raise ValueError(f"--qmt-nls-starts must be >= 0 (got {starts}) and --qmt-nls-iterations >= 1 "
                         f"(got {iterations})")
    cache = Path(context.model_dir) / "qmt" / "bases" if context.model_dir else None
    coeffs, basis, source = prepare_coefficients(data, mask, protocol, cache)
    net, card = get_net("qmtnet", protocol, basis, context)
    x_net = predict(net, coeffs)
    b1_fixed = bool(options.get("qmt_b1_from_map")) and data.get("b1") is not None
    b1 = None
    if b1_fixed:
        b1 = torch.from_numpy(np.asarray(data["b1"], dtype=np.float64)[mask])
        b1 = torch.where(torch.isfinite(b1) & (b1 > 0), b1, torch.ones_like(b1))
    ok = torch.isfinite(x_net).all(1)
    rows = torch.nonzero(ok).flatten()
    n = len(coeffs)
    names = simulate.PARAMETERS
    fit = {k: torch.full((n,), torch.nan, dtype=torch.float64) for k in (*names, "M0abs", "cost")}
    converged = 0
    t0, c0 = time.perf_counter(), time.process_time()
    schedule = protocol.schedule()
    with tqdm(total=len(rows), unit="voxel", desc="qmtnls", disable=None) as bar:
        for lo in range(0, len(rows), NLS_CHUNK):
            r = rows[lo:lo + NLS_CHUNK]
            out = fit_nls(coeffs[r], schedule, basis, b1=None if b1 is None else b1[r], x_net=x_net[r],
                          n_grid_starts=starts, max_iter=iterations, dtype=torch.float64)
            for k in names:
                fit[k][r] = out[k].double()
            fit["M0abs"][r] = out["M0"].abs().double()
            fit["cost"][r] = out["cost"].double()
            converged += int(out["converged"].sum())
            bar.update(len(r))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    LOGGER.info("qmtnls: %d voxels in %.1f s wall, %.1f s CPU (%.2f CPU-s per voxel)", len(rows), wall, cpu,
                cpu / max(1, len(rows)))
    maps = {"m0smap": _volume(fit["m0s"], mask), "T1map": _volume(fit["T1"], mask),
            "T2map": _volume(fit["T2f"], mask), "T2smap": _volume(fit["T2s"], mask),
            "Rxmap": _volume(fit["Rx"], mask), "fieldmap": _volume(fit["B0"], mask),
            "M0map": _volume(fit["M0abs"], mask)}
    if not b1_fixed:
        maps["TB1map"] = _volume(fit["B1"], mask)
    provenance = {"method": "qmtnls",
                  "algorithm": NLS_ALGORITHM.format(b1="held at the B1 map" if b1_fixed else "estimated",
                                                    starts=starts),
                  "reference": REFERENCE, "model_card": card, **source, "B1": "fixed (map)" if b1_fixed else "fitted",
                  "GridStarts": starts, "Iterations": iterations, "Precision": "float64",
                  "VoxelsMeetingTolerance": converged,
                  "MedianResidual": float(fit["cost"][rows].median().sqrt()) if len(rows) else None}
    return maps, provenance


def relative_error_floor(theta: torch.Tensor, protocol: QMTProtocol, basis: torch.Tensor, m0: torch.Tensor,
                         sigma: float) -> torch.Tensor:
    """``√CRB / |θ|`` ``[N, 3]`` of (m0s, T1, T2f) at parameters ``theta`` ``[N, 7]`` for a complex scale
    ``m0`` ``[N]`` and noise ``sigma`` per real channel: the relative error an efficient unbiased
    estimator would show (a floor for the maps' errors)."""
    c, jac = simulate.coefficient_jacobian(theta, protocol.schedule(), basis)
    crb = simulate.crb_from_jacobian(c, jac, sigma=sigma, m0=m0)
    return crb[:, :3].clamp_min(0).sqrt() / theta[:, :3].abs().clamp_min(1e-30)


__all__ = ["QMT_RANK", "NET_TRAINING", "estimate_qmtnet", "estimate_qmtnetmse", "estimate_qmtnls", "get_net",
           "net_protocol", "predict", "prepare_coefficients", "training_basis", "relative_error_floor"]
